"""Worker CPU to turn one upload into the network's 32x32 input: full decode vs the handler's.

    python -m benchmarks.bench_decode [--repeat 15]

Images: a 12-megapixel photo-like JPEG (~4 MB, like a phone's), a 24 MP JPEG, a 12 MP PNG and a
16 MP PNG (at the full-size limit). CPU time (time.process_time, one thread) per image, median of
--repeat runs; "full" decodes every pixel (the handler before draft mode / reduce).
"""
from __future__ import annotations

import io
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageOps

from handler.preprocessing import decode_image, image_to_tensor
from serving import cli
from serving.images import _to_rgb


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth image with some grain, like a camera photo (pure noise would be no photo); the
    decoding tests use it too."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8))
    big = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 3, big.shape).astype(np.int16)
    return Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8))


def full_decode(data: bytes) -> Image.Image:
    """What decode_image did before draft mode / reduce: every pixel at full size."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    img.load()
    return _to_rgb(img)


def full_path(data: bytes) -> torch.Tensor:
    return image_to_tensor(full_decode(data))


def handler_path(data: bytes) -> torch.Tensor:
    return image_to_tensor(decode_image(data))


def cpu_ms(fn, data: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn(data)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1000


def encoded(width: int, height: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    photo_like(width, height).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_decode", __doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [("12 MP JPEG", 4000, 3000, "JPEG"), ("24 MP JPEG", 6000, 4000, "JPEG"),
             ("12 MP PNG", 4000, 3000, "PNG"), ("16 MP PNG", 4000, 4000, "PNG")]
    from benchmarks.bench_serve import machine

    print(f"Worker CPU per upload (one thread, median of {args.repeat}) on {machine()}")
    print(f"{'image':<12} {'file':>8}  {'full decode':>12}  {'handler':>9}")
    for name, width, height, fmt in cases:
        data = encoded(width, height, fmt)
        full, cheap = cpu_ms(full_path, data, args.repeat), cpu_ms(handler_path, data, args.repeat)
        print(f"{name:<12} {len(data) / 1e6:>6.1f}MB  {full:>9.1f} ms  {cheap:>6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
