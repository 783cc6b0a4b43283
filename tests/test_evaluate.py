"""python -m training.evaluate on weights whose answer is known in advance.

With the last layer's weight zeroed, the logits are its bias whatever the image: a bias that
ranks five classes first makes every prediction the same, so on the balanced test split (100
images per class) top-1 is exactly 1%, top-5 exactly 5%, the favoured class scores 100% and
every other 0%, and every confused pair is (some class -> the favoured class, 100 images).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import background
from model import CIFAR100Model, display_name, load_class_names
from training import evaluate as evaluate_module

ROOT = Path(__file__).resolve().parents[1]

CLASS_NAMES = load_class_names()
FAVOURED = [1, 42, 7, 99, 0]  # aquarium_fish first, then four runners-up in this order


def known_answer_state(width: int = 1) -> dict:
    torch.manual_seed(0)
    state = CIFAR100Model(width=width).state_dict()
    state["fc.weight"].zero_()
    state["fc.bias"].zero_()
    for rank, index in enumerate(FAVOURED):
        state["fc.bias"][index] = 10.0 - rank
    return state


@background.computation("known_report")
def evaluate_the_known_answer(data_dir: str) -> tuple[str, dict]:
    """One run of the real CLI on the full test split (no TTA: a mirror cannot change a constant): what it printed
    and its JSON report."""
    with tempfile.TemporaryDirectory(prefix="evaluate-") as folder:
        folder = Path(folder)
        torch.save(known_answer_state(), folder / "known.pth")
        proc = subprocess.run([sys.executable, "-m", "training.evaluate", str(folder / "known.pth"),
                               "--data-dir", data_dir, "--no-tta", "--json", str(folder / "report.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=480)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def known_report(cifar100_data_dir):
    """evaluate_the_known_answer's result, worked out in the background from the session's start."""
    return background.result("known_report", str(cifar100_data_dir))


def test_known_answer_figures_on_the_full_test_split(known_report):
    _, report = known_report
    assert report["test_images"] == 10_000 and report["width"] == 1 and report["num_classes"] == 100
    assert report["top1"] == pytest.approx(1.0, abs=1e-9)
    assert report["top5"] == pytest.approx(5.0, abs=1e-9)
    per_class = {c["index"]: c["accuracy"] for c in report["per_class"]}
    assert per_class.pop(FAVOURED[0]) == 100.0
    assert set(per_class.values()) == {0.0}
    assert all(c["test_images"] == 100 for c in report["per_class"])


def test_known_answer_confused_pairs(known_report):
    _, report = known_report
    pairs = report["most_confused"]
    assert len(pairs) == 10
    favoured = CLASS_NAMES[FAVOURED[0]]
    assert all(p["predicted"] == favoured and p["count"] == 100 and p["share_of_true_class"] == 100.0 for p in pairs)
    # Equal counts come in class order: apple (0), baby (2), bear (3) ..., skipping the favoured class.
    assert [p["true"] for p in pairs] == [n for n in CLASS_NAMES if n != favoured][:10]


def test_printed_report_uses_display_names(known_report):
    text, _ = known_report
    assert "top-1 1.00%   top-5 5.00%" in text
    assert f"best classes:  {display_name(CLASS_NAMES[FAVOURED[0]])} 100%" in text
    assert "Aquarium fish" in text and "aquarium_fish" not in text
    assert "Apple -> Aquarium fish 100 100%" in " ".join(text.split())
    worst = next(line for line in text.splitlines() if line.startswith("worst classes:"))
    assert worst.count("0%") == 5


def test_training_checkpoint_is_read_as_its_ema_weights(tmp_path, capsys, cifar100_data_dir):
    """A checkpoint.pt from training scores as the EMA weights it would export (a 300-image subset)."""
    state = known_answer_state()
    ema = {f"module.{k}": v for k, v in state.items()} | {"n_averaged": torch.tensor(5)}
    raw = dict(state, **{"fc.bias": torch.zeros(100)})  # the raw model would tie everywhere
    torch.save({"epoch": 3, "model": raw, "ema": ema, "args": {"width": 1}}, tmp_path / "checkpoint.pt")
    rc = evaluate_module.main([str(tmp_path / "checkpoint.pt"), "--data-dir", str(cifar100_data_dir), "--no-tta",
                               "--test-subset", "300", "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    labels = torch.tensor([c["test_images"] for c in report["per_class"]])
    assert report["test_images"] == 300 == int(labels.sum())
    # Every prediction is the favoured class: top-1 is exactly its share of the subset.
    assert report["top1"] == pytest.approx(100.0 * int(labels[FAVOURED[0]]) / 300)
    assert report["top5"] == pytest.approx(100.0 * int(labels[FAVOURED].sum()) / 300)


def test_flip_tta_reports_the_mirror_averaged_figures(tmp_path, cifar100_data_dir):
    """--tta (the default) scores flip TTA's averaged logits and --no-tta the plain ones: the shipped
    weights on a 300-image subset, where the two answers differ."""
    from model import load_network
    from model.shipped import SHIPPED_WEIGHTS
    from training.data import load_split, subset
    from training.evaluation import accuracy, predict_logits

    images, labels = subset(*load_split(str(cifar100_data_dir), train=False), 300, seed=1)
    network = load_network(SHIPPED_WEIGHTS)
    expected = {tta: accuracy(predict_logits(network, images, labels, flip_tta=tta), labels) for tta in (False, True)}
    assert expected[True] != expected[False]
    for tta, flag in ((True, "--tta"), (False, "--no-tta")):
        out = tmp_path / f"{flag}.json"
        assert evaluate_module.main([str(SHIPPED_WEIGHTS), "--data-dir", str(cifar100_data_dir), "--test-subset",
                                     "300", flag, "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["flip_tta"] is tta
        assert (report["top1"], report["top5"]) == pytest.approx((expected[tta]["top1"], expected[tta]["top5"])), flag


@pytest.mark.parametrize("case, message", [
    ("missing", "no weights file at"),
    ("not_torch", "is not a readable PyTorch weights file"),
    ("other_network", "are not CIFAR100Model weights"),
    ("missing_key", "do not fit CIFAR100Model(width=1, num_classes=100)"),
    ("not_a_state_dict", "not a state dict of tensors"),
    ("dict_of_non_tensors", "not a state dict of tensors"),
])
def test_bad_weights_file_gets_one_clear_error(tmp_path, capsys, case, message):
    path = tmp_path / "weights.pth"
    if case == "not_torch":
        path.write_text("this is not a weights file\n")
    elif case == "other_network":
        torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    elif case == "missing_key":
        state = known_answer_state()
        del state["stage2.1.conv1.weight"]
        torch.save(state, path)
    elif case == "not_a_state_dict":
        torch.save([1, 2, 3], path)
    elif case == "dict_of_non_tensors":
        torch.save({"fc.weight": [[0.0] * 64] * 100, "fc.bias": [0.0] * 100}, path)
    # No data folder: a bad weights file is reported before the test split is read.
    rc = evaluate_module.main([str(path), "--data-dir", str(tmp_path / "no-data")])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_data_is_reported_for_good_weights(tmp_path, capsys):
    torch.save(known_answer_state(), tmp_path / "w.pth")
    rc = evaluate_module.main([str(tmp_path / "w.pth"), "--data-dir", str(tmp_path / "no-data")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 not found" in err and "--data-dir" in err and "CIFAR100_DATA" in err


def test_export_writes_a_half_precision_state_dict_that_loads_and_scores_the_same(tmp_path):
    """training.export: float16 storage of a seed-format state dict (how the width-10 file was made)."""
    from training import export

    torch.manual_seed(0)
    src = tmp_path / "w1.pth"
    net = CIFAR100Model(width=1).eval()
    torch.save(net.state_dict(), src)
    out = tmp_path / "half" / "w1_fp16.pth"
    assert export.main([str(src), str(out), "--dtype", "float16"]) == 0
    half = torch.load(out, map_location="cpu", weights_only=True)
    assert set(half) == set(net.state_dict())
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    assert half["stem.1.num_batches_tracked"].dtype == torch.int64  # integer buffers keep their dtype
    assert out.stat().st_size < 0.6 * src.stat().st_size
    reloaded = CIFAR100Model(width=1).eval()
    reloaded.load_state_dict(half, strict=True)  # the float32 network takes the float16 values
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(reloaded(x), net(x), atol=2e-2)
        assert torch.equal(reloaded(x).argmax(1), net(x).argmax(1))


def test_export_refuses_what_is_not_a_network(tmp_path, capsys):
    from training import export

    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    assert export.main([str(bad), str(tmp_path / "o.pth")]) == 2
    assert "not CIFAR100Model weights" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
