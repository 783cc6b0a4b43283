"""The seed's network: a ResNet-style CNN with Squeeze-and-Excitation blocks.

Parameter names follow the seed's notebook exactly (``stem.0.weight``,
``stage1.0.conv1.weight``, ``stage1.0.se.fc1.weight``, ``stage1.0.shortcut.weight``,
``fc.weight`` ...) so a ``CIFAR100_model.pth`` saved by it loads with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SEBlock(nn.Module):
    """Squeeze-and-Excitation: rescale each channel by a gate computed from its mean."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate[:, :, None, None]


class ResidualSEBlock(nn.Module):
    """conv-bn-relu-conv-bn, SE gate, plus a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, reduction: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SEBlock(out_channels, reduction)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class CIFAR100Model(nn.Module):
    """Stem of 16 channels, three stages of two SE residual blocks (16k, 32k, 64k channels).

    The seed's signature, by keyword or position: ``CIFAR100Model(input_shape=3,
    width_multiplier=10, num_classes=100)`` or ``CIFAR100Model(3, 10, 100)``; ``input_shape`` is
    the number of input channels. ``width=`` is this project's name for ``width_multiplier``;
    ``dropout`` and ``reduction`` are keyword-only.
    """

    def __init__(self, input_shape: int = 3, width_multiplier: int | None = None, num_classes: int = 100, *,
                 width: int | None = None, dropout: float = 0.3, reduction: int = 16):
        super().__init__()
        if width is not None and width_multiplier is not None and width != width_multiplier:
            raise TypeError(f"width={width} and width_multiplier={width_multiplier} name the same setting: pass one")
        width = width if width is not None else (width_multiplier if width_multiplier is not None else 10)
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        if input_shape < 1:
            raise ValueError(f"input_shape (input channels) must be a positive integer, got {input_shape}")
        self.input_shape = input_shape
        self.width = width
        self.num_classes = num_classes
        c1, c2, c3 = 16 * width, 32 * width, 64 * width
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.stage1 = nn.Sequential(ResidualSEBlock(16, c1, 1, reduction), ResidualSEBlock(c1, c1, 1, reduction))
        self.stage2 = nn.Sequential(ResidualSEBlock(c1, c2, 2, reduction), ResidualSEBlock(c2, c2, 1, reduction))
        self.stage3 = nn.Sequential(ResidualSEBlock(c2, c3, 2, reduction), ResidualSEBlock(c3, c3, 1, reduction))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = x.mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def infer_width_and_classes(state_dict: dict) -> tuple[int, int]:
    """Read the width multiplier and class count off a state dict (to rebuild the network)."""
    fc = state_dict["fc.weight"]
    return fc.shape[1] // 64, fc.shape[0]


def fold_batchnorm(model: CIFAR100Model) -> CIFAR100Model:
    """The network in eval mode with each BatchNorm folded into the convolution before it (in place).

    Same answers up to float rounding with fewer operators: the form every engine, Grad-CAM and the int8
    network are made from. The folded convolutions stay modules where they were (each BatchNorm becomes an
    Identity), so Captum can hook ``model.stage3`` and NNCF can trace the network.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    pairs = [(model.stem, "0", "1")] + [(block, f"conv{i}", f"bn{i}") for stage in (model.stage1, model.stage2, model.stage3)
                                         for block in stage for i in (1, 2)]
    for parent, conv, bn in pairs:
        if isinstance(getattr(parent, bn), nn.BatchNorm2d):  # folding twice changes nothing
            setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
            setattr(parent, bn, nn.Identity())
    return model
