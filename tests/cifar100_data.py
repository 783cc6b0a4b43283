"""Where the tests find CIFAR-100, by the Makefile's rule: $CIFAR100_DATA, else the shared copy
beside the checkout (../shared/data), else ./data (where `make data` downloads it)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The folder that holds (or should hold) cifar-100-python/, absolute."""
    if os.environ.get("CIFAR100_DATA"):
        return Path(os.environ["CIFAR100_DATA"]).resolve()
    for candidate in (ROOT.parent / "shared" / "data", ROOT / "data"):
        if (candidate / "cifar-100-python").is_dir():
            return candidate.resolve()
    return (ROOT / "data").resolve()


def missing_data_message(folder: Path) -> str | None:
    """None when CIFAR-100 is there; else one paragraph saying how to get it."""
    if (folder / "cifar-100-python").is_dir():
        return None
    return (f"CIFAR-100 not found under {folder} (no cifar-100-python/ there), and these tests need it. "
            "Get it with `make data` (torchvision downloads it into ./data, ~170 MB, checksums verified), "
            "or set CIFAR100_DATA to the folder that holds cifar-100-python/. "
            "`make test-unit` runs the tests that need no data, server or browser.")
