from .classes import CLASS_NAMES, INDEX_TO_NAME_PATH, display_name, load_class_names
from .network import CIFAR100Model, ResidualSEBlock, SEBlock, infer_width_and_classes

# CIFAR-100 train-split pixel statistics, in [0, 1] units (the seed's normalization).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

__all__ = [
    "CIFAR100Model", "ResidualSEBlock", "SEBlock", "infer_width_and_classes",
    "CLASS_NAMES", "INDEX_TO_NAME_PATH", "display_name", "load_class_names",
    "CIFAR100_MEAN", "CIFAR100_STD",
]
