"""Temperature scaling: the stored calibration reproduces what the model card reports, and ships.

The served network's logits on the whole CIFAR-100 test split are computed here again (in-process,
as the handler runs it); the stored temperature must give the reported held-out figures.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from handler.calibration import load_calibration
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from serving.archive import package_files
from serving.settings import CALIBRATION_FILE
from training.calibrate import (calibrate, choose_unsure_threshold, expected_calibration_error,
                                split_halves)

RECORD = SHIPPED_WEIGHTS_DIR / CALIBRATION_FILE


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def test_logits(shipped_test_split_logits):
    plain, _, labels = shipped_test_split_logits
    return plain, labels


def test_record_is_for_the_shipped_weights(record):
    assert record["weights_sha256"] == hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()
    assert (RECORD, CALIBRATION_FILE) in package_files(SHIPPED_WEIGHTS)  # goes into the archive


def test_stored_temperature_reproduces_the_held_out_figures(record, test_logits):
    logits, labels = test_logits
    _, held = split_halves(len(labels))
    t = load_calibration(str(RECORD.parent)).temperature
    assert t == record["temperature"] and t != 1.0
    before = F.softmax(logits[held], dim=1)
    after = F.softmax(logits[held] / t, dim=1)
    assert expected_calibration_error(before, labels[held]) == pytest.approx(record["held_out"]["ece_before"], abs=2e-4)
    assert expected_calibration_error(after, labels[held]) == pytest.approx(record["held_out"]["ece_after"], abs=2e-4)
    assert record["held_out"]["ece_after"] < record["held_out"]["ece_before"]
    # The threshold is the one the held-out half gives.
    assert choose_unsure_threshold(after, labels[held])["threshold"] == record["unsure"]["threshold"]


def test_model_card_says_the_unsure_figures_are_in_sample_and_gives_the_held_out_ones(record, test_logits):
    """The threshold is chosen on the odd half and its figures counted there too (in-sample, which the
    card called held out): the card says so, and its figures for a threshold chosen on the even half are
    what the stored T gives (0.2 points: the served network's logits differ a little between CPUs)."""
    import re

    logits, labels = test_logits
    fit, held = split_halves(len(labels))
    t = record["temperature"]
    threshold = choose_unsure_threshold(F.softmax(logits[fit] / t, dim=1), labels[fit])["threshold"]
    confidence, predicted = F.softmax(logits[held] / t, dim=1).max(dim=1)
    correct, unsure = (predicted == labels[held]).float(), confidence < threshold
    card = " ".join((SHIPPED_WEIGHTS_DIR.parent / "README.md").read_text().split())
    assert "These three figures are *in-sample*" in card
    stated = re.search(r"Chosen on the even half instead, the threshold is ([\d.]+), and on the odd half ([\d.]+)% of "
                       r"answers are then unsure, right ([\d.]+)% of the time; the others ([\d.]+)%", card)
    assert stated, "model/README.md: the held-out unsure figures"
    assert float(stated[1]) == threshold != record["unsure"]["threshold"]
    measured = [100 * float(unsure.float().mean()), 100 * float(correct[unsure].mean()), 100 * float(correct[~unsure].mean())]
    assert [float(x) for x in stated.groups()[1:]] == pytest.approx(measured, abs=0.2)


SERVED_IMAGES = 300


def test_served_answers_carry_the_calibrated_probability_and_unsure_below_the_stored_threshold(
        record, test_logits, torchserve_ready, cifar100_test_split):
    """What a client gets: the probability softmax(logits / T) with the stored T, and `unsure`
    exactly when it is under the stored threshold (on images from both sides of it)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from handler.preprocessing import normalize
    from serving_helpers import ReferenceModel, cifar_pil, encode, engine_record
    from torchserve_fixture import weights_under_test

    if weights_under_test() != SHIPPED_WEIGHTS:
        pytest.fail("this test checks the shipped weights' calibration record; unset CIFAR100_TEST_WEIGHTS")
    logits, _ = test_logits
    images = cifar100_test_split[0]
    ts = torchserve_ready
    headers = {**ts.key_file.header("inference"), "Content-Type": "image/png"}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: client.post(ts.predictions_url, headers=headers,
                                                        content=encode(cifar_pil(images, i))), range(SERVED_IMAGES)))
    assert [r.status_code for r in responses] == [200] * SERVED_IMAGES
    served = [r.json() for r in responses]
    # The served engine's logits (handler/engine.py: compiled bf16 where the CPU has it), in-process.
    reference = ReferenceModel(weights_under_test())
    with torch.inference_mode():
        served_logits = reference.engine(normalize(images[:SERVED_IMAGES]))
    # The stored temperature, unless training/engines.py refit one for this engine (engines.json).
    refit = (engine_record(weights_under_test()) or {}).get("engines", {}).get(reference.engine.name, {})
    moved = refit.get("calibration", {}).get("moved")
    if not moved:
        assert reference.temperature == record["temperature"]
    calibrated = F.softmax(served_logits.float() / reference.temperature, dim=1).max(dim=1).values
    # The engine's own threshold when its calibration moved (openvino-int8's, where bf16 is not native).
    threshold = refit["calibration"]["unsure_threshold"] if moved else record["unsure"]["threshold"]
    for i, answer in enumerate(served):
        assert answer["probability"] == pytest.approx(float(calibrated[i]), abs=1e-3), i
        assert answer["unsure"] is (answer["probability"] < threshold), (i, answer["probability"], threshold)
    flags = {answer["unsure"] for answer in served}
    assert flags == {True, False}, "the images must fall on both sides of the threshold"


def test_flip_tta_has_its_own_stored_fit_and_buys_top1(record, test_logits, shipped_test_split_logits):
    """The flip_tta entry (handler.flip_tta) is what training.calibrate fits on the averaged logits,
    sharper than plain ones (a lower temperature), and flip TTA is more accurate on the test split."""
    _, tta_logits, labels = shipped_test_split_logits
    refit = calibrate(tta_logits, labels)
    stored = record["flip_tta"]
    assert refit["temperature"] == pytest.approx(stored["temperature"], rel=1e-3)
    assert refit["unsure"]["threshold"] == stored["unsure"]["threshold"]
    assert load_calibration(str(RECORD.parent), flip_tta=True).temperature == stored["temperature"]
    assert stored["temperature"] < record["temperature"]
    plain_top1 = float((test_logits[0].argmax(1) == labels).float().mean())
    tta_top1 = float((tta_logits.argmax(1) == labels).float().mean())
    assert tta_top1 > plain_top1 + 0.005, (tta_top1, plain_top1)  # the model card's +1.0 point


def test_refitting_gives_the_stored_temperature(record, test_logits):
    refit = calibrate(*test_logits)
    assert refit["temperature"] == pytest.approx(record["temperature"], rel=1e-3)


def test_fit_recovers_a_known_temperature():
    # Labels drawn from softmax(z / 2): the best temperature for logits z is 2.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=gen) * 3
    labels = torch.multinomial(F.softmax(z / 2, dim=1), 1, generator=gen)[:, 0]
    from training.calibrate import fit_temperature
    assert fit_temperature(z, labels) == pytest.approx(2.0, rel=0.05)


def test_summary_when_every_held_out_answer_is_unsure():
    # Ten classes, near-uniform logits: every answer under any threshold (sure_accuracy is None).
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 10, generator=gen) * 0.01
    labels = torch.randint(0, 10, (400,), generator=gen)
    result = calibrate(logits, labels)
    assert result["unsure"]["sure_accuracy"] is None and result["unsure"]["unsure_share"] == 1.0
    from training.calibrate import summary
    assert "(sure ones no answer)" in summary(result)
