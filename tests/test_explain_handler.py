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


def handler_and_context(model_dir):  # noqa: F811
    """An initialized handler and its Context, with TorchServe's own metrics cache (handle() records HandlerTime)."""
    import os

    import ts

    context = make_context(model_dir)
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
