"""The command lines' --help: `python -m <module>` as the program name and every default shown."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from model import SHIPPED_WEIGHTS
from serving import cli

REPO = Path(__file__).resolve().parents[1]


def test_help_names_the_module_and_shows_defaults():
    parser = cli.Parser("training.example", "What it does.")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--flag", action="store_true")
    text = parser.format_help()
    assert text.startswith("usage: python -m training.example")
    assert "(default: 100)" in text and "peak learning rate (default: 0.1)" in text


def test_a_real_command_line():
    done = subprocess.run([sys.executable, "-m", "serving.archive", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m serving.archive")
    assert "(default: " in done.stdout and "CIFAR100_model.pth" in done.stdout


def test_options_a_command_would_ignore_are_refused():
    # `adapter.run start --port N` listened on ADAPTER_PORT (8000), not N, and said nothing.
    done = subprocess.run([sys.executable, "-m", "adapter.run", "start", "--port", "8123"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--port and --log-file are for serve" in done.stderr, done.stderr
    assert "ADAPTER_PORT" in done.stderr


def test_make_help_gives_each_target_a_whole_self_contained_line():
    """`make help` shows the first line of each target's comment: `make train`'s stopped mid-sentence
    ("...; a run") and two said "below", which means something only inside the Makefile."""
    done = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line.split(None, 2) for line in done.stdout.splitlines()]
    assert len(lines) > 10 and all(len(words) == 3 and words[0] == "make" for words in lines), done.stdout
    for _, target, text in lines:
        assert text.endswith("."), f"make {target}: {text}"
        assert not {"below", "above"} & set(re.findall(r"[a-z]+", text)), f"make {target}: {text}"


def test_rollout_failures_exit_with_the_modules_codes_and_make_says_2():
    """README gave `make rollout`'s failures exit codes 1 / 130 / 143; they are serving.rollout's, and make exits 2
    for any failed recipe. TorchServe not running: the module exits 1, the make target 2, as README now says."""
    import pytest

    from serving.torchserve import default_instance

    if default_instance().is_running():
        pytest.skip("this checkout's TorchServe runs (make serve): a rollout would go ahead")
    weights = str(SHIPPED_WEIGHTS)
    module = subprocess.run([sys.executable, "-m", "serving.rollout", "--weights", weights], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 1 and "TorchServe is not running" in module.stderr, module.stderr
    make = subprocess.run(["make", "-s", "--no-print-directory", "rollout", f"WEIGHTS={weights}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert make.returncode == 2 and "TorchServe is not running" in make.stderr, make.stderr
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "are those of `python -m serving.rollout --weights W`" in readme
    assert "`make rollout` itself exits 2 whenever the command fails" in readme
