"""CIFAR-100's official files carried to a GPU machine lent through the device tool, and rebuilt there byte
for byte (torchvision's md5 check then passes as on any machine).

The tool carries at most 64 MiB a call with the working tree (~13 MB): the training file (155 MB) does not
fit one call, and general-purpose compressors take it only to ~70%. So each file is kept as the bytes
around its image array (labels, file names: ~2 MB) plus the array as lossless WebP mosaics of 1,000 images
(56% of the raw pixels), checked to decode back exactly before they are written. Two calls to a machine
kept warm between them then carry the whole data set (training/gpu_train.sh says how).

    python -m training.device_data pack .device/chunks                # here (~2 min on 2 cores)
    python -m training.device_data unpack DIR [DIR ...] --out DATA    # there: DATA/cifar-100-python/
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("test", "train")
PER_CHUNK = 1000  # images a mosaic, 100 a row
# The official files' md5 (torchvision's too): a rebuilt file is checked against them here as well.
MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
       "meta": "7973b15100ade9c7d40fb424638fde48"}


def _mosaic(block: np.ndarray) -> np.ndarray:
    n = len(block)
    images = block.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.reshape(n // 100, 100, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(n // 100 * 32, 3200, 3)


def _unmosaic(mosaic: np.ndarray) -> np.ndarray:
    rows = mosaic.shape[0] // 32
    images = mosaic.reshape(rows, 32, 100, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 100, 32, 32, 3)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(rows * 100, 3072)


def _encode(job: tuple[str, np.ndarray]) -> int:
    path, block = job
    buffer = io.BytesIO()
    Image.fromarray(_mosaic(block)).save(buffer, format="webp", lossless=True, quality=100, method=6)
    data = buffer.getvalue()
    if not np.array_equal(_unmosaic(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))), block):
        raise RuntimeError(f"{path}: WebP did not decode back to the same pixels")
    Path(path).write_bytes(data)
    return len(data)


def pack(source: Path, out: Path, workers: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split in SPLITS:
        raw = (source / split).read_bytes()
        array = pickle.loads(raw, encoding="bytes")[b"data"]
        pixels = array.tobytes()
        at = raw.find(pixels[:4096])  # the array's buffer is stored whole inside the pickle
        if at < 0 or raw[at:at + len(pixels)] != pixels:
            raise RuntimeError(f"{source / split}: the image array is not stored contiguously")
        (out / f"{split}.prefix").write_bytes(raw[:at])
        (out / f"{split}.suffix").write_bytes(raw[at + len(pixels):])
        jobs += [(str(out / f"{split}.{i:03d}.webp"), array[i * PER_CHUNK:(i + 1) * PER_CHUNK])
                 for i in range(len(array) // PER_CHUNK)]
    shutil.copyfile(source / "meta", out / "meta")
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(_encode, jobs))
    print(f"{len(jobs)} mosaics, {total / 1e6:.1f} MB, in {out}")


def unpack(folders: list[Path], out: Path, splits: tuple[str, ...] = SPLITS, md5: dict[str, str] = MD5) -> Path:
    """Rebuild cifar-100-python/ under out from chunks spread over folders (each chunk in any of them); each
    rebuilt file must have its ``md5``."""
    found = {p.name: p for folder in folders if folder.is_dir() for p in folder.iterdir()}
    needed = ["meta"] + [f"{split}.{part}" for split in splits for part in ("prefix", "suffix")]
    if missing := [name for name in needed if name not in found]:
        raise RuntimeError(f"not in {', '.join(map(str, folders))}: {', '.join(missing)}")
    target = out / "cifar-100-python"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found["meta"], target / "meta")
    for split in splits:
        names = sorted(n for n in found if n.startswith(f"{split}.") and n.endswith(".webp"))
        parts = [found[f"{split}.prefix"].read_bytes()]
        for name in names:
            parts.append(_unmosaic(np.asarray(Image.open(found[name]).convert("RGB"))).tobytes())
        parts.append(found[f"{split}.suffix"].read_bytes())
        (target / split).write_bytes(b"".join(parts))
    for name in ("meta", *splits):
        digest = md5[name]
        got = hashlib.md5((target / name).read_bytes()).hexdigest()
        if got != digest:
            raise RuntimeError(f"{target / name}: md5 {got}, not the official {digest} (a chunk is missing?)")
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.device_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("out", type=Path)
    a.add_argument("--source", type=Path, help="the official files' folder (default: cifar-100-python in the "
                   "data folder make and the training tools use: $CIFAR100_DATA, else ../shared/data, else ./data)")
    b = sub.add_parser("unpack")
    b.add_argument("folders", type=Path, nargs="+")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    args = p.parse_args(argv)
    if args.command == "pack":
        from training.data import default_data_dir  # (it imports torch: only pack needs it)

        source = args.source or Path(default_data_dir()) / "cifar-100-python"
        pack(source, args.out, workers=os.cpu_count() or 2)
    else:
        print(f"CIFAR-100 rebuilt, md5s official: {unpack(args.folders, args.out, tuple(args.splits))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
