"""The temperature and "unsure" threshold fitted by training/calibrate.py, as the handler applies them.

They come from ``calibration.json`` beside the weights (packed into the archive by
serving/archive.py). An archive without one serves the plain softmax and marks nothing unsure.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from serving.settings import CALIBRATION_FILE


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    unsure_below: float | None = None  # calibrated top-1 probability under which an answer is unsure

    def is_unsure(self, probability: float) -> bool:
        return self.unsure_below is not None and probability < self.unsure_below


def load_calibration(model_dir: str, flip_tta: bool = False) -> Calibration:
    """The fit for plain logits, or (``flip_tta``) for flip-TTA's averaged ones, sharper: their own
    temperature; a file fitted before TTA was served has none, and the plain fit is the closest."""
    path = os.path.join(model_dir, CALIBRATION_FILE)
    if not os.path.isfile(path):
        logger.warning("no %s in the archive: uncalibrated probabilities, nothing marked unsure", CALIBRATION_FILE)
        return Calibration()
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if flip_tta:
        if "flip_tta" in record:
            record = record["flip_tta"]
        else:
            logger.warning("%s has no flip_tta fit (python -m training.calibrate): the plain one is used",
                           CALIBRATION_FILE)
    temperature = float(record["temperature"])
    if not temperature > 0:
        raise ValueError(f"{path}: temperature must be positive, got {temperature}")
    return Calibration(temperature, float(record["unsure"]["threshold"]))
