"""The seed's width 10, trained on a GPU (model/weights/width10/).

Its float16 weights file (35 MB) is not committed (the repository took files of at most 30 MB when it was
trained; 40 MB now), so nothing here can load or score it; the checks of that file (half precision, strict load, the
GPU's scores reproduced on this CPU) come back with the file. What can be checked without it:
the records describe the network this checkout builds at width 10.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.network import CIFAR100Model

FOLDER = Path(__file__).resolve().parents[1] / "model" / "weights" / "width10"


def test_records_describe_the_width_10_network_of_this_checkout():
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    assert metrics["args"]["width"] == 10
    net = CIFAR100Model(3, 10, 100)
    assert sum(p.numel() for p in net.parameters()) == metrics["parameters"]
