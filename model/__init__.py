"""The network and the class names.

``model.classes`` (names, the display rule) needs no torch, so the adapter imports it without
pulling torch in; the network is imported on first use of one of its names (PEP 562).
"""
from .classes import CLASS_NAMES, INDEX_TO_NAME_PATH, display_name, load_class_names

# CIFAR-100 train-split pixel statistics, in [0, 1] units (the seed's normalization).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_NETWORK_NAMES = ("CIFAR100Model", "ResidualSEBlock", "SEBlock", "infer_width_and_classes")

__all__ = [
    *_NETWORK_NAMES,
    "CLASS_NAMES", "INDEX_TO_NAME_PATH", "display_name", "load_class_names",
    "CIFAR100_MEAN", "CIFAR100_STD",
]


def __getattr__(name: str):
    if name in _NETWORK_NAMES:
        from . import network  # imports torch

        return getattr(network, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
