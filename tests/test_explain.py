"""Explanations end to end: real TorchServe (/explanations), the real adapter (/explain/), Grad-CAM.

* real CIFAR-100 test images: the heatmap PNG decodes, has the picture's aspect, and passes the
  deletion test (blanking the 20% of pixels it ranks highest lowers the answer's probability more
  than blanking the lowest 20%) on at least 80% of 100 images;
* explanations and predictions sent together (one batch may mix them) each get their own kind of answer;
* bad input gets exactly the errors /classify/ gives.
"""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from adapter.run import running_adapter
from benchmarks.bench_explain import deletion_drops, heatmap_pixels
from handler.calibration import load_calibration
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from serving_helpers import cifar_pil, encode

IMAGES = 100
MAX_UPLOAD_BYTES = 200_000  # small, so that the 413 case needs no 10 MB upload


@pytest.fixture(scope="module")
def adapter(torchserve, tmp_path_factory):
    # Explanations 8 at a time from one address (mixed batches, below): room for them beside the defaults' 2.
    env = {**torchserve.adapter_env(), "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
           "MAX_CLIENT_EXPLANATIONS_IN_FLIGHT": "8", "MAX_EXPLANATIONS_IN_FLIGHT": "8"}
    with running_adapter(env, tmp_path_factory.mktemp("explain-adapter") / "adapter.log") as proc:
        yield proc


def post(adapter, route: str, content: bytes, name="test.png", mime="image/png", field="image") -> httpx.Response:
    return httpx.post(f"{adapter.base_url}{route}", files={field: (name, content, mime)}, timeout=120)


def png_of(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    img.load()
    assert img.format == "PNG"
    return img


@pytest.fixture(scope="module")
def explained(adapter, cifar100_test_split):
    """/explain/ and /classify/ answers for the first IMAGES test images, sent 8 at a time (mixed batches)."""
    images, _ = cifar100_test_split
    pngs = [encode(cifar_pil(images, i)) for i in range(IMAGES)]
    with ThreadPoolExecutor(8) as pool:
        explains = pool.map(lambda png: post(adapter, "/explain/", png), pngs)
        classifies = pool.map(lambda png: post(adapter, "/classify/", png), pngs)
        return list(explains), list(classifies)


def test_explain_answers_what_classify_answers_plus_a_heatmap(explained):
    explains, classifies = explained
    for e, c in zip(explains, classifies):
        assert e.status_code == 200, e.text
        assert c.status_code == 200, c.text
        e, c = e.json(), c.json()
        assert "heatmap" not in c  # /classify/ stays as it was
        assert set(e) == set(c) | {"heatmap"}
        for key in ("prediction", "label", "index", "unsure", "model_version"):
            assert e[key] == c[key], key
        # Probabilities to float rounding: a batch's composition moves the last digits.
        assert [g["label"] for g in e["top5"]] == [g["label"] for g in c["top5"]]
        assert [g["probability"] for g in e["top5"]] == pytest.approx([g["probability"] for g in c["top5"]], abs=1e-4)
        heat = png_of(e["heatmap"])
        assert heat.size == (32, 32) and heat.mode == "L"
        assert heat.getextrema()[1] == 255  # scaled to its peak: somewhere is most responsible


def test_heatmaps_pass_the_deletion_test(explained, cifar100_test_split):
    from handler.engine import serving_model

    images, _ = cifar100_test_split
    answers = torch.tensor([r.json()["index"] for r in explained[0]])
    heat = torch.stack([heatmap_pixels(r.json()["heatmap"]) for r in explained[0]])
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    temperature = load_calibration(str(SHIPPED_WEIGHTS_DIR)).temperature
    top, bottom = deletion_drops(model, images[:IMAGES], heat, answers, temperature)
    rate = float((top > bottom).float().mean())
    print(f"deletion test: {rate:.1%} of {IMAGES} images")
    # 96.0% measured on the first 500 (README); 0.9 leaves room for 100 images, not for a broken map.
    assert rate >= 0.9


@pytest.mark.parametrize("size", [(64, 32), (30, 90), (640, 480)])
def test_heatmap_has_the_pictures_aspect(adapter, cifar100_test_split, size):
    picture = cifar_pil(cifar100_test_split[0], 7).resize(size, Image.Resampling.BILINEAR)
    r = post(adapter, "/explain/", encode(picture, "JPEG"), name="photo.jpg", mime="image/jpeg")
    assert r.status_code == 200, r.text
    width, height = png_of(r.json()["heatmap"]).size
    assert max(width, height) == min(max(size), 224)
    assert abs(width / height - size[0] / size[1]) < 0.05


def test_a_panorama_is_explained_with_the_answer_classify_gives(adapter, cifar100_test_split):
    # 1.35 MP as decoded: the adapter shrinks it. /explain/ got a reduced copy, which the handler resized to
    # other pixels than /classify/'s 32x32 input (reviewer's 3000x450 JPEG: p 0.8334 vs 0.8036).
    picture = cifar_pil(cifar100_test_split[0], 11).resize((3000, 450), Image.Resampling.BICUBIC)
    photo = encode(picture, "JPEG", quality=90)
    assert len(photo) < MAX_UPLOAD_BYTES
    e = post(adapter, "/explain/", photo, name="panorama.jpg", mime="image/jpeg")
    c = post(adapter, "/classify/", photo, name="panorama.jpg", mime="image/jpeg")
    assert (e.status_code, c.status_code) == (200, 200), e.text
    e, c = e.json(), c.json()
    assert [g["label"] for g in e["top5"]] == [g["label"] for g in c["top5"]]
    # To float rounding only, as for any image (a batch's composition moves the last digits).
    assert [g["probability"] for g in e["top5"]] == pytest.approx([g["probability"] for g in c["top5"]], abs=1e-4)
    assert png_of(e["heatmap"]).size == (224, 34)  # the picture's aspect, not the 32x32 input's


def test_torchserve_explanations_api_directly(torchserve, cifar100_test_split):
    png = encode(cifar_pil(cifar100_test_split[0], 3))
    headers = {**torchserve.key_file.header("inference"), "Content-Type": "image/png"}
    r = httpx.post(f"{torchserve.inference_url}/explanations/{torchserve.model_name}", content=png,
                   headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert png_of(r.json()["heatmap"]).size == (32, 32)
    assert "unsure" in r.json()


BAD_INPUTS = {
    # case: (what is sent, the status both routes answer)
    "not an image": (dict(content=b"shopping list: eggs, milk\n", name="notes.png"), 400),
    "empty file": (dict(content=b""), 400),
    "wrong field": (dict(content=b"\x89PNG", field="photo"), 400),
    "over the upload limit": (dict(content=b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 10)), 413),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_the_errors_classify_gives(adapter, case):
    sent, status = BAD_INPUTS[case]
    explain = post(adapter, "/explain/", **sent)
    classify = post(adapter, "/classify/", **sent)
    assert (explain.status_code, classify.status_code) == (status, status), explain.text
    assert explain.json() == classify.json() and set(explain.json()) == {"error"}


def test_no_body_and_wrong_method(adapter):
    r = httpx.post(f"{adapter.base_url}/explain/", content=b"raw", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = httpx.get(f"{adapter.base_url}/explain/")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


def test_classes_lists_the_hundred_things(adapter):
    r = httpx.get(f"{adapter.base_url}/classes")
    assert r.status_code == 200
    classes = r.json()
    assert len(classes) == 100 and classes[1] == {"index": 1, "label": "aquarium_fish", "name": "Aquarium fish"}
