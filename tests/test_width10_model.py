"""The second shipped network: width 10, trained on a GPU, stored as float16 (model/weights/width10/).

It is too slow to score on all 10,000 test images on a 2-core CPU in every CI run (~17 M parameters),
so this checks what can go wrong here: the file stays under the repository's 40 MB, loads strictly
into the float32 network through the same code the handler and the evaluator use, its records agree
with each other, and its accuracy on the first 1,000 test images on this CPU equals the figure the
GPU machine recorded for them (served_check.json: a cross-machine check of the float16 storage).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from handler.cifar100_handler import build_model as handler_build_model
from training.evaluate import build_model, load_state_dict
from training.evaluation import accuracy, predict_logits

FOLDER = Path(__file__).resolve().parents[1] / "model" / "weights" / "width10"
WEIGHTS = FOLDER / "CIFAR100_model.pth"
MAX_BYTES = 40 * 1000 * 1000  # the limit for a second shipped weights file


@pytest.fixture(scope="module")
def records():
    return {name: json.loads((FOLDER / f"{name}.json").read_text())
            for name in ("metrics", "evaluation", "served_check")}


@pytest.fixture(scope="module")
def state():
    return load_state_dict(WEIGHTS)


def test_file_is_under_the_limit_and_half_precision(state):
    assert WEIGHTS.stat().st_size < MAX_BYTES
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)


def test_loads_strictly_as_width_10_through_handler_and_evaluator(state, records):
    for net in (build_model(state), handler_build_model(state)):
        assert net.width == 10 and net.fc.out_features == 100
        # Loaded into the float32 network: the handler never runs float16 arithmetic on a CPU.
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert sum(p.numel() for p in net.parameters()) == records["metrics"]["parameters"]


def test_records_agree(records):
    metrics, evaluation, served = records["metrics"], records["evaluation"], records["served_check"]
    assert metrics["args"]["width"] == 10 and metrics["args"]["epochs"] == len(metrics["history"]) == 100
    assert evaluation["test_images"] == served["images"] == 10_000
    assert served["served_equals_in_process"] == served["images"]
    assert "cuda:0" in served["worker_log"]
    # The float16 file scores what the float32 run exported (EMA, no TTA), to 0.1 point.
    assert evaluation["top1"] == pytest.approx(metrics["final_evaluation"]["ema"]["top1"], abs=0.1)
    assert evaluation["top1"] >= 70.0


def test_first_1000_test_images_score_what_the_gpu_recorded(state, records, cifar100_test_split):
    images, labels = cifar100_test_split
    net = build_model(state).to(memory_format=torch.channels_last).eval()
    torch.manual_seed(0)
    got = accuracy(predict_logits(net, images[:1000], labels[:1000], batch_size=250), labels[:1000])
    # CPU float32 from float16-stored weights against GPU float32 from the float32 weights: a
    # rounding difference may flip an image or two, not more (0.1 point each).
    assert got["top1"] == pytest.approx(records["served_check"]["first_1000_top1_fp32"], abs=0.25)
