"""Flip test-time augmentation: the one rule the evaluation and the handler share."""
from __future__ import annotations

from typing import Callable

import torch


def flip_tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Mean of the logits of ``images`` [N, C, H, W] and of their left-right mirrors, in one forward
    pass of 2N images (float32). A mirrored image gets the same answer as the original."""
    count = len(images)
    logits = forward(torch.cat([images, images.flip(3)])).float()
    return (logits[:count] + logits[count:]) / 2
