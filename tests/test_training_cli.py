"""The training command lines' handling of ordinary mistakes: one line and exit status 2 before any
data is read, never a traceback; where a run writes; what --help says. No CIFAR-100 needed, except
the one test that resumes a real run (an integration test through its fixture)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import CIFAR100Model
from serving import cli
from training import runtime, train as train_module

REPO = Path(__file__).resolve().parents[1]
NO_DATA = ["--data-dir", "/nonexistent/cifar"]  # a check that reads data first would fail on this instead


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def weights(tmp_path) -> dict[str, Path]:
    """A good width-1 weights file, a file that is not one, a training checkpoint and a missing path."""
    torch.manual_seed(0)
    net = CIFAR100Model(width=1)
    files = {"good": tmp_path / "w.pth", "junk": tmp_path / "junk.pth", "checkpoint": tmp_path / "checkpoint.pt",
             "missing": tmp_path / "nowhere.pth"}
    torch.save(net.state_dict(), files["good"])
    files["junk"].write_text("not a weights file\n")
    torch.save({"epoch": 1, "model": net.state_dict(), "ema": None, "optimizer": {}, "args": {}}, files["checkpoint"])
    return files


def usage_error(main, argv, capsys) -> str:
    """main(argv) must stop at argparse with exit status 2; returns its stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- out-of-range numbers
@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "needs 1 or more, not 0"),
    ("--width", "0", "needs 1 or more, not 0"),
    ("--epochs", "0", "needs 1 or more, not 0"),
    ("--test-subset", "0", "needs 1 or more, not 0"),
    ("--dropout", "1.5", "needs 0 <= x < 1, not 1.5"),
    ("--label-smoothing", "1", "needs 0 <= x < 1, not 1"),
    ("--mixup", "-1", "needs 0 or more, not -1"),
    ("--mix-prob", "2", "needs 0 <= p <= 1, not 2"),
    ("--lr", "0", "needs a number above 0, not 0"),
    ("--lr", "nan", "'nan' is not a finite number"),
    ("--time-budget", "0", "needs a number above 0, not 0"),
    ("--time-budget", "inf", "'inf' is not a finite number"),
    ("--time-budget", "nan", "'nan' is not a finite number"),
    ("--threads", "two", "'two' is not a whole number"),
])
def test_train_refuses_an_out_of_range_number_before_reading_data(capsys, option, value, message):
    err = usage_error(train_module.main, NO_DATA + [option, value], capsys)
    assert f"argument {option}: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--batch-size", "--test-subset"])
def test_evaluate_refuses_zero_images(weights, capsys, option):
    from training import evaluate

    err = usage_error(evaluate.main, [str(weights["good"]), *NO_DATA, option, "0"], capsys)
    assert f"argument {option}: needs 1 or more, not 0" in err


# ----------------------------------------------------------------------------- where a run writes
@pytest.mark.parametrize("value", ["-3", "0"])
def test_evaluate_refuses_a_count_of_pairs_below_one(weights, capsys, value):
    """--pairs -3 was taken: a slice [:-3] listed nearly every confused pair."""
    from training import evaluate

    err = usage_error(evaluate.main, [str(weights["good"]), *NO_DATA, "--pairs", value], capsys)
    assert f"argument --pairs: needs 1 or more, not {value}" in err


