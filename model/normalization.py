"""CIFAR-100 normalization: the train split's pixel statistics and the one function that applies them.

Training, evaluation and the serving handler all normalize through ``normalize``. The statistics
need no torch, so ``model`` (imported by the torch-free adapter) exposes them without pulling it in.
"""
from __future__ import annotations

# CIFAR-100 train-split pixel statistics, in [0, 1] units (the seed's normalization).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def normalize(images, device=None, channels_last: bool = True):
    """uint8 [B, 3, H, W] -> float32 normalized with the CIFAR-100 statistics, on ``device``
    (default: where the images are); channels_last is the layout training and serving run in."""
    import torch  # here: the module's constants stay importable without torch

    device = images.device if device is None else torch.device(device)
    mean = torch.tensor(CIFAR100_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD, device=device).view(1, 3, 1, 1)
    x = images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
