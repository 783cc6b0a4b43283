"""Flip test-time augmentation: the one rule the evaluation and the handler share."""
from __future__ import annotations

from typing import Callable

import torch


def plain_and_flip_tta_logits(forward: Callable[[torch.Tensor], torch.Tensor],
                              images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain logits, flip-TTA logits) of ``images`` [N, C, H, W] from one forward pass of 2N images
    (float32): the flip-TTA logits are the mean of the image's and its left-right mirror's."""
    count = len(images)
    logits = forward(torch.cat([images, images.flip(3)])).float()
    return logits[:count], (logits[:count] + logits[count:]) / 2


def flip_tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The flip-TTA logits of ``images``: a mirrored image gets the same answer as the original."""
    return plain_and_flip_tta_logits(forward, images)[1]