def test_a_fresh_run_refuses_to_replace_a_checkpoint(tmp_path, weights, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(weights["checkpoint"].read_bytes())
    before = (out / "checkpoint.pt").read_bytes()
    assert train_module.main(NO_DATA + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'checkpoint.pt'} holds an earlier run") and "--resume" in err
    assert "--overwrite" in err and (out / "checkpoint.pt").read_bytes() == before
    # --overwrite gets past that check (to the missing data here); --resume with it is refused.
    assert train_module.main(NO_DATA + ["--out", str(out), "--overwrite"]) == 2
    assert "CIFAR-100 not found" in capsys.readouterr().err
    assert train_module.main(NO_DATA + ["--out", str(out), "--overwrite", "--resume"]) == 2
    assert "pass one" in capsys.readouterr().err
    assert "--overwrite" in train_module.build_parser().format_help()


def test_an_out_that_cannot_be_a_folder_is_one_line_before_reading_data(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    assert train_module.main(NO_DATA + ["--width", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out}: cannot make the run's folder (Not a directory)\n", err


def test_a_checkpoint_written_before_holdout_was_recorded_resumes_as_holding_none_out():
    args = train_module.build_parser().parse_args([])
    older = {"args": {"width": args.width, "num_classes": args.num_classes}}  # no "holdout" in it
    train_module.check_compatible(older, args)
    args.holdout = 100
    with pytest.raises(train_module.ConfigError, match="trained with --holdout 0, this run asks for 100"):
        train_module.check_compatible(older, args)


def test_resume_path_without_out_continues_in_the_checkpoints_folder():
    def folder(argv):
        args = train_module.build_parser().parse_args(argv)
        train_module.run_folder(args, train_module.given_options(argv))
        return args.out

    assert folder(["--resume", "runs/w2/checkpoint.pt"]) == "runs/w2"
    assert folder(["--resume", "runs/w2/checkpoint.pt", "--out", "runs/w2b"]) == "runs/w2b"
    assert folder(["--resume"]) == train_module.DEFAULT_OUT
    assert folder(["--out", "runs/new"]) == "runs/new"


def test_the_interrupted_message_names_the_folder_to_continue(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/env/bin/python")
    command = lambda out: train_module.resume_command(argparse.Namespace(out=out))
    assert command(train_module.DEFAULT_OUT) == "/opt/env/bin/python -m training.train --resume"
    assert command("runs/w2") == "/opt/env/bin/python -m training.train --resume --out runs/w2"
    assert command("my runs/a") == "/opt/env/bin/python -m training.train --resume --out 'my runs/a'"


def test_the_interrupted_message_repeats_the_sessions_own_options(monkeypatch):
    """--data-dir, --threads, --device, --compile are this session's, not the checkpoint's: the printed
    command gives them again (without --data-dir it failed where the default folder has no data)."""
    monkeypatch.setattr(sys, "executable", "/opt/env/bin/python")
    argv = ["--data-dir", "/data/cifar", "--threads", "1", "--device", "cpu", "--compile", "--width", "1",
            "--out", "runs/w2"]
    assert train_module.resume_command(train_module.build_parser().parse_args(argv)) == (
        "/opt/env/bin/python -m training.train --resume --out runs/w2 --data-dir /data/cifar --threads 1 --device cpu "
        "--compile")
    # Bars forced into a log, or off on a terminal, and a session's epoch limit: given again (README says so).
    chunked = ["--progress", "--max-epochs-this-run", "5", "--download", "--out", "runs/w2"]
    assert train_module.resume_command(train_module.build_parser().parse_args(chunked)) == (
        "/opt/env/bin/python -m training.train --resume --out runs/w2 --progress --max-epochs-this-run 5")
    assert train_module.resume_command(train_module.build_parser().parse_args(["--no-progress"])).endswith(
        " --resume --no-progress")


def test_the_continue_command_runs_this_interpreter_as_readme_writes_it(tmp_path, monkeypatch):
    """It said `python -m training.train ...`: outside an activated .venv that is the system's Python,
    without the packages (README: run them as .venv/bin/python -m ...)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    assert train_module.resume_command(argparse.Namespace(out=train_module.DEFAULT_OUT)) == (
        ".venv/bin/python -m training.train --resume")
    elsewhere = tmp_path.parent / "other env" / "bin" / "python"  # not under the working folder: its full path
    monkeypatch.setattr(sys, "executable", str(elsewhere))
    assert cli.python_command() == str(elsewhere)
    assert train_module.resume_command(argparse.Namespace(out="runs/w2")).startswith(f"'{elsewhere}' -m ")
    assert cli.python_command(elsewhere.parent) == "./python"


def test_resume_without_data_dir_falls_back_to_the_runs_own_data_folder(tmp_path, monkeypatch):
    """Resumed without --data-dir where the default folder holds no CIFAR-100: the checkpoint's folder,
    when it still has the data; a --data-dir given, or a default that has it, wins."""
    runs_data, here_data = tmp_path / "runs-data", tmp_path / "here"
    (runs_data / "cifar-100-python").mkdir(parents=True)
    monkeypatch.setenv("CIFAR100_DATA", str(tmp_path / "empty"))
    checkpoint = {"args": {"data_dir": str(runs_data), "width": 1}}

    def resumed(argv):
        args = train_module.build_parser().parse_args(argv)
        return train_module.resumed_args(checkpoint, args, train_module.given_options(argv)).data_dir

    assert resumed(["--resume"]) == str(runs_data)
    assert resumed(["--resume", "--data-dir", str(here_data)]) == str(here_data)
    (here_data / "cifar-100-python").mkdir(parents=True)
    monkeypatch.setenv("CIFAR100_DATA", str(here_data))
    assert resumed(["--resume"]) == str(here_data)


def test_resume_from_a_path_refuses_to_replace_another_run_in_out(tmp_path, weights, capsys):
    """--resume runs/w2/checkpoint.pt --out runs/latest (what `make train` ran before it stopped passing
    --out) replaced runs/latest's own run without a word: refused, naming both; --overwrite allows it."""
    w2, latest = tmp_path / "w2", tmp_path / "latest"
    for folder in (w2, latest):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(weights["checkpoint"].read_bytes())
    before = (latest / "checkpoint.pt").read_bytes()
    argv = NO_DATA + ["--resume", str(w2 / "checkpoint.pt"), "--out", str(latest)]
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume {w2 / 'checkpoint.pt'} --out {latest}: {latest / 'checkpoint.pt'} "
                          "holds another run") and f"continue in {w2}" in err and "--overwrite" in err
    assert (latest / "checkpoint.pt").read_bytes() == before
    # --overwrite gets past that check (to the fixture's checkpoint, which has no --width: refused next).
    assert train_module.main(argv + ["--overwrite"]) == 2
    assert "checkpoint was trained with --width None" in capsys.readouterr().err
    # Its own checkpoint named by path, or an --out with none yet, is no conflict; --overwrite with those is.
    for ok in ([str(latest / "checkpoint.pt"), "--out", str(latest)], [str(w2 / "checkpoint.pt"), "--out", str(tmp_path / "new")]):
        assert train_module.main(NO_DATA + ["--resume", *ok]) == 2
        assert "--width None" in capsys.readouterr().err
        assert train_module.main(NO_DATA + ["--resume", *ok, "--overwrite"]) == 2
        assert "pass one" in capsys.readouterr().err


def _makefile_train_argv(train_args: list[str], data_dir: Path) -> list[str]:
    """training.train's arguments on the Makefile's `train` recipe line, $(VARIABLES) filled in."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\ntrain: install\n\t", 1)[1].split("\n", 1)[0]
    assert recipe.startswith("$(PY) -m training.train "), recipe
    words = recipe.removeprefix("$(PY) -m training.train ").split()
    filled = {"$(CIFAR100_DATA)": [str(data_dir)], "$(TRAIN_ARGS)": train_args}
    return [a for word in words for a in filled.get(word, [word])]


def _makefile_data_dir(cwd: Path, environment: dict[str, str], *make_args: str) -> str:
    """CIFAR100_DATA as the Makefile's recipes see it (make's variable and the exported one), run from ``cwd``
    with only a target of the test's own (--eval): nothing installs or runs."""
    show = 'show-cifar100-data: ; @echo "$(CIFAR100_DATA)|$$CIFAR100_DATA"'
    done = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "--eval", show, "show-cifar100-data",
                           *make_args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    variable, exported = done.stdout.strip().split("|")
    assert variable == exported
    return variable


def test_makefile_treats_an_empty_cifar100_data_as_unset(tmp_path):
    """`CIFAR100_DATA= make train` (an empty export in a script, or on make's command line) passed
    --data-dir "" (`?=` keeps a set but empty value); it now gets the default, as training.data does."""
    environment = {k: v for k, v in os.environ.items() if k != "CIFAR100_DATA"}
    default = str(tmp_path / "data")  # no ../shared/data beside tmp_path
    assert _makefile_data_dir(tmp_path, environment) == default
    for empty in ("", "  "):
        assert _makefile_data_dir(tmp_path, {**environment, "CIFAR100_DATA": empty}) == default
    assert _makefile_data_dir(tmp_path, environment, "CIFAR100_DATA=") == default
    assert _makefile_data_dir(tmp_path, {**environment, "CIFAR100_DATA": "/given"}) == "/given"
    assert _makefile_data_dir(tmp_path, environment, "CIFAR100_DATA=/given") == "/given"


def test_resume_from_a_path_continues_there_not_in_runs_latest(tmp_path, monkeypatch, cifar100_data_dir):
    """The whole path: one epoch of two into run/, then --resume run/checkpoint.pt alone, from a working
    folder whose runs/latest must stay untouched."""
    monkeypatch.chdir(tmp_path)
    small = ["--data-dir", str(cifar100_data_dir), "--train-subset", "256", "--test-subset", "100", "--width", "1",
             "--batch-size", "64", "--threads", "1", "--no-progress", "--no-tta"]
    assert train_module.main(small + ["--epochs", "2", "--max-epochs-this-run", "1", "--out", "run"]) == 0
    assert train_module.main(["--resume", "run/checkpoint.pt", "--data-dir", str(cifar100_data_dir),
                              "--threads", "1", "--no-progress"]) == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "runs").exists()


def test_make_train_resume_path_continues_that_run_in_its_folder(tmp_path, monkeypatch, cifar100_data_dir):
    """`make train TRAIN_ARGS="--resume run/checkpoint.pt"` (its recipe's arguments, not make itself):
    the Makefile passed --out runs/latest, so the run continued there over runs/latest's own run."""
    monkeypatch.chdir(tmp_path)
    small = ["--data-dir", str(cifar100_data_dir), "--train-subset", "256", "--test-subset", "100", "--width", "1",
             "--batch-size", "64", "--threads", "1", "--no-progress", "--no-tta", "--no-ema"]
    assert train_module.main(small + ["--epochs", "2", "--max-epochs-this-run", "1", "--out", "run"]) == 0
    assert train_module.main(_makefile_train_argv(["--resume", "run/checkpoint.pt", "--threads", "1", "--no-progress"],
                                                  cifar100_data_dir)) == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert not (tmp_path / "runs").exists()
    # A fresh `make train` still writes runs/latest (training.train's default --out).
    assert train_module.main(_makefile_train_argv(small[2:] + ["--epochs", "1"], cifar100_data_dir)) == 0
    assert (tmp_path / "runs" / "latest" / "metrics.json").exists()


# ----------------------------------------------------------------------------- weights and data mistakes
def _quantize_main(argv):
    from training import quantize

    return quantize.main(argv)


def _calibrate_main(argv):
    from training import calibrate

    return calibrate.main(argv)


def _engines_main(argv):
    from training import engines

    return engines.main(argv)


@pytest.mark.parametrize("main", [_calibrate_main, _quantize_main, _engines_main])
@pytest.mark.parametrize("case, message", [
    ("missing", "no weights file at"),
    ("junk", "is not a readable PyTorch weights file"),
    ("checkpoint", "is a training checkpoint, not a weights file"),
    ("good", "CIFAR-100 not found"),  # the weights pass; the data is missing
])
def test_weights_commands_name_a_wrong_file_or_missing_data_in_one_line(weights, tmp_path, capsys, main, case,
                                                                          message):
    assert main([str(weights[case]), *NO_DATA]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert "--download" not in captured.err  # these commands have no such option
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "engine_inputs.pt").exists()


@pytest.mark.parametrize("only", ["plain", "fast"])
def test_bench_names_missing_data_in_one_line(capsys, only):
    from training import bench

    assert bench.main([*NO_DATA, "--widths", "1", "--only", only, "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-100 not found") and "Dataset not found" not in err


def test_missing_data_offers_download_only_where_the_command_has_it(tmp_path, capsys):
    from training.data import DataError, load_split

    with pytest.raises(DataError) as without:
        load_split(tmp_path, train=False)
    assert "--download" not in str(without.value) and "python -m training.data" in str(without.value)
    with pytest.raises(DataError) as offered:
        load_split(tmp_path, train=False, offer_download=True)
    assert "--download" in str(offered.value)
    assert train_module.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--download" in capsys.readouterr().err  # training.train has --download


def test_download_without_a_network_is_one_clear_error(tmp_path, monkeypatch):
    """MOCK: torchvision's download is patched to fail as urllib does offline (no network is used)."""
    import urllib.error

    import torchvision.datasets.cifar as cifar
    from training.data import DataError, load_split

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not download CIFAR-100 into .*Temporary failure"):
        load_split(tmp_path, train=True, download=True)


# ----------------------------------------------------------------------------- export
def test_export_into_a_folder_writes_the_weights_file_there(weights, tmp_path):
    from training import export

    folder = tmp_path / "out"
    folder.mkdir()
    assert export.main([str(weights["good"]), str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["CIFAR100_model.pth"]
    assert not list(tmp_path.glob("*.tmp"))
    assert "40 MB" in export.__doc__ and "30 MB" not in export.__doc__


def test_export_into_a_folder_not_made_yet_when_the_path_ends_in_a_slash(weights, tmp_path):
    """`training.export W runs/best/` (the docstring's own example) wrote a file named best."""
    from training import export

    assert export.main([str(weights["good"]), f"{tmp_path / 'best'}/"]) == 0
    assert (tmp_path / "best").is_dir() and sorted(p.name for p in (tmp_path / "best").iterdir()) == ["CIFAR100_model.pth"]
    assert export.main([str(weights["good"]), str(tmp_path / "named.pth")]) == 0  # a file name stays a file
    assert (tmp_path / "named.pth").is_file()


def test_a_save_that_cannot_replace_its_target_leaves_no_temporary_file(tmp_path):
    from training.runtime import atomic_save

    (tmp_path / "taken").mkdir()  # a folder where the file should go
    with pytest.raises(OSError):
        atomic_save({"x": torch.ones(3)}, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ----------------------------------------------------------------------------- --help
def test_help_shows_each_default_once_and_a_zero_default():
    text = " ".join(train_module.build_parser().format_help().split())
    assert "--seed SEED (default: 0)" in text
    assert "CPU threads (default: torch's choice) --eval-batch-size" in text
    assert "(default: half and 85% of --epochs) --ema" in text
    assert not re.search(r"\(default:[^)]*\)[^-]*\(default:", text)  # never two for one option


# ----------------------------------------------------------------------------- progress bars
def test_progress_bars_only_on_a_terminal_unless_asked(monkeypatch):
    from training.runtime import show_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert show_progress(None) is False and show_progress(True) is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(None) is True and show_progress(False) is False
    args = train_module.build_parser().parse_args(["--no-progress"])
    assert args.progress is False and train_module.build_parser().parse_args([]).progress is None


def test_distillation_shows_progress_and_computes_the_same_logits(weights, capsys):
    from training.distillation import teacher_logits
    from training.evaluation import predict_logits
    from model import load_network

    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(100, dtype=torch.int64)
    logits = teacher_logits([weights["good"]], images, labels, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "teachers' logits" in err and "100/100" in err
    expected = predict_logits(load_network(weights["good"]), images, labels, 16, "cpu", None, True, True)
    assert torch.equal(logits, expected)


def test_a_torchrun_run_says_to_continue_under_torchrun_on_as_many_processes(tmp_path, monkeypatch):
    """It said `.venv/bin/python -m training.train --resume`: one process, where --batch-size is per process
    (another recipe). torchrun beside the interpreter, else this interpreter's torch.distributed.run."""
    monkeypatch.chdir(tmp_path)
    bin_folder = tmp_path / ".venv" / "bin"
    bin_folder.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_folder / "python"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun sets in each process it starts
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    args = argparse.Namespace(out="runs/w2")
    assert train_module.resume_command(args) == (
        ".venv/bin/python -m torch.distributed.run --nproc-per-node 4 -m training.train --resume --out runs/w2")
    (bin_folder / "torchrun").write_text("#!/bin/sh\n")
    assert train_module.resume_command(args) == (
        ".venv/bin/torchrun --nproc-per-node 4 -m training.train --resume --out runs/w2")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # a plain run: one process, as before
    assert train_module.resume_command(args) == ".venv/bin/python -m training.train --resume --out runs/w2"


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_ctrl_c_under_torchrun_is_reported_by_rank_0_alone(tmp_path, monkeypatch, capsys, rank, said):
    """MOCK: the interrupt is raised by a patched train() (a real Ctrl-C of a torchrun run is test_ddp's
    cost twice over); every process gets a terminal's SIGINT, and each printed the same lines."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")

    def interrupted(args, given, session):
        session.owns_checkpoint = True  # as after this run's first epoch
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    monkeypatch.setenv("RANK", rank)
    assert train_module.main(["--out", str(out)]) == 130
    assert ("continue with:" in capsys.readouterr().err) == said


def test_a_holdout_run_scoring_part_of_it_says_how_much(tmp_path):
    """--holdout 300 --test-subset 150 scores 150 of the 300 held-out images: it said "holdout of 300"."""
    parse = train_module.build_parser().parse_args
    assert train_module.evaluated_on(parse(["--holdout", "300", "--test-subset", "150"]), 150) == (
        "150 of a holdout of 300 training images")
    assert train_module.evaluated_on(parse(["--holdout", "300", "--test-subset", "300"]), 300) == (
        "holdout of 300 training images")
    assert train_module.evaluated_on(parse(["--holdout", "300", "--test-subset", "500"]), 300) == (
        "holdout of 300 training images")
    assert train_module.evaluated_on(parse(["--holdout", "300"]), 300) == "holdout of 300 training images"


def test_the_tools_hints_name_this_interpreter_not_the_systems_python(weights, tmp_path, monkeypatch):
    """They said `python -m training.X`: outside an activated .venv, the system's Python without the packages."""
    from model import WeightsError, read_state_dict
    from serving.archive import calibration_warning
    from training.data import DataError, load_split

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    with pytest.raises(DataError) as missing:
        load_split(tmp_path / "no data", train=False)
    assert f"`.venv/bin/python -m training.data --data-dir '{tmp_path / 'no data'}'`" in str(missing.value)
    with pytest.raises(WeightsError) as checkpoint:
        read_state_dict(weights["checkpoint"], checkpoint=False)
    assert f".venv/bin/python -m training.export {weights['checkpoint']} OUT.pth" in str(checkpoint.value)
    assert f"`.venv/bin/python -m training.calibrate {weights['good']}`" in calibration_warning(weights["good"])


# ----------------------------------------------------------------------------- torchrun's devices
def test_amp_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    """mkldnn's own check (what auto read) says bf16 on any AVX-512 CPU, where it is emulated and slower
    than float32; a pre-Ampere GPU reports bf16 unless emulation is left out."""
    from handler import engine

    cpu = torch.device("cpu")
    skylake = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    monkeypatch.setattr(engine, "cpu_flags", lambda: skylake)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert runtime.pick_amp("auto", cpu) is None
    assert runtime.pick_amp("bf16", cpu) is torch.bfloat16  # asked for: given
    monkeypatch.setattr(engine, "cpu_flags", lambda: skylake | {"avx512_bf16", "amx_bf16"})
    assert runtime.pick_amp("auto", cpu) is torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN told to stay below bf16
    assert runtime.pick_amp("auto", cpu) is None
    # MOCK: a V100 (bf16 by emulation only); no GPU in the tests.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.pick_amp("auto", torch.device("cuda:0")) is torch.float16


def test_plain_cuda_under_torchrun_is_this_processs_gpu(monkeypatch):
    """MOCK: CUDA's presence is patched (no GPU here); the mapping of names to devices is what is tested."""
    from training.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda") == torch.device("cuda:3") and pick_device("auto") == torch.device("cuda:3")
    assert pick_device("cuda:1") == torch.device("cuda:1") and pick_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert pick_device("cuda") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_nesterov_without_momentum_is_refused_before_reading_data(tmp_path, capsys):
    # torch.optim.SGD refuses it only once the data is loaded and the optimiser built. --out: not the
    # default runs/latest, where a user's own `make train` may have left a checkpoint.
    assert train_module.main(NO_DATA + ["--momentum", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--momentum 0 with Nesterov" in err and "--no-nesterov" in err and "Traceback" not in err


def test_a_fresh_run_names_an_impossible_option_before_the_earlier_run_in_its_folder(tmp_path, weights, capsys):
    """It said "holds an earlier run": the user's --overwrite then met the option's refusal."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(weights["checkpoint"].read_bytes())
    for options, message in ((["--momentum", "0"], "--momentum 0 with Nesterov"),
                             (["--time-budget", "5", "--epochs", "3"], "--epochs and --time-budget both")):
        assert train_module.main(NO_DATA + ["--out", str(out)] + options) == 2
        err = capsys.readouterr().err
        assert message in err and "earlier run" not in err, err


def test_readme_names_exactly_the_options_resume_does_not_take_from_the_checkpoint():
    """README said the session's options are "not in the checkpoint" (they are: its `args` hold every option,
    and the `--data-dir` fallback reads them) and named five of the eight that `--resume` takes from the
    command line alone (_SESSION_KEYS, less --resume, --out and --overwrite, which name the run)."""
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    sentence = readme.split("The session's own options are not the run's", 1)[1].split("(the `continue with:`", 1)[0]
    assert "not in the checkpoint" not in sentence and "the checkpoint records them" in sentence, sentence
    named = {option[2:].replace("-", "_") for option in re.findall(r"`(--[a-z-]+)`", sentence)}
    assert named == train_module._SESSION_KEYS - {"resume", "out", "overwrite"}, sorted(named)
