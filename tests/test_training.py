"""The training CLI on a few hundred real CIFAR-100 images (width 1, one thread, 1-3 epochs).

Most runs go through training.train.main in this process (a fresh interpreter per run would
cost more than the training); the Ctrl-C test needs its own process to send SIGINT to.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cifar100_data import data_dir
from ctrl_c import sigint_as_in_a_terminal, stopped_by
from model import SHIPPED_WEIGHTS, CIFAR100Model
from serving import cli
from training import train as train_module

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = data_dir()  # absolute: the tests below make symlinks into it
# Trains on CIFAR-100 (conftest.py stops the run with how to get it when it is missing).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cifar100_data_dir")]

def small_run(**options) -> list[str]:
    """CLI arguments of a run small enough for 2 busy cores (8 steps of 64 images per epoch, 200
    test images), with options overridden by keyword (data_dir="..." -> --data-dir ...)."""
    settings = {"data_dir": DATA_DIR, "train_subset": 512, "test_subset": 200, "width": 1, "batch_size": 64,
                "threads": 1, "seed": 3} | options
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


SMALL_RUN = small_run()


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """training.train and training.bench set torch's thread count (--threads 1) in this process:
    each test leaves it as it found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


METRICS_KEYS = {"top1", "top5", "history", "final_evaluation", "args", "hardware", "wall_time_s", "code_version"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two epochs straight, and the same two epochs as 1 + --resume 1, with code_version() counted."""
    base = tmp_path_factory.mktemp("train")
    versions = []

    def fake_code_version():
        versions.append(f"test-version-{len(versions) + 1}")
        return versions[-1]

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "code_version", fake_code_version)
        straight = base / "straight"
        with contextlib.redirect_stdout(io.StringIO()) as straight_said:
            assert train_module.main(SMALL_RUN + ["--epochs", "2", "--out", str(straight)]) == 0
        straight_versions = list(versions)
        split = base / "split"
        with contextlib.redirect_stdout(io.StringIO()) as first_half_said:
            assert train_module.main(SMALL_RUN + ["--epochs", "2", "--max-epochs-this-run", "1", "--out", str(split)]) == 0
        first_half = torch.load(split / "checkpoint.pt", map_location="cpu", weights_only=False)
        # Only this session's options: the run's own (width 1, 512 images, seed 3, 2 epochs, ...)
        # come from the checkpoint, as the bit-for-bit test below shows.
        assert train_module.main(["--resume", "--out", str(split), "--data-dir", str(DATA_DIR), "--threads", "1",
                                  "--no-progress"]) == 0
    torch.set_num_threads(threads)
    return {"straight": straight, "split": split, "first_half": first_half,
            "straight_versions": straight_versions, "versions": versions,
            "straight_said": straight_said.getvalue(), "first_half_said": first_half_said.getvalue()}


def test_a_session_stopped_by_max_epochs_this_run_says_how_to_continue(runs):
    """It ended with exit status 0 and nothing said after the last epoch's figures."""
    last = runs["first_half_said"].strip().splitlines()[-1]
    command = shlex.join([cli.python_command(), "-m", "training.train", "--resume", "--out", str(runs["split"])])
    assert last.startswith(f"stopped after epoch 1 of 2; continue with: {command}"), last
    assert "done:" not in runs["first_half_said"]


def test_a_test_subset_run_names_its_subset_not_the_test_split(runs):
    """SMALL_RUN scores 200 test images: the done: line, metrics.json said "test split"."""
    done = [line for line in runs["straight_said"].splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "(ema+flip_tta, test subset of 200 images)" in done[0], done
    metrics = json.loads((runs["straight"] / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test subset of 200 images" and metrics["test_images"] == 200


def test_resume_refuses_only_a_real_conflict(runs, capsys):
    split = str(runs["split"])
    assert train_module.main(["--resume", "--out", split, "--data-dir", str(DATA_DIR), "--width", "2"]) == 2
    assert "checkpoint was trained with --width 1, this run asks for 2" in capsys.readouterr().err


def test_smoke_run_loss_falls_and_writes_every_file(runs):
    out = runs["straight"]
    assert sorted(p.name for p in out.iterdir()) == [
        "CIFAR100_model.pth", "checkpoint.pt", "metrics.json", "training_curves.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRICS_KEYS <= metrics.keys()
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # Chance level is ln(100) = 4.61; 16 SGD steps on the same 512 images must bring it down.
    assert history[1]["train_loss"] < history[0]["train_loss"] - 0.03, history
    assert metrics["test_images"] == 200 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert set(metrics["final_evaluation"]) == {"raw", "raw+flip_tta", "ema", "ema+flip_tta"}
    assert metrics["args"]["width"] == 1 and metrics["hardware"]["device"] == "cpu"
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "CIFAR100_model.pth", map_location="cpu", weights_only=True)
    CIFAR100Model(width=1).load_state_dict(state, strict=True)  # plain, seed-compatible state dict


def test_export_and_final_figures_are_the_ema_updated_every_step(runs):
    """--ema (the default): CIFAR100_model.pth holds the EMA's weights, updated once a step (2 epochs
    of 8), not the raw ones, and metrics.json's top-1/top-5 are the EMA's with flip TTA."""
    checkpoint = torch.load(runs["straight"] / "checkpoint.pt", map_location="cpu", weights_only=False)
    exported = torch.load(runs["straight"] / "CIFAR100_model.pth", map_location="cpu", weights_only=True)
    assert int(checkpoint["ema"]["n_averaged"]) == 16
    assert exported.keys() == checkpoint["model"].keys()
    assert all(torch.equal(exported[k], checkpoint["ema"][f"module.{k}"]) for k in exported)
    assert not torch.equal(exported["fc.weight"], checkpoint["model"]["fc.weight"])
    metrics = json.loads((runs["straight"] / "metrics.json").read_text())
    assert metrics["evaluated_as"] == "ema+flip_tta" and metrics["weights_are"] == "ema"
    final = metrics["final_evaluation"]["ema+flip_tta"]
    assert (metrics["top1"], metrics["top5"]) == (final["top1"], final["top5"])


def test_epoch_schedule_warms_up_then_decays_to_zero_at_the_last_step(runs):
    lr = train_module.lr_factor
    # 24 steps, 8 of warm-up: from lr/10 up to the peak where the warm-up ends, then cosine to 0.
    assert lr(0, 24, 8, "cosine") == pytest.approx(0.1) and lr(4, 24, 8, "cosine") == pytest.approx(0.55)
    assert lr(8, 24, 8, "cosine") == pytest.approx(1.0)
    assert lr(16, 24, 8, "cosine") == pytest.approx(0.5) and lr(16, 24, 8, "onecycle") == pytest.approx(0.5)
    assert lr(24, 24, 8, "cosine") == pytest.approx(0.0) and lr(24, 24, 8, "onecycle") == pytest.approx(0.0)
    assert lr(0, 24, 0, "cosine") == 1.0  # --warmup-epochs 0: the peak from the first step
    # The 2-epoch run (8 steps an epoch, 1 epoch of warm-up, lr 0.1): each epoch's last step.
    history = json.loads((runs["straight"] / "metrics.json").read_text())["history"]
    assert [h["lr_end"] for h in history] == pytest.approx(
        [0.1 * (0.1 + 0.9 * 7 / 8), 0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 8))])


def test_resume_repeats_an_uninterrupted_run_bit_for_bit(runs):
    assert runs["first_half"]["epoch"] == 1
    straight = torch.load(runs["straight"] / "checkpoint.pt", map_location="cpu", weights_only=False)
    resumed = torch.load(runs["split"] / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert straight["epoch"] == resumed["epoch"] == 2
    # The resumed epoch really trained: the weights moved away from the first half's.
    assert not torch.equal(runs["first_half"]["model"]["fc.weight"], resumed["model"]["fc.weight"])
    for part in ("model", "ema"):
        assert straight[part].keys() == resumed[part].keys()
        for name in straight[part]:
            assert torch.equal(straight[part][name], resumed[part][name]), f"{part}.{name}"
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    exported_straight = torch.load(runs["straight"] / "CIFAR100_model.pth", weights_only=True)
    exported_resumed = torch.load(runs["split"] / "CIFAR100_model.pth", weights_only=True)
    assert all(torch.equal(exported_straight[k], exported_resumed[k]) for k in exported_straight)
    h_straight = json.loads((runs["straight"] / "metrics.json").read_text())["history"]
    h_resumed = json.loads((runs["split"] / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in h_straight] == [h["train_loss"] for h in h_resumed]


def test_resuming_with_another_number_of_processes_says_so(runs, tmp_path, capsys):
    """The checkpoint did not record how many processes trained it: resuming with another count was silent.
    (A checkpoint of a 2-process run stands in for a torchrun one; one without the key: unknown, nothing said.)"""
    assert runs["first_half"]["world"] == 1
    two = tmp_path / "two"
    two.mkdir()
    torch.save(runs["first_half"] | {"world": 2}, two / "checkpoint.pt")
    resume = ["--resume", "--out", str(two), "--data-dir", str(DATA_DIR), "--threads", "1", "--no-progress"]
    capsys.readouterr()
    assert train_module.main(resume) == 0
    said = capsys.readouterr().out
    assert "note: resuming with changed options: processes 2 -> 1 (1 x --batch-size images a step" in said, said
    unknown = {k: v for k, v in runs["first_half"].items() if k != "world"}
    assert train_module.changed_options(unknown, argparse.Namespace(**unknown["args"]), 2) == []
    # What the note says of the lr: its position is the epochs done, whatever the steps an epoch.
    lr = train_module.lr_factor
    assert lr(1 * 8, 3 * 8, 8 // 4, "cosine") == pytest.approx(lr(1 * 4, 3 * 4, 4 // 4, "cosine"))


def test_resume_with_fp16_after_a_run_without_a_loss_scale_starts_a_fresh_one(tmp_path, capsys):
    """A float32 (or bf16) run saves a disabled GradScaler's empty state; resumed with --amp fp16 (or by
    amp=auto on a GPU without bf16) the run needs a scaler: it gets a fresh one, not a traceback."""
    out = tmp_path / "amp"
    assert train_module.main(small_run(train_subset=128, test_subset=50) + [
        "--epochs", "2", "--max-epochs-this-run", "1", "--amp", "off", "--no-ema", "--no-tta", "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["scaler"] == {}
    assert train_module.main(["--resume", "--out", str(out), "--amp", "fp16", "--data-dir", str(DATA_DIR),
                              "--threads", "1", "--no-progress"]) == 0
    assert "no fp16 loss scale" in capsys.readouterr().out
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["scaler"]["scale"] > 0  # the fresh scaler, saved this time


DDP_EVALUATE_WORKER = """
import json, sys, torch, torch.distributed as dist
from model import load_network
from training import train
from training.evaluation import predict_logits
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
args = train.build_parser().parse_args(["--eval-batch-size", "100", "--amp", "off"])
run = train.Run(args, torch.device("cpu"), None, rank, world)
images = torch.randint(0, 256, (200, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
reference = load_network(sys.argv[1])  # the shipped weights: the same on both ranks
labels = torch.empty(200, dtype=torch.int64)  # its own answers, each rank's share scored as evaluate() scores it
for r in range(world):
    labels[r::world] = predict_logits(reference, images[r::world], labels[r::world], 100).argmax(1)
model = load_network(sys.argv[1])
if rank == 1:  # what a rank's own batches do to its BatchNorm statistics, exaggerated
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.add_(3.0)
result = {"reference": train.evaluate(run, reference, images, labels), "model": train.evaluate(run, model, images, labels)}
if rank == 0:
    print(json.dumps(result))
dist.destroy_process_group()
"""


def test_ddp_evaluation_scores_rank_0s_batchnorm_statistics_on_every_rank(tmp_path):
    """Under torchrun each rank scores every world-th image; its BatchNorm running statistics (and its
    EMA's) come from its own batches, so the per-epoch figure mixed differently normalised networks,
    not the one checkpoint.pt saves (2 gloo processes; the labels are the shipped network's own answers,
    so rank 0's network scores 100%)."""
    script = tmp_path / "ddp_evaluate.py"
    script.write_text(DDP_EVALUATE_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(SHIPPED_WEIGHTS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reference"]["top1"] == 100.0
    assert result["model"] == result["reference"]


def test_code_version_is_taken_once_at_the_start_and_recorded(runs):
    # One call per run; the checkpoint written after epoch 1 already holds it.
    assert runs["straight_versions"] == ["test-version-1"]
    assert runs["versions"] == ["test-version-1", "test-version-2", "test-version-3"]
    assert runs["first_half"]["code_version"] == "test-version-2"
    straight = json.loads((runs["straight"] / "metrics.json").read_text())
    assert straight["code_version"] == "test-version-1" and "resumed_from_code_version" not in straight
    resumed = json.loads((runs["split"] / "metrics.json").read_text())
    assert resumed["code_version"] == "test-version-3"
    assert resumed["resumed_from_code_version"] == "test-version-2"


@pytest.mark.parametrize("option, value", [("--width", "2"), ("--num-classes", "10"), ("--holdout", "100")])
def test_checkpoint_of_another_shape_is_refused_before_training(runs, tmp_path, capsys, option, value):
    shutil.copy(runs["straight"] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    # A data folder that does not exist: the refusal must come before any data is read.
    args = small_run(data_dir=tmp_path / "no-data-here", **{option.removeprefix("--").replace("-", "_"): value})
    rc = train_module.main(args + ["--epochs", "3", "--resume", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{option} " in err and value in err and "checkpoint was trained with" in err, err
    assert "CIFAR-100 not found" not in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 2  # untouched


def test_a_diverged_run_is_one_error_line_not_a_traceback(tmp_path, capsys):
    rc = train_module.main(small_run(lr=1e8, warmup_epochs=0, amp="off") + ["--epochs", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: loss became nan at epoch 1") and "lower --lr" in err, err
    assert "Traceback" not in err and not (tmp_path / "checkpoint.pt").exists()


def test_resuming_a_finished_run_says_so_and_evaluates_nothing_again(runs, tmp_path, capsys, monkeypatch):
    """--resume on a run that had trained all its --epochs quietly ran the final evaluation again and printed
    "done:". Now it says it is finished, before any data is read; without its metrics.json (stopped during its
    final evaluation) that evaluation runs again, said as a spent --time-budget's is."""
    for name in ("checkpoint.pt", "metrics.json"):
        shutil.copy(runs["straight"] / name, tmp_path / name)
    resume = ["--resume", "--out", str(tmp_path), "--threads", "1", "--no-progress"]
    capsys.readouterr()
    assert train_module.main(resume + ["--data-dir", str(tmp_path / "no-data-here")]) == 0
    said = capsys.readouterr().out
    assert "already finished: 2 of 2 epochs; nothing to resume" in said and "done:" not in said, said
    (tmp_path / "metrics.json").unlink()
    assert train_module.main(resume + ["--data-dir", str(DATA_DIR)]) == 0
    said = capsys.readouterr().out
    assert "note: the run is done: all 2 epochs trained" in said and "done: top-1" in said, said
    assert json.loads((tmp_path / "metrics.json").read_text())["history"] == torch.load(
        tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["history"]


def test_resume_from_a_weights_file_says_what_to_pass(runs, tmp_path, capsys):
    weights = runs["straight"] / "CIFAR100_model.pth"
    rc = train_module.main(SMALL_RUN + ["--resume", str(weights), "--out", str(tmp_path)])
    assert rc == 2
    assert "not a training checkpoint" in capsys.readouterr().err
    rc = train_module.main(SMALL_RUN + ["--resume", "--out", str(tmp_path / "empty")])
    assert rc == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_missing_data_names_the_option_and_the_variable(tmp_path, capsys):
    rc = train_module.main(["--data-dir", str(tmp_path / "nowhere"), "--width", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "CIFAR-100 not found" in err and "--data-dir" in err and "CIFAR100_DATA" in err and "--download" in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
    # Pointing at cifar-100-python/ itself is the usual slip; the message names the parent.
    rc = train_module.main(["--data-dir", str(DATA_DIR / "cifar-100-python"), "--width", "1",
                            "--out", str(tmp_path / "o")])
    assert rc == 2
    assert f"pass its parent, '{DATA_DIR}'" in capsys.readouterr().err


def test_corrupted_data_reports_the_integrity_failure(tmp_path, capsys):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("meta", "test"):
        (folder / name).symlink_to(DATA_DIR / "cifar-100-python" / name)
    with open(DATA_DIR / "cifar-100-python" / "train", "rb") as whole:
        (folder / "train").write_bytes(whole.read(1 << 20))  # a truncated download
    rc = train_module.main(["--data-dir", str(tmp_path), "--width", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "integrity check" in err and "md5" in err and "truncated or altered" in err, err


def test_ctrl_c_mid_epoch_keeps_the_last_finished_epochs_checkpoint(tmp_path):
    out = tmp_path / "run"
    # Progress bars on (--progress: stderr is a pipe here, which gets none by default): the epoch 2
    # bar showing a finished step tells us the run is mid-epoch 2.
    # 16 steps an epoch, so the signal lands well before epoch 2 ends even on a fast machine.
    args = [a for a in small_run(train_subset=1024) if a != "--no-progress"] + ["--progress"]
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *args, "--epochs", "3", "--out", str(out)],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=sigint_as_in_a_terminal)
    stderr, mid_epoch_2 = [], threading.Event()
    step_done_in_epoch_2 = re.compile(r"epoch 2/3:[^|]*\|[^|]*\| *([1-9]|1[0-5])/16")

    def read_stderr():
        for chunk in iter(lambda: proc.stderr.read(64), ""):
            stderr.append(chunk)
            if step_done_in_epoch_2.search("".join(stderr)):
                mid_epoch_2.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        # Generous: a busy 2-core machine can take minutes; an idle one takes seconds.
        assert mid_epoch_2.wait(timeout=600), "".join(stderr)[-2000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    text = "".join(stderr)
    assert rc in stopped_by(signal.SIGINT), text[-2000:]
    assert "interrupted: the last finished epoch's checkpoint is intact" in text
    python = cli.python_command(ROOT)  # the child's working folder
    assert f"continue with: {shlex.quote(python)} -m training.train --resume --out {out}" in text  # not runs/latest's
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1
    CIFAR100Model(width=1).load_state_dict(checkpoint["model"], strict=True)
    assert not list(out.glob("*.tmp")) and not (out / "metrics.json").exists()


def test_ctrl_c_before_this_runs_first_epoch_never_offers_the_replaced_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """MOCK: Ctrl-C is raised by a patched train_one_epoch (after the checkpoint is read, before any save).
    An --overwrite run into OUT, or --resume A --out B --overwrite: OUT's checkpoint is the earlier run's, and
    `continue with` would resume that one. Resumed from OUT's own checkpoint, it is this run's."""
    earlier, other = tmp_path / "earlier", tmp_path / "other"
    assert train_module.main(SMALL_RUN + ["--epochs", "2", "--max-epochs-this-run", "1", "--out", str(earlier)]) == 0
    other.mkdir()
    shutil.copy(earlier / "checkpoint.pt", other / "checkpoint.pt")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    capsys.readouterr()
    assert train_module.main(SMALL_RUN + ["--epochs", "2", "--overwrite", "--out", str(earlier)]) == 130
    err = capsys.readouterr().err
    assert "continue with" not in err and "no checkpoint of this run yet" in err, err
    session = ["--data-dir", str(DATA_DIR), "--threads", "1", "--no-progress"]
    resume_a = ["--resume", str(earlier / "checkpoint.pt"), "--out", str(other), "--overwrite"] + session
    assert train_module.main(resume_a) == 130
    err = capsys.readouterr().err
    assert "continue with" not in err and "by running the same command again" in err, err
    assert train_module.main(["--resume", "--out", str(earlier)] + session) == 130
    err = capsys.readouterr().err
    assert f"checkpoint is intact; continue with: {shlex.quote(cli.python_command())} -m training.train --resume " \
           f"--out {earlier}" in err, err


def test_test_subset_is_one_draw_whatever_the_seed_and_training_evaluates_own():
    """--test-subset drew with --seed + 1: arms of an ablation with different seeds were scored on different
    images. Seed 1 for all: the draw seed-0 runs made (their recorded figures stand) and training.evaluate's."""
    from training.data import load_split, subset

    drawn = []
    for seed in (0, 7):
        args = train_module.build_parser().parse_args(["--data-dir", str(DATA_DIR), "--train-subset", "64",
                                                       "--test-subset", "50", "--seed", str(seed)])
        drawn.append(train_module.load_data(train_module.Run(args, torch.device("cpu"), None))[2:4])
    evaluated = subset(*load_split(DATA_DIR, train=False), 50, seed=1)
    for images, labels in drawn:
        assert torch.equal(images, evaluated[0]) and torch.equal(labels, evaluated[1])


def test_holdout_is_one_fixed_draw_disjoint_from_the_training_images():
    images = torch.arange(1000).view(1000, 1, 1, 1).expand(1000, 3, 2, 2).to(torch.uint8)
    labels = torch.arange(1000)
    train_x, train_y, held_x, held_y = train_module.holdout_split(images, labels, 100)
    assert len(held_y) == 100 and len(train_y) == 900
    assert not set(held_y.tolist()) & set(train_y.tolist())
    assert torch.equal(train_module.holdout_split(images, labels, 100)[3], held_y)  # the same draw every run
    with pytest.raises(train_module.ConfigError, match="--holdout 1000"):
        train_module.holdout_split(images, labels, 1000)


def test_holdout_run_is_scored_on_held_out_training_images_and_trains_on_the_rest():
    """--holdout: what the run evaluates on is the training split's held-out draw (never the test
    split), and what it trains on is the rest of the training split."""
    from training.data import load_split

    args = train_module.build_parser().parse_args(small_run(holdout=300, test_subset=100))
    train_x, train_y, test_x, test_y, _ = train_module.load_data(train_module.Run(args, torch.device("cpu"), None))
    _, _, held_x, _ = train_module.holdout_split(*load_split(str(DATA_DIR), train=True), 300)
    as_set = lambda images: {bytes(image.flatten().tolist()) for image in images}
    held = as_set(held_x)
    assert len(test_y) == 100 and as_set(test_x) <= held
    assert len(train_y) == 512 and not as_set(train_x) & held


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """training.runtime.atomic_save (every checkpoint.pt and the export): a save that fails half-way
    (an unpicklable value here; a Ctrl-C or a full disk in life) never replaces the good file."""
    from training.runtime import atomic_save

    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(Exception):
        atomic_save({"epoch": 2, "weights": torch.zeros(3), "broken": lambda: None}, path)
    kept = torch.load(path, map_location="cpu", weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["weights"], torch.ones(3))


def test_label_smoothing_reaches_the_training_loss(tmp_path):
    """The same seeded epoch (2 steps from the same initial weights) with --label-smoothing 0 and with
    the default 0.1: only the targets differ, so the recorded losses must differ too."""
    losses = {}
    for name, extra in (("off", ["--label-smoothing", "0"]), ("default", [])):
        out = tmp_path / name
        assert train_module.main(small_run(train_subset=128, test_subset=50) + [
            "--epochs", "1", "--no-ema", "--no-tta", "--out", str(out)] + extra) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        losses[name] = metrics["history"][0]["train_loss"]
    assert metrics["args"]["label_smoothing"] == 0.1
    assert abs(losses["default"] - losses["off"]) > 1e-4, losses


def test_mixup_cutmix_run_on_a_holdout_says_what_it_was_evaluated_on(tmp_path, capsys, monkeypatch):
    """metrics.json, the done: line and the curves' legend all name the holdout (they said "test")."""
    from matplotlib.figure import Figure

    legends, savefig = [], Figure.savefig

    def savefig_noting_the_legend(fig, *args, **kwargs):
        legends.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig_noting_the_legend)
    out = tmp_path / "mix"
    assert train_module.main(small_run(holdout=300, test_subset=150, mixup=0.2, cutmix=1.0, mix_prob=0.8)
                             + ["--epochs", "1", "--no-ema", "--no-tta", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "150 of a holdout of 300 training images" and metrics["test_images"] == 150
    assert "(raw, 150 of a holdout of 300 training images)" in capsys.readouterr().out
    assert legends and all("top-1, 150 of a holdout of 300 training images" in texts for texts in legends), legends
    assert not any("test" in text for texts in legends for text in texts)
    assert metrics["args"]["mixup"] == 0.2 and metrics["args"]["cutmix"] == 1.0
    assert 0.0 < metrics["history"][0]["train_loss"] < 10  # soft targets: a finite cross-entropy


def _res_args(**options):
    import argparse
    return argparse.Namespace(**({"min_res": 16, "res_ramp": None, "epochs": 10} | options))


def test_progressive_resizing_schedule_grows_to_full_size_and_ends_there():
    schedule = lambda **o: [train_module.train_resolution(e, _res_args(**o)) for e in range(1, _res_args(**o).epochs + 1)]
    # Default ramp: from half-way (epoch 5) to 85% (epoch 8), in steps of 4 pixels.
    assert schedule() == [16, 16, 16, 16, 16, 20, 28, 32, 32, 32]
    assert schedule(res_ramp=[2, 4], epochs=5, min_res=24) == [24, 24, 28, 32, 32]
    assert schedule(min_res=32) == [32] * 10  # off
    for epochs in range(1, 60):
        for min_res in (8, 16, 24, 30):
            s = schedule(epochs=epochs, min_res=min_res)
            assert s[-1] == 32 and s == sorted(s) and min(s) >= min_res, (epochs, min_res, s)


@pytest.mark.parametrize("options, message", [(["--min-res", "40"], "--min-res 40"), (["--eval-every", "0"], "--eval-every 0"),
                                               (["--min-res", "16", "--res-ramp", "3", "2"], "--res-ramp 3 2"),
                                               (["--min-res", "16", "--res-ramp", "1", "9"], "--res-ramp 1 9")])
def test_impossible_resizing_options_are_refused_with_the_option_named(tmp_path, capsys, options, message):
    assert train_module.main(SMALL_RUN + ["--epochs", "2", "--out", str(tmp_path / "r")] + options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_progressive_resizing_run_feeds_the_network_small_images_then_full_ones(tmp_path, monkeypatch):
    seen = []  # (training?, side) of every batch the network was given
    forward = CIFAR100Model.forward
    monkeypatch.setattr(CIFAR100Model, "forward", lambda self, x: seen.append((self.training, x.shape[-1])) or forward(self, x))
    out = tmp_path / "progressive"
    assert train_module.main(SMALL_RUN + ["--epochs", "3", "--min-res", "16", "--res-ramp", "1", "3", "--no-ema",
                                          "--no-tta", "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["train_res"] for h in history] == [16, 24, 32]
    trained_sides = [side for training, side in seen if training]
    assert trained_sides == [16] * 8 + [24] * 8 + [32] * 8  # 8 steps of 64 images per epoch
    assert {side for training, side in seen if not training} == {32}  # evaluated at the served size


def test_time_budget_schedules_follow_the_share_of_time_spent():
    lr = train_module.lr_factor
    # The warm-up still counts steps; after it the decay follows the budget's share spent.
    assert lr(0, 0, 10, "onecycle", spent=0.0) == pytest.approx(0.1)
    assert lr(10, 0, 10, "onecycle", spent=0.02) == pytest.approx(0.98)
    assert lr(500, 0, 10, "onecycle", spent=0.5) == pytest.approx(0.5)
    assert lr(500, 0, 10, "cosine", spent=0.5) == pytest.approx(0.5)
    assert lr(900, 0, 10, "onecycle", spent=1.2) == 0.0 and lr(900, 0, 10, "cosine", spent=1.2) == pytest.approx(0.0)
    args = _res_args(min_res=16, epochs=None, time_budget=1.0)
    start, end = train_module.BUDGET_RES_RAMP
    sides = [train_module.train_resolution(1, args, spent=s / 100) for s in range(0, 101)]
    assert sides == sorted(sides) and sides[0] == 16 and sides[-1] == 32
    assert train_module.train_resolution(1, args, spent=start) == 16
    assert train_module.train_resolution(1, args, spent=end) == 32


@pytest.mark.wall_clock
def test_time_budget_run_fits_its_budget_across_a_resume_and_ends_annealed(tmp_path):
    """A 10-second budget: the first session stops after 2 epochs (--max-epochs-this-run), the second
    after one more, the third carries on to the end, all on one clock; training and the final
    evaluation end inside the budget, having used most of it, with the learning rate near zero and
    the resolution grown to 32. Resumed after that, the finished run trains no further."""
    out, budget_s = tmp_path / "budget", 10
    # 4 steps an epoch: the last epoch starts past the 70% at which the resolution reaches 32 even when a loaded
    # 2-core AMD EPYC Zen 1 keeps 3.4 s of the 10 for the final evaluation and takes 2 s an epoch of 8 steps.
    run = small_run(train_subset=256) + ["--time-budget", str(budget_s / 60), "--min-res", "16", "--eval-every", "3", "--no-ema",
                       "--no-tta", "--out", str(out)]
    assert train_module.main(run + ["--max-epochs-this-run", "2"]) == 0
    assert not (out / "metrics.json").exists()  # not finished: the budget is not spent
    resume = ["--resume", "--out", str(out), "--data-dir", str(DATA_DIR), "--threads", "1", "--no-progress"]
    # One clock for every session: one more epoch resumed adds its time to the wall time the first kept.
    before = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["wall_time_s"]
    assert train_module.main(resume + ["--max-epochs-this-run", "1"]) == 0
    after = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert after["epoch"] == 3 and after["wall_time_s"] >= before + after["history"][-1]["epoch_time_s"]
    assert train_module.main(resume) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    total = metrics["wall_time_s"] + metrics["final_evaluation_s"]
    assert 0.6 * budget_s < total <= budget_s + 1, total
    assert len(history) > 2 and metrics["time_budget"]["epochs"] == len(history)
    assert metrics["args"]["epochs"] is None and metrics["args"]["time_budget"] == budget_s / 60
    assert history[0]["train_res"] == 16 and history[-1]["train_res"] == 32
    assert [h["train_res"] for h in history] == sorted(h["train_res"] for h in history)
    assert history[-1]["lr_end"] < 0.05 * metrics["args"]["lr"] < history[0]["lr_end"]
    assert history[-1]["test_top1"] is not None  # the last epoch is scored whatever --eval-every says
    assert all(h["steps"] == 4 for h in history[:-1]) and 1 <= history[-1]["steps"] <= 4
    # Resumed once more, a run whose budget is spent trains no further.
    assert train_module.main(resume) == 0
    assert json.loads((out / "metrics.json").read_text())["history"] == history


@pytest.mark.wall_clock
def test_a_larger_time_budget_given_on_resume_continues_a_finished_run(tmp_path, capsys):
    """A spent 6 s budget resumed with --time-budget 0.15 (9 s) trains on to it; resumed then with a smaller one,
    the run is done (it trains nothing) and keeps the budget it was trained to. (A 3 s budget was refused on a
    2-core AMD EPYC Zen 1: the final evaluation of 200 images was estimated at 3.4 s there.)"""
    out = tmp_path / "longer"
    run = SMALL_RUN + ["--time-budget", "0.1", "--no-ema", "--no-tta", "--out", str(out)]
    assert train_module.main(run) == 0
    first = json.loads((out / "metrics.json").read_text())
    resume = ["--resume", "--out", str(out), "--data-dir", str(DATA_DIR), "--threads", "1", "--no-progress"]
    capsys.readouterr()
    assert train_module.main(resume + ["--time-budget", "0.15"]) == 0
    longer = json.loads((out / "metrics.json").read_text())
    assert longer["history"][:len(first["history"])] == first["history"]
    assert len(longer["history"]) > len(first["history"]) and longer["time_budget"]["minutes"] == 0.15
    said = capsys.readouterr().out
    assert "note: the run's 0.1 min budget was spent; continuing to 0.15 min" in said, said
    assert longer["wall_time_s"] > first["wall_time_s"] + 1.5
    assert longer["wall_time_s"] + longer["final_evaluation_s"] <= 9 + 1
    assert train_module.main(resume + ["--time-budget", "0.125"]) == 0
    said = capsys.readouterr().out
    assert "note: the run is done: its 0.15 min budget was spent" in said, said
    done = json.loads((out / "metrics.json").read_text())
    assert done["history"] == longer["history"] and done["time_budget"]["minutes"] == 0.15


def test_a_budget_spent_between_epochs_still_ends_on_a_scored_step(tmp_path, monkeypatch):
    """The budget runs out while an epoch is saved (a stand-in clock: 9 readings an epoch, one
    for its size and one per step, the 19th reads 100%): the next epoch takes one step and is
    the last, evaluated although --eval-every would skip it."""
    readings = []

    def clock(self):
        if self.train_budget_s is None:
            return None
        readings.append(None)
        return len(readings) / 19

    monkeypatch.setattr(train_module.Run, "spent", clock)
    out = tmp_path / "between"
    assert train_module.main(SMALL_RUN + ["--time-budget", "5", "--eval-every", "5", "--no-ema", "--no-tta",
                                          "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["steps"] for h in history] == [8, 8, 1]
    assert [h["test_top1"] is None for h in history] == [True, True, False]
    assert history[-1]["lr_end"] == 0.0


@pytest.mark.parametrize("options, message", [
    (["--time-budget", "1", "--epochs", "3"], "--epochs and --time-budget both"),
    (["--time-budget", "1", "--min-res", "16", "--res-ramp", "1", "2"], "--res-ramp counts epochs"),
])
def test_impossible_time_budget_options_are_refused(tmp_path, capsys, options, message):
    assert train_module.main(SMALL_RUN + ["--out", str(tmp_path / "r")] + options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_time_budget_shorter_than_the_final_evaluation_is_refused_before_training(tmp_path, capsys):
    """0.001 min (0.06 s) is less than the saving alone (SAVING_S): the run would never spend its budget.
    --max-epochs-this-run 1 ends such a run that is not refused."""
    out = tmp_path / "short"
    assert train_module.main(SMALL_RUN + ["--time-budget", "0.001", "--max-epochs-this-run", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --time-budget 0.001: 0.1 s leaves no time to train after the" in err, err
    assert "s the final evaluation takes on this host: give more minutes" in err
    assert not (out / "checkpoint.pt").exists()


def test_training_bench_prints_the_cost_of_each_resolution(capsys):
    from training import bench

    bench.main(["--data-dir", str(DATA_DIR), "--widths", "1", "--resolutions", "16", "32", "--steps", "2",
                "--warmup", "1", "--batch-size", "32", "--threads", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["1"]]
    assert [row[1] for row in rows] == ["16", "32"]
    assert float(rows[0][2]) > 0 and rows[1][3] == "1.00x"


def test_eval_every_skips_the_evaluations_between_and_always_scores_the_last_epoch(tmp_path):
    out = tmp_path / "sparse"
    assert train_module.main(SMALL_RUN + ["--epochs", "3", "--eval-every", "2", "--no-ema", "--no-tta",
                                          "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["test_top1"] is None for h in metrics["history"]] == [True, False, False]  # epochs 2 and 3 (the last)
    assert metrics["history"][-1]["test_top5"] >= metrics["history"][-1]["test_top1"] >= 0
    assert (out / "training_curves.png").stat().st_size > 0


@pytest.mark.wall_clock
def test_training_bench_plans_the_most_epochs_that_fit_a_budget(capsys):
    from training import bench

    plan = ["--data-dir", str(DATA_DIR), "--widths", "1", "--steps", "2", "--warmup", "1", "--batch-size", "32",
            "--threads", "1", "--plan-minutes", "5", "--min-res", "16", "--eval-every", "2",
            "--train-images", "2000", "--test-images", "200"]
    bench.main(plan)
    bench.main(plan + ["--res-ramp", "6", "9"])
    out = capsys.readouterr().out
    assert all(f"{r} px" in out for r in (16, 20, 24, 28, 32))  # every size the schedule can use, measured
    found = re.search(r"--epochs (\d+) --min-res 16 --eval-every 2: ([\d.]+) min estimated \(budget 5; (\d+) epochs: ([\d.]+) min\)", out)
    assert found, out
    epochs, estimate, more, more_estimate = int(found[1]), float(found[2]), int(found[3]), float(found[4])
    assert epochs >= 1 and more == epochs + 1 and estimate <= 5 <= more_estimate
    # A fixed ramp is planned as given, and never cut short of its end.
    ramped = re.search(r"--epochs (\d+) --min-res 16 --res-ramp 6 9 --eval-every 2: ([\d.]+) min estimated", out)
    assert ramped and int(ramped[1]) >= 9 and float(ramped[2]) <= 5, out


def test_training_bench_plans_the_final_evaluation_of_both_networks_with_ema(capsys, monkeypatch):
    """training.train's finish() scores the raw and (--ema, its default) the EMA weights, each plain and
    with flip TTA: the plan counted one network's (stand-in timings: 40 s an epoch, 2 s an evaluation,
    10 s the final one of one network; 3 minutes)."""
    from training import bench

    monkeypatch.setattr(bench, "bench_fast", lambda *args, **kwargs: 1000.0)  # 40,000 images: 40 s an epoch
    monkeypatch.setattr(bench, "evaluation_seconds", lambda *args, **kwargs: (2.0, 10.0))
    plan = ["--data-dir", str(DATA_DIR), "--widths", "1", "--plan-minutes", "3", "--train-images", "40000"]
    bench.main(plan + ["--no-ema"])
    bench.main(plan)
    out = capsys.readouterr().out
    # 4 epochs: 4 x (40 + 2) + 10 = 178 s fit 180 s, but not with the EMA's 10 s more.
    assert re.findall(r"the final one ([\d.]+) s", out) == ["10.0", "20.0"], out
    assert re.findall(r"--epochs (\d+) ", out) == ["4", "3"], out


def test_kd_loss_is_zero_on_the_teachers_own_answers_and_pulls_the_student_toward_them():
    from training.distillation import kd_loss

    torch.manual_seed(0)
    teacher = torch.randn(8, 100) * 3
    assert kd_loss(teacher, teacher, 4.0).abs() < 1e-5
    student = torch.zeros(8, 100, requires_grad=True)
    kd_loss(student, teacher, 4.0).backward()
    # A gradient step raises the logits the teacher rates highest: its argmax gains most.
    assert torch.equal((-student.grad).argmax(1), teacher.argmax(1))


def _soft_label_file(path: Path, logits: torch.Tensor, labels: torch.Tensor) -> Path:
    from training import distillation

    torch.save({"format": distillation.FORMAT, "logits": logits.half(), "labels_sha256": distillation.labels_sha256(labels),
                "teachers": [{"file": "made-by-the-test", "sha256": "0" * 64}]}, path)
    return path


def test_soft_labels_follow_their_images_through_holdout_subset_and_shuffle(tmp_path, monkeypatch):
    """A teacher whose logits name each training image's own label: every batch's teacher rows must
    name that batch's labels, after --holdout, --train-subset and the epoch's shuffle."""
    from training.data import load_split

    labels = load_split(str(DATA_DIR), train=True)[1]
    soft = _soft_label_file(tmp_path / "soft.pt", 10 * torch.nn.functional.one_hot(labels, 100).float(), labels)
    seen = []
    original = train_module.batches

    def checking(*args, **kwargs):
        for x, y, t in original(*args, **kwargs):
            seen.append(torch.equal(t.argmax(1), y))
            yield x, y, t

    monkeypatch.setattr(train_module, "batches", checking)
    out = tmp_path / "kd"
    assert train_module.main(small_run(holdout=300, test_subset=150) + [
        "--epochs", "2", "--no-ema", "--no-tta", "--soft-labels", str(soft), "--out", str(out)]) == 0
    assert len(seen) == 16 and all(seen)  # 2 epochs of 8 batches
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["soft_labels"]["teachers"][0]["file"] == "made-by-the-test"
    assert metrics["args"]["kd_weight"] == 0.9 and metrics["args"]["kd_temperature"] == 4.0


def test_soft_labels_change_what_the_student_learns(tmp_path):
    """The same seeded run with and without a teacher that contradicts the labels (it names the next
    class): the distilled run's loss and weights differ, so the teacher's term is really trained on."""
    from training.data import load_split

    labels = load_split(str(DATA_DIR), train=True)[1]
    wrong = _soft_label_file(tmp_path / "wrong.pt", 10 * torch.nn.functional.one_hot((labels + 1) % 100, 100).float(), labels)
    for name, extra in (("plain", []), ("taught", ["--soft-labels", str(wrong), "--kd-weight", "1.0"])):
        assert train_module.main(SMALL_RUN + ["--epochs", "1", "--no-ema", "--no-tta", "--out",
                                              str(tmp_path / name)] + extra) == 0
    plain, taught = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("plain", "taught"))
    assert abs(plain["history"][0]["train_loss"] - taught["history"][0]["train_loss"]) > 0.05
    a, b = (torch.load(tmp_path / n / "CIFAR100_model.pth", weights_only=True) for n in ("plain", "taught"))
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


@pytest.mark.parametrize("options, message", [
    (["--mixup", "0.2"], "--soft-labels with --mixup"),
    (["--kd-weight", "1.5"], "--kd-weight 1.5"),
])
def test_impossible_distillation_options_are_refused(tmp_path, capsys, options, message):
    from training.data import load_split

    labels = load_split(str(DATA_DIR), train=True)[1]
    soft = _soft_label_file(tmp_path / "soft.pt", torch.zeros(len(labels), 100), labels)
    assert train_module.main(SMALL_RUN + ["--epochs", "1", "--soft-labels", str(soft), "--out", str(tmp_path / "x")]
                             + options) == 2
    assert message in capsys.readouterr().err


def test_soft_labels_of_other_data_or_not_a_soft_label_file_are_refused_by_name(tmp_path, capsys):
    from training import distillation
    from training.data import load_split

    labels = load_split(str(DATA_DIR), train=True)[1]
    other = _soft_label_file(tmp_path / "other.pt", torch.zeros(len(labels), 100), labels.flip(0))
    assert train_module.main(SMALL_RUN + ["--epochs", "1", "--soft-labels", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "made for other training labels" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    torch.save({"not": "soft labels"}, junk)
    assert train_module.main(SMALL_RUN + ["--epochs", "1", "--soft-labels", str(junk), "--out", str(tmp_path / "b")]) == 2
    assert "not a file of python -m training.distillation" in capsys.readouterr().err
    # Not a zip at all (an UnpicklingError from torch.load), and the right format with no labels' hash:
    # one line each (they were a traceback and a KeyError).
    text = tmp_path / "text.pt"
    text.write_text("junk\n")
    no_hash = tmp_path / "no-hash.pt"
    torch.save({"format": distillation.FORMAT, "logits": torch.zeros(len(labels), 100, dtype=torch.float16)}, no_hash)
    for bad, message in ((text, f"--soft-labels {text}: cannot read it"), (no_hash, f"--soft-labels {no_hash}: made for other training labels")):
        assert train_module.main(SMALL_RUN + ["--epochs", "1", "--soft-labels", str(bad), "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_distillation_stores_the_teachers_mean_flip_logits_in_the_precision_asked(tmp_path, monkeypatch):
    """Two teachers on the first 300 training images: the file holds the mean of their float32
    flip-TTA logits with --amp off; with --amp bf16 the logits move a little and the record says so."""
    from model import load_network
    from training import data, distillation, evaluation

    images, labels = data.load_split(str(DATA_DIR), train=True)
    images, labels = images[:300], labels[:300]
    monkeypatch.setattr(data, "load_split", lambda *a, **k: (images, labels))
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(tmp_path / f"teacher{seed}.pth")
        torch.save(CIFAR100Model(width=1).state_dict(), teachers[-1])
    expected = sum(evaluation.predict_logits(load_network(path), images, labels, flip_tta=True)
                   for path in teachers) / 2
    made = {}
    for amp in ("off", "bf16"):
        out = tmp_path / f"{amp}.pt"
        assert distillation.main([str(p) for p in teachers] + ["--data-dir", str(DATA_DIR), "--out", str(out),
                                                                "--device", "cpu", "--amp", amp]) == 0
        made[amp] = torch.load(out, weights_only=True)
    plain, bf16 = made["off"], made["bf16"]
    assert plain["precision"] == "float32" and bf16["precision"] == "bfloat16"
    assert plain["labels_sha256"] == distillation.labels_sha256(labels)
    assert [t["file"] for t in plain["teachers"]] == ["teacher1.pth", "teacher2.pth"]
    assert torch.allclose(plain["logits"].float(), expected, atol=2e-3 * expected.abs().max().item())
    moved = (bf16["logits"].float() - expected).abs().max().item()
    assert 0 < moved < 0.05 * expected.abs().max().item()


def test_distillation_refuses_a_bad_teacher_before_any_inference(tmp_path, capsys, monkeypatch):
    from training import distillation, evaluation

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before every teacher file was checked")

    monkeypatch.setattr(evaluation, "predict_logits", no_inference)
    good = tmp_path / "good.pth"
    torch.save(CIFAR100Model(width=1).state_dict(), good)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    assert distillation.main([str(good), str(bad), "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "t.pt")]) == 1
    assert "bad.pth" in capsys.readouterr().err and not (tmp_path / "t.pt").exists()


def test_a_machine_holding_only_the_test_split_can_evaluate_but_not_train(tmp_path, capsys):
    """A benchmark or evaluation machine (a GPU lent for minutes, 64 MiB carried) holds test + meta, not the
    155 MB training file: the test split loads, the training split's absence is named."""
    from training.data import load_split

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("meta", "test"):
        (folder / name).symlink_to(DATA_DIR / "cifar-100-python" / name)
    images, labels = load_split(tmp_path, train=False)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8 and len(labels) == 10000
    rc = train_module.main(["--data-dir", str(tmp_path), "--width", "1", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "Missing: cifar-100-python/train." in capsys.readouterr().err


@pytest.mark.parametrize("name, error", [
    ("cudx", "'cudx' is not a device: auto, cpu, cuda or cuda:N"),
    ("mps", "'mps': this project runs on cpu or cuda only"),
])
def test_device_option_names_what_it_takes(name, error, capsys):
    from training import evaluate

    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["weights.pth", "--device", name])
    assert stopped.value.code == 2
    assert f"argument --device: {error}" in capsys.readouterr().err


def test_device_option_refuses_a_gpu_this_machine_lacks(monkeypatch):
    # MOCK: CUDA's presence and GPU count are patched (no GPU here); the rule is what is tested.
    import argparse

    from training.runtime import device_argument

    assert device_argument("cpu") == "cpu" and device_argument("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="has no CUDA GPU .* use cpu"):
        device_argument("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_argument("cuda") == "cuda" and device_argument("cuda:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match=r"has 2 CUDA GPU\(s\): cuda:0..cuda:1"):
        device_argument("cuda:2")
