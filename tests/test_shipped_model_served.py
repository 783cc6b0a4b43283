"""The shipped weights as served: 1,000 real test images through the running TorchServe get the
same top-1 as the network called in-process with the same weights and the same engine (the one
``auto`` picks on this machine: handler/engine.py), on every image.

Uses the session's real TorchServe (conftest.py), which serves model/weights/CIFAR100_model.pth
unless the tests are pointed at other weights.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from serving_helpers import ReferenceModel, cifar_pil, encode, engine_record
from torchserve_fixture import weights_under_test

N_IMAGES = 1_000
# Near-ties: a batch of another size sums floats in another order, which may swap two classes
# whose probabilities differ by less than this; every other image must agree exactly.
TIE = 2e-4


def test_1000_served_answers_agree_with_in_process_top1(torchserve_ready, cifar100_test_split):
    images, labels = cifar100_test_split
    # Spread over the split (every 10th image): all 100 classes, 10 images each.
    idx = torch.arange(0, len(labels), len(labels) // N_IMAGES)[:N_IMAGES]
    reference = ReferenceModel(weights_under_test())
    expected = reference.probs_of_uint8(images[idx])
    payloads = [encode(cifar_pil(images, int(i))) for i in idx]
    ts = torchserve_ready

    with httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0)) as client:
        def classify(data: bytes) -> httpx.Response:
            return client.post(ts.predictions_url, content=data,
                               headers={**ts.key_file.header("inference"), "Content-Type": "image/png"})
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(classify, payloads))

    assert [r.status_code for r in responses] == [200] * N_IMAGES
    # The server runs the engine auto picks here: the first candidate, not a fallback.
    from handler import engine as engines

    picked = engines.candidates("auto", torch.device("cpu"), engine_record(weights_under_test()))[0]
    assert reference.engine.name == picked
    assert {r.json()["engine"] for r in responses} == {picked}
    served = torch.tensor([r.json()["index"] for r in responses])
    in_process = expected.argmax(1)
    top2 = expected.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < TIE
    disagree = (served != in_process) & ~near_tie
    assert not disagree.any(), f"{int(disagree.sum())} of {N_IMAGES} served answers differ from in-process"
    # The served top-1 accuracy on these images is the in-process one (same images, same answers).
    served_acc = float((served == labels[idx]).float().mean())
    in_process_acc = float((in_process == labels[idx]).float().mean())
    assert abs(served_acc - in_process_acc) <= float(near_tie.float().mean())
