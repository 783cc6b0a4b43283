"""handler/answers.py and handler/calibration.py: logits -> each image's answer, as both servers give it
(top-k held to the classes, the temperature applied, "unsure" below the threshold, flip TTA's own fit)."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from handler.answers import image_answers, served_topk
from handler.calibration import Calibration, load_calibration
from serving.settings import CALIBRATION_FILE, TOP_K

LABELS = [f"class_{i}" for i in range(10)]


def test_topk_is_the_setting_held_to_the_number_of_classes_and_a_bad_one_is_refused():
    assert served_topk({}, 100) == TOP_K
    assert served_topk({"topk": 3}, 100) == 3
    assert served_topk({"topk": 500}, 100) == 100
    # Served as 1, 1 and 2 without a word: the worker now refuses to start, naming the setting.
    for bad in (0, -3, 2.7, "5", True, None):
        with pytest.raises(ValueError, match=rf"handler.topk .* not {re.escape(repr(bad))}"):
            served_topk({"topk": bad}, 100)


def test_the_temperature_divides_the_logits_and_unsure_is_under_the_threshold():
    logits = torch.tensor([[8.0, 1.0] + [0.0] * 8, [1.0, 0.9] + [0.0] * 8])
    sure, unsure = image_answers(logits, Calibration(2.0, 0.5), 3, LABELS, "w3-test", "eager-fp32")
    expected = F.softmax(logits / 2.0, dim=1)
    assert sure["probability"] == round(float(expected[0].max()), 6) != round(float(F.softmax(logits[0], 0).max()), 6)
    assert [t["probability"] for t in sure["topk"]] == [round(float(p), 6) for p in expected[0].topk(3).values]
    assert (sure["index"], sure["prediction"], sure["label"]) == (0, "Class 0", "class_0")
    assert sure["unsure"] is False and unsure["unsure"] is True  # 0.85 and 0.15 against 0.5
    plain = image_answers(logits, Calibration(), 3, LABELS, "w3-test", "eager-fp32")
    assert plain[1]["unsure"] is False  # no threshold: nothing is unsure
    assert plain[0]["probability"] == round(float(F.softmax(logits[0], 0).max()), 6)


def test_flip_tta_is_served_with_its_own_fit_else_the_plain_one(tmp_path):
    record = {"temperature": 1.5, "unsure": {"threshold": 0.4},
              "flip_tta": {"temperature": 1.2, "unsure": {"threshold": 0.6}}}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(record))
    assert load_calibration(str(tmp_path)) == Calibration(1.5, 0.4)
    assert load_calibration(str(tmp_path), flip_tta=True) == Calibration(1.2, 0.6)
    del record["flip_tta"]
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(record))
    assert load_calibration(str(tmp_path), flip_tta=True) == Calibration(1.5, 0.4)
    assert load_calibration(str(tmp_path / "none")) == Calibration()


def test_unsure_is_strictly_under_the_threshold():
    # README: unsure "under" the threshold; a top-1 of exactly the threshold is sure, one ulp under it not.
    import math

    logits = torch.tensor([[2.0, 1.0] + [0.0] * 8])
    top1 = float(F.softmax(logits / 1.5, dim=1)[0].max())
    at, above = (image_answers(logits, Calibration(1.5, threshold), 3, LABELS, "w3-test", "eager-fp32")[0]
                 for threshold in (top1, math.nextafter(top1, 1)))
    assert at["unsure"] is False and above["unsure"] is True


def test_a_row_of_nan_or_infinite_logits_gets_no_answer_and_the_others_theirs():
    logits = torch.tensor([[2.0, 1.0] + [0.0] * 8, [float("nan")] + [0.0] * 9,
                           [float("inf")] + [0.0] * 9, [-float("inf")] + [0.0] * 9])
    answers = image_answers(logits, Calibration(1.5, 0.5), 3, LABELS, "w3-test", "eager-fp32")
    assert answers[0]["label"] == "class_0" and answers[1:] == [None, None, None]


@pytest.mark.parametrize("temperature", [0, -1, float("nan")])
def test_a_temperature_that_is_not_positive_is_refused(tmp_path, temperature):
    # 0 gives NaN or infinite probabilities for every answer, a negative one turns the ranking upside down.
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"temperature": temperature, "unsure": {"threshold": 0.5}}))
    with pytest.raises(ValueError, match="temperature must be positive"):
        load_calibration(str(tmp_path))
