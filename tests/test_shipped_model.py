"""The shipped default weights: their accuracy on the full CIFAR-100 test split, in-process.

The figure recorded in model/weights/metrics.json must be reproducible from the committed weights
(to 0.1 point), and must clear the floor the model card promises. The served side (the same answer
through a running TorchServe for 1,000+ images) is in test_shipped_model_served.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from model import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR, load_network
from training.evaluation import accuracy

METRICS = SHIPPED_WEIGHTS_DIR / "metrics.json"
# The model card's promise for the shipped weights (top-1 on the 10,000 test images as served:
# no test-time augmentation, which the handler does not do).
TOP1_FLOOR = 70.0


@pytest.fixture(scope="module")
def shipped():
    net = load_network(SHIPPED_WEIGHTS).to(memory_format=torch.channels_last).eval()  # strict load
    return net, json.loads(METRICS.read_text())


def test_metrics_file_describes_the_shipped_weights(shipped):
    net, metrics = shipped
    assert metrics["test_images"] == 10_000
    assert metrics["parameters"] == sum(p.numel() for p in net.parameters())
    assert metrics["args"]["width"] == net.width
    # A run on a --time-budget plans no epoch count: the budget's record says how many it reached.
    planned = metrics["args"]["epochs"] or metrics["time_budget"]["epochs"]
    assert len(metrics["history"]) == planned and [row["epoch"] for row in metrics["history"]] == list(range(1, planned + 1))


def test_shipped_top1_matches_metrics_and_clears_the_floor(shipped, shipped_test_split_logits):
    # The served network (BatchNorm folded, as the handler runs it) on the whole test split.
    _, metrics = shipped
    logits, _, labels = shipped_test_split_logits
    assert len(labels) == 10_000
    served = accuracy(logits, labels)
    recorded = metrics["final_evaluation"][metrics["weights_are"]]
    assert served["top1"] == pytest.approx(recorded["top1"], abs=0.1)
    assert served["top5"] == pytest.approx(recorded["top5"], abs=0.1)
    assert served["top1"] >= TOP1_FLOOR
