"""Grad-CAM explanations: are they faithful (the deletion test), and what does one cost?

Deletion test: for each image, blank (set to the CIFAR-100 mean colour) the 20% of its pixels
the heatmap ranks highest, and separately the 20% it ranks lowest; a faithful heatmap makes the
model's calibrated probability for its own answer fall more in the first case. The figure is the
share of images where it does. Cost: milliseconds per explanation in-process (forward + backward +
PNG), on the CPU, with the handler's code, for batches of 1 and 6 (the serving batch size).

    python -m benchmarks.bench_explain [--images 500] [--weights PATH] [--threads 1]
"""
from __future__ import annotations

import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from serving import cli

BLANK_SHARE = 0.2


def heatmap_pixels(data_url_or_png: str | bytes) -> torch.Tensor:
    """A heatmap PNG (bytes or data URL) -> float tensor [H, W] of its 0..255 values."""
    import base64

    png = data_url_or_png
    if isinstance(png, str):
        png = base64.b64decode(png.split(",", 1)[1])
    img = Image.open(io.BytesIO(png))
    img.load()
    return torch.from_numpy(np.array(img, dtype=np.float32))


@torch.no_grad()
def deletion_drops(model: torch.nn.Module, images: torch.Tensor, heat: torch.Tensor, answers: torch.Tensor,
                   temperature: float = 1.0, share: float = BLANK_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop when the top `share` of pixels is blanked, drop when the bottom `share` is) per image.

    images: uint8 [N, 3, 32, 32]; heat: [N, 32, 32] heatmap values; answers: [N] the model's top-1.
    A drop is p(answer | image) - p(answer | blanked image), calibrated probabilities.
    """
    from training.data import normalize

    n, _, h, w = images.shape
    k = round(share * h * w)
    order = heat.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
    x = normalize(images, channels_last=False)  # the mean colour is 0 after normalization

    def prob(batch: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(batch).float() / temperature, dim=1).gather(1, answers[:, None])[:, 0]

    def blanked(pixels: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(n, h * w).scatter_(1, pixels, 0.0)
        return x * keep.view(n, 1, h, w)

    p = prob(x)
    return p - prob(blanked(order[:, :k])), p - prob(blanked(order[:, -k:]))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_serve import machine
    from handler.calibration import load_calibration
    from handler.engine import serving_model
    from handler.explain import explanation_model, heatmaps
    from model import network_from_state_dict
    from model.shipped import SHIPPED_WEIGHTS
    from training.data import default_data_dir, load_split, normalize

    parser = cli.Parser("benchmarks.bench_explain", __doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(SHIPPED_WEIGHTS))
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--images", type=int, default=500, help="first N test images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a serving worker has 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    state_dict = torch.load(args.weights, map_location="cpu", weights_only=True)
    served, explainer = serving_model(state_dict), explanation_model(network_from_state_dict(state_dict))
    from pathlib import Path
    temperature = load_calibration(str(Path(args.weights).parent)).temperature
    images, _ = load_split(args.data_dir, train=False)
    images = images[:args.images]
    x = normalize(images)
    with torch.inference_mode():
        answers = served(x).argmax(dim=1)

    heat, seconds = [], {}
    for batch_size in (1, 6):
        heatmaps(explainer, x[:batch_size], answers[:batch_size], [(32, 32)] * batch_size)  # warm-up
        started, cpu_started, done = time.perf_counter(), time.process_time(), 0
        for i in range(0, min(len(x), 120 if batch_size == 1 else len(x)), batch_size):
            urls = heatmaps(explainer, x[i:i + batch_size], answers[i:i + batch_size],
                            [(32, 32)] * len(x[i:i + batch_size]))
            if batch_size == 6:
                heat += [heatmap_pixels(u) for u in urls]
            done += len(urls)
        seconds[batch_size] = ((time.perf_counter() - started) / done, (time.process_time() - cpu_started) / done)
    cpu_started, done = time.process_time(), 0
    with torch.inference_mode():
        for i in range(0, len(x), 6):
            done += len(served(x[i:i + 6]))
    predict_cpu = (time.process_time() - cpu_started) / done
    top, bottom = deletion_drops(served, images, torch.stack(heat), answers, temperature)
    rate = float((top > bottom).float().mean())
    print(f"CPU: {machine()}, {args.threads} torch thread(s); weights {args.weights}")
    for batch_size, (wall, cpu) in seconds.items():
        print(f"Grad-CAM explanation, batch {batch_size}: {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms CPU per image")
    print(f"prediction (forward pass only), batch 6: {predict_cpu * 1000:.1f} ms CPU per image")
    print(f"deletion test on {len(images)} test images: blanking the top {BLANK_SHARE:.0%} of pixels lowers the "
          f"answer's probability more than blanking the bottom {BLANK_SHARE:.0%} on {rate:.1%} of them "
          f"(mean drop {float(top.mean()):.3f} vs {float(bottom.mean()):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
