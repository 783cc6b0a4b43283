"""The network, its weights files (and where the shipped ones lie), the class names, the CIFAR-100
normalization and flip TTA.

``model.classes`` (names, the display rule) and the normalization statistics need no torch, so the
adapter imports them without pulling torch in; the network and the weights loaders are imported on
first use of one of their names (PEP 562).
"""
from .classes import CLASS_NAMES, INDEX_TO_NAME_PATH, display_name, load_class_names
from .normalization import CIFAR100_MEAN, CIFAR100_STD, normalize
from .shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR

# name -> submodule that defines it (each imports torch)
_LAZY = {
    **dict.fromkeys(("CIFAR100Model", "ResidualSEBlock", "SEBlock", "fold_batchnorm", "infer_width_and_classes"), "network"),
    **dict.fromkeys(("WeightsError", "read_state_dict", "network_from_state_dict", "check_class_count",
                     "load_network"), "weights"),
    **dict.fromkeys(("flip_tta_logits", "plain_and_flip_tta_logits"), "tta"),
}

__all__ = [
    *_LAZY,
    "CLASS_NAMES", "INDEX_TO_NAME_PATH", "display_name", "load_class_names",
    "CIFAR100_MEAN", "CIFAR100_STD", "normalize",
    "SHIPPED_WEIGHTS", "SHIPPED_WEIGHTS_DIR",
]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
