"""CIFAR-100 as uint8 tensors, augmented a whole batch at a time; ``python -m training.data``
(``make data``) downloads it.

Per-image PIL transforms cost more than the network itself on a 2-core CPU, so the split is
loaded once into one uint8 tensor and random crop + flip are done with tensor indexing on
the batch. torchvision's ``CIFAR100`` reads (and md5-checks) the official files.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from model.normalization import normalize  # noqa: F401 - training and evaluation normalize through here
from serving import cli

DATA_ENV = "CIFAR100_DATA"
REPO = Path(__file__).resolve().parents[1]
# The files each split needs (torchvision's CIFAR-100 "python version"), to tell "missing" from "corrupted".
_FILES = {True: ("cifar-100-python/train", "cifar-100-python/meta"),
          False: ("cifar-100-python/test", "cifar-100-python/meta")}


class DataError(RuntimeError):
    """The data set cannot be read; the message says what to do."""


def default_data_dir() -> str:
    """The Makefile's rule: $CIFAR100_DATA, else the shared copy beside the checkout
    (../shared/data), else ./data (where `make data` puts it)."""
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    for candidate in (REPO.parent / "shared" / "data", REPO / "data"):
        if (candidate / "cifar-100-python").is_dir():
            return str(candidate)
    return "data"


def load_split(root: str | os.PathLike, train: bool, download: bool = False,
               offer_download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 3, 32, 32], labels int64 [N]) of one split.

    Only that split's file and ``meta`` need be there (md5-checked): a machine that only evaluates or
    benchmarks can hold the 31 MB test split without the 155 MB training one. ``offer_download``: the
    calling command has a --download option, so a missing-data message may suggest it."""
    from torchvision.datasets import CIFAR100

    class OneSplit(CIFAR100):
        # torchvision checks both splits' files before reading either; the other split's list is emptied.
        def __init__(self, root: str, train: bool, download: bool):
            if not download and train:
                self.test_list = []
            elif not download:
                self.train_list = []
            super().__init__(root=root, train=train, download=download)

    root = Path(root)
    try:
        ds = OneSplit(str(root), train, download)
    except OSError as err:  # urllib's errors (no network, a refused connection) are OSErrors
        action = "download CIFAR-100 into" if download else "read CIFAR-100 under"
        raise DataError(f"could not {action} '{root}' ({type(err).__name__}: {err})") from err
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise data_error(root, train, err, offer_download) from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    return images, labels


def data_error(root: str | os.PathLike, train: bool, err: Exception, offer_download: bool = False) -> DataError:
    """What to do when torchvision refused the split under ``root`` (``err``): the data is missing, in
    the wrong folder, or corrupted. --download is suggested only by a command that has it
    (``offer_download``); ``python -m training.data`` works for every one."""
    root = Path(root)
    fetch = f"`{cli.module_command('training.data', '--data-dir', root)}`" + (" or --download" if offer_download else "")
    present = [f for f in _FILES[train] if (root / f).exists()]
    if not present:
        # A common slip: pointing at cifar-100-python/ itself rather than the folder above it.
        hint = (f" '{root}' looks like the cifar-100-python folder itself: pass its parent, '{root.parent}'."
                if (root / "meta").exists() else "")
        return DataError(
            f"CIFAR-100 not found under '{root}' (looked for {root / 'cifar-100-python'}). "
            f"Point --data-dir (or the {DATA_ENV} environment variable) at the folder that holds "
            f"'cifar-100-python/', or fetch it (needs internet): {fetch}; `make data` puts it in ./data.{hint}")
    missing = [f for f in _FILES[train] if f not in present]
    return DataError(
        f"CIFAR-100 files under '{root / 'cifar-100-python'}' failed torchvision's integrity check "
        f"({err}). "
        + (f"Missing: {', '.join(missing)}. " if missing else
           "A file is truncated or altered: its md5 does not match the official release. ")
        + f"Replace the folder with an intact copy (or delete it and fetch it again: {fetch}).")


def subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int = 0):
    """A fixed random subset of n examples (all of them when n is None or too large)."""
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(32, padding) + RandomHorizontalFlip on a uint8 batch [B, C, H, W], zero fill.

    The random draws come from the CPU generator whatever the images' device, so a run draws
    the same crops on a GPU as on the CPU; the indexing itself runs where the images are.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def downscale(x: torch.Tensor, res: int) -> torch.Tensor:
    """A batch at res x res pixels (antialiased): progressive resizing's cheaper training steps. The
    same view of each image, fewer pixels; a batch already that size is returned as is."""
    if x.shape[-1] == res and x.shape[-2] == res:
        return x
    from torchvision.transforms.v2.functional import resize

    return resize(x, [res, res], antialias=True)


def batches(images, labels, indices, batch_size, generator=None, augment=False, drop_last=False, per_image=None):
    """Yield (uint8 images, labels, rows of per_image) batches over the given index order.

    per_image: an optional tensor with a row per image (a teacher's logits), sliced with the images
    so that its rows cannot drift from them; None in every batch without it."""
    n = len(indices)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = indices[start:start + batch_size]
        x, y = images[idx], labels[idx]
        if augment:
            x = random_crop_flip(x, generator)
        yield x, y, None if per_image is None else per_image[idx]


def download(root: str | os.PathLike) -> Path:
    """Fetch CIFAR-100 into root/cifar-100-python (torchvision checks the archive's md5, and each
    file's before it is used); a complete copy already there is kept. Returns the folder."""
    from torchvision.datasets import CIFAR100

    for train in (True, False):
        CIFAR100(root=str(root), train=train, download=True)
    return Path(root) / "cifar-100-python"


def main(argv=None) -> int:
    p = cli.Parser("training.data", "Download CIFAR-100 (the official python version, ~170 MB) "
                                            "with torchvision, checksums verified.")
    p.add_argument("--data-dir", default="data", help="where to put cifar-100-python/ (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        folder = download(args.data_dir)
    except (OSError, RuntimeError) as err:  # urllib's errors are OSErrors; torchvision raises RuntimeError
        print(f"error: could not download CIFAR-100 into '{args.data_dir}': {err}", file=sys.stderr)
        return 1
    print(f"CIFAR-100 is in {folder} (use it with CIFAR100_DATA={Path(args.data_dir).resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
