"""What git leaves out of a checkout: the environment, the npm packages and the engine cache, whether they
are folders or links to a shared copy (tests/checkout.py links .venv and .cache; a user may link them too)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _untracked(checkout: Path) -> str:
    """`git status --porcelain` of a checkout, every untracked file listed (not only their folders)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_the_environment_and_caches_are_ignored_as_folders_and_as_links(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for kind in ("folders", "links"):
        checkout = tmp_path / kind
        checkout.mkdir()
        subprocess.run(["git", "init", "-q", str(checkout)], check=True, timeout=60)
        shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
        for name in (".venv", "node_modules", ".cache"):
            if kind == "folders":
                (checkout / name).mkdir()
                (checkout / name / "file").write_text("x")
            else:
                os.symlink(shared, checkout / name)  # `/.venv/` matched the folder alone: the link showed as new
        listed = _untracked(checkout).split("\n")
        assert [line for line in listed if line and not line.endswith(".gitignore")] == [], (kind, listed)


def test_the_width_10_weights_file_can_be_committed(tmp_path):
    """README: the width-10 float16 file (35 MB) fits the repository's 40 MB limit, so the next GPU run commits
    it; .gitignore still left out /model/weights/width10/*.pth (from the 30 MB limit), so `git add` skipped it."""
    checkout = tmp_path / "checkout"
    (checkout / "model" / "weights" / "width10").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(checkout)], check=True, timeout=60)
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
    (checkout / "model" / "weights" / "width10" / "CIFAR100_model.pth").write_bytes(b"weights")
    listed = _untracked(checkout)
    assert "?? model/weights/width10/CIFAR100_model.pth" in listed, listed
