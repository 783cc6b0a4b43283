"""Logits -> each image's answer: the top-k with calibrated probabilities and the "unsure" flag, the
shape the adapter and the v1/v2 bodies (handler/protocols.py) read. One copy for TorchServe's
handler and KServe's predictor (handler/kserve_predictor.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from handler.calibration import Calibration
from model.classes import display_name
from serving.settings import TOP_K  # model-config.yaml's handler.topk overrides it


def served_topk(handler_config: dict, classes: int) -> int:
    """Answers per image: model-config.yaml's ``handler.topk`` (default TOP_K), at most the classes.
    ValueError (the worker does not start, and says why) for anything but a whole number of 1 or more:
    0 and -3 were served as 1 and 2.7 as 2, without a word."""
    topk = handler_config.get("topk", TOP_K)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"handler.topk in model-config.yaml must be a whole number of 1 or more, not {topk!r}")
    return min(topk, classes)


# Why an image gets no answer when its logits or probabilities are NaN or infinite: weights that overflow
# (finite, but huge) answer so, and such a probability has no JSON form (Python writes NaN, parsers refuse it).
NOT_FINITE = "The model's output is not finite (NaN or infinity): the weights it serves are broken."


def image_answers(logits: torch.Tensor, calibration: Calibration, topk: int, labels: list[str],
                  model_version: str, engine_name: str) -> list[dict | None]:
    """One dict per row of ``logits``: prediction, label, index, probability, topk, unsure, model_version, engine;
    None for a row whose logits or probabilities are not finite (NOT_FINITE)."""
    # Temperature scaling (training/calibrate.py): honest probabilities, same order, same top-1.
    scaled = F.softmax(logits.float() / calibration.temperature, dim=1)
    finite = (torch.isfinite(logits).all(dim=1) & torch.isfinite(scaled).all(dim=1)).cpu().tolist()
    probs, indices = torch.topk(scaled, topk, dim=1)
    answers = []
    for ok, item_probs, item_indices in zip(finite, probs.cpu().tolist(), indices.cpu().tolist()):
        if not ok:
            answers.append(None)
            continue
        top = [{"label": labels[i], "name": display_name(labels[i]), "index": i, "probability": round(p, 6)}
               for p, i in zip(item_probs, item_indices)]
        answers.append({"prediction": top[0]["name"], "label": top[0]["label"], "index": top[0]["index"],
                        "probability": top[0]["probability"], "topk": top,
                        "unsure": calibration.is_unsure(item_probs[0]), "model_version": model_version,
                        "engine": engine_name})
    return answers
