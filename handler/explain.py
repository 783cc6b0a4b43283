"""Grad-CAM heatmaps for the top-1 answer (TorchServe's /explanations), as PNG data URLs.

Grad-CAM (Captum's LayerGradCam) weighs the last stage's feature maps (8x8 for a 32x32 input) by
the gradient of the answer's logit and keeps the positive part: where the network saw evidence for
its answer. The map is stretched over the whole uploaded picture (the network saw the picture
squashed to 32x32, so its grid covers the full frame) and sent as an 8-bit greyscale PNG with the
picture's aspect: 255 = most responsible, 0 = no evidence.

The network runs with each BatchNorm folded into its convolution, as served (model.network.fold_batchnorm):
the stages stay modules, so Captum can hook the last one, and the forward/backward pass stays as cheap
as serving's.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The longer side of a heatmap PNG (default; model-config.yaml `handler.heatmap_max_side` overrides
# it): enough for a page to lay it smoothly over a preview; the shorter side follows the picture's
# aspect. A picture smaller than this keeps its own size.
HEATMAP_MAX_SIDE = 224


def explanation_model(network: torch.nn.Module) -> torch.nn.Module:
    """The trained CIFAR100Model in eval mode, BN folded; ``model.stage3`` stays hookable."""
    from model import fold_batchnorm

    return fold_batchnorm(network).to(memory_format=torch.channels_last)


def grad_cam(model: torch.nn.Module, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, 8, 8] non-negative Grad-CAM of each image for its target class, each scaled to max 1."""
    from captum.attr import LayerGradCam

    with torch.enable_grad():
        cam = LayerGradCam(model, model.stage3).attribute(batch, target=targets.clone(), relu_attributions=True)
    cam = cam.detach().float().sum(dim=1).cpu()  # [B, h, w] (LayerGradCam already averages channels); PNGs are made on the CPU
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak[:, None, None]


def heatmap_size(width: int, height: int, max_side: int = HEATMAP_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the heatmap for a picture of width x height: same aspect, longer side <= max_side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_png(cam: torch.Tensor, picture_size: tuple[int, int], max_side: int = HEATMAP_MAX_SIDE) -> bytes:
    """One non-negative [h, w] map -> greyscale PNG bytes with the picture's aspect, peak = 255."""
    width, height = heatmap_size(*picture_size, max_side)
    up = F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    up = up / up.max().clamp_min(1e-12)  # peak -> 255 at the PNG's own resolution
    pixels = (up.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def heatmaps(model: torch.nn.Module, batch: torch.Tensor, targets: torch.Tensor,
             picture_sizes: list[tuple[int, int]], max_side: int = HEATMAP_MAX_SIDE) -> list[str]:
    """One Grad-CAM PNG data URL per image of the batch (one forward + backward for all of them)."""
    if len(batch) == 0:
        return []
    cams = grad_cam(model, batch, targets)
    return [data_url(heatmap_png(cam, size, max_side)) for cam, size in zip(cams, picture_sizes)]
