"""The handler's explanations in-process (the archive's files, TorchServe's Context; no server):
a batch mixing /explanations and /predictions requests and a bad image answers each as asked."""
from __future__ import annotations

import base64
import io

from PIL import Image
from ts.context import RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.cifar100_handler import CIFAR100Handler
from serving_helpers import ReferenceModel, assert_same_answer, cifar_pil, encode
from test_serving_handler import make_context, model_dir  # noqa: F401 - the unpacked archive fixture
from torchserve_fixture import weights_under_test


def handler_and_context(model_dir, **handler_settings):  # noqa: F811
    """An initialized handler and its Context, with TorchServe's own metrics cache (handle() records HandlerTime);
    ``handler_settings`` go into model-config.yaml's ``handler`` section."""
    import os

    import ts

    context = make_context(model_dir)
    context.model_yaml_config["handler"].update(handler_settings)
    context.metrics = MetricsCacheYamlImpl(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
    context.metrics.initialize_cache()
    handler = CIFAR100Handler()
    handler.initialize(context)
    return handler, context


def test_mixed_batch_explains_only_what_asked(model_dir, cifar100_test_split):  # noqa: F811
    handler, context = handler_and_context(model_dir)
    images = cifar100_test_split[0][:3]
    expected = ReferenceModel(weights_under_test(), "eager-fp32").probs_of_uint8(images)
    wide = cifar_pil(images, 2).resize((96, 32))
    rows = [{"body": bytearray(encode(cifar_pil(images, 0)))},  # prediction
            {"body": bytearray(b"not an image")},                # explanation of a bad image
            {"body": bytearray(encode(cifar_pil(images, 1)))},  # explanation
            {"body": bytearray(encode(wide))}]                   # explanation, 3:1
    explain = [False, True, True, True]
    context.request_processor = [RequestProcessor({"explain": "True"} if e else {}) for e in explain]
    answers = handler.handle(rows, context)

    assert "heatmap" not in answers[0]
    assert_same_answer(answers[0], expected[0])
    assert context.get_response_status(1)[0] == 400 and set(answers[1]) == {"error"}
    assert_same_answer(answers[2], expected[1])
    sizes = []
    for answer in answers[2:]:
        png = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"].split(",", 1)[1])))
        sizes.append(png.size)
        assert png.mode == "L" and png.getextrema()[1] == 255
    assert sizes == [(32, 32), (96, 32)]


def test_batch_of_predictions_only_stays_on_the_prediction_path(model_dir, cifar100_test_split):  # noqa: F811
    handler, context = handler_and_context(model_dir)
    rows = [{"body": bytearray(encode(cifar_pil(cifar100_test_split[0], i)))} for i in range(2)]
    context.request_processor = [RequestProcessor({}) for _ in rows]
    answers = handler.handle(rows, context)
    assert all("heatmap" not in a and isinstance(a["unsure"], bool) for a in answers)
    assert handler._explanation_model is None  # never built for predictions


def test_a_refused_multi_image_request_does_not_shift_the_explained_image(model_dir, cifar100_test_split):  # noqa: F811
    """A v1 request refused for its second image keeps none of its rows: the explanation after it is
    the Grad-CAM of its own image for its own top-1 class, as a PNG data URL (handler/explain.py)."""
    import torch

    from handler.explain import grad_cam, heatmaps
    from handler.preprocessing import normalize

    handler, context = handler_and_context(model_dir)
    images = cifar100_test_split[0][:2]
    expected = ReferenceModel(weights_under_test(), "eager-fp32").probs_of_uint8(images)
    good = base64.b64encode(encode(cifar_pil(images, 1))).decode()
    rows = [{"body": {"instances": [good, base64.b64encode(b"not an image").decode()]}},
            {"body": bytearray(encode(cifar_pil(images, 0)))}]  # its Grad-CAM has negative parts before ReLU
    context.request_processor = [RequestProcessor({"explain": "True"}) for _ in rows]
    answers = handler.handle(rows, context)

    assert context.get_response_status(0)[0] == 400 and "instances[1]" in answers[0]["error"]
    explained = answers[1]
    assert_same_answer(explained, expected[0])
    assert explained["heatmap"].startswith("data:image/png;base64,")
    batch = normalize(images[:1])
    top1 = torch.tensor([explained["index"]])
    assert explained["heatmap"] == heatmaps(handler._explanation_model, batch, top1, [(32, 32)])[0]
    cam = grad_cam(handler._explanation_model, batch, top1)
    assert cam.shape == (1, 8, 8) and cam.min() >= 0 and cam.max() == 1  # the positive evidence, peak 1


def test_heatmap_max_side_comes_from_model_config(model_dir, cifar100_test_split):  # noqa: F811
    """model-config.yaml handler.heatmap_max_side bounds the PNG's longer side; the picture's aspect stays."""
    handler, context = handler_and_context(model_dir, heatmap_max_side=48)
    rows = [{"body": bytearray(encode(cifar_pil(cifar100_test_split[0], 0).resize((96, 32))))}]
    context.request_processor = [RequestProcessor({"explain": "True"})]
    answer = handler.handle(rows, context)[0]
    png = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"].split(",", 1)[1])))
    assert png.size == (48, 16)


def test_v1_and_v2_explanations_get_a_heatmap_for_every_image(model_dir, cifar100_test_split):  # noqa: F811
    """/explanations answers a v1/v2 body (several images) with each image's heatmap, as KServe's :explain
    does: in each v1 prediction, and as a v2 output `heatmap` (BYTES, one per image). They had none."""
    import numpy as np

    from serving_helpers import v1_body, v2_body

    handler, context = handler_and_context(model_dir)
    pictures = [encode(cifar_pil(cifar100_test_split[0], i)) for i in range(3)]
    rows = [{"body": v1_body(pictures[:2])}, {"body": v2_body([pictures[2], pictures[1]])},
            {"body": bytearray(pictures[0])}]
    context.request_processor = [RequestProcessor({"explain": "True"}) for _ in rows]
    v1, v2, plain = handler.handle(rows, context)

    def pixels(data_url: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))), dtype=int)

    v1_maps = [prediction["heatmap"] for prediction in v1["predictions"]]
    v2_maps = next(output for output in v2["outputs"] if output["name"] == "heatmap")
    assert v2_maps["datatype"] == "BYTES" and v2_maps["shape"] == [2] and len(v1_maps) == 2
    # The same image's heatmap whichever request carried it (within rounding: other batch companions).
    assert np.abs(pixels(v1_maps[0]) - pixels(plain["heatmap"])).max() <= 2
    assert np.abs(pixels(v1_maps[1]) - pixels(v2_maps["data"][1])).max() <= 2
    assert np.abs(pixels(v1_maps[0]) - pixels(v1_maps[1])).max() > 10  # two pictures, two maps
