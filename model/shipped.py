"""Where the shipped default's files lie in this repository: its weights and, beside them, what was
measured for them (calibration, engine record, probe inputs). Standard library only."""
from pathlib import Path

SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_WEIGHTS = SHIPPED_WEIGHTS_DIR / "CIFAR100_model.pth"
