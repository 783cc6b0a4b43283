"""Where the tests find CIFAR-100 (training.data.default_data_dir: $CIFAR100_DATA, else the shared
copy beside the checkout, else ./data, where `make data` downloads it), and what to say when it is not there."""
from __future__ import annotations

from pathlib import Path

from training.data import default_data_dir


def data_dir() -> Path:
    """The folder that holds (or should hold) cifar-100-python/, absolute."""
    return Path(default_data_dir()).resolve()


def missing_data_message(folder: Path) -> str | None:
    """None when CIFAR-100 is there; else one paragraph saying how to get it."""
    if (folder / "cifar-100-python").is_dir():
        return None
    return (f"CIFAR-100 not found under {folder} (no cifar-100-python/ there), and these tests need it. "
            "Get it with `make data` (torchvision downloads it into ./data, ~170 MB, checksums verified), "
            "or set CIFAR100_DATA to the folder that holds cifar-100-python/. "
            "`make test-unit` runs the tests that need no data, server or browser.")
