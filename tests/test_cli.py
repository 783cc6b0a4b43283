"""The command lines' --help: `python -m <module>` as the program name and every default shown."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
