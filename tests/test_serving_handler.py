"""The handler class in-process, on the files of a real cifar100.mar, with TorchServe's own Context.

Cheap checks of the per-request contract (statuses, JSON, top-k setting, device choice) without
starting Java. The GPU case is mocked (torch.cuda.is_available patched): there is no GPU here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor

from handler.cifar100_handler import CIFAR100Handler
from handler.preprocessing import normalize
from model.shipped import SHIPPED_WEIGHTS_DIR
from serving.archive import build_archive, weights_version
from serving.settings import CALIBRATION_FILE, MODEL_CONFIG, read_model_config
from serving_helpers import ReferenceModel, assert_same_answer, cifar_pil, encode
from torchserve_fixture import weights_under_test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("handler")
    mar = build_archive(weights_under_test(), root / "store", quiet=True)
    with zipfile.ZipFile(mar) as z:  # what TorchServe unpacks for its worker
        z.extractall(root / "model")
    return root / "model"


def make_context(model_dir, gpu=None, topk=None, engine="eager-fp32", flip_tta=None) -> Context:
    """TorchServe's Context for the unpacked archive; the engine is eager fp32 here (these tests check
    the request contract against the fp32 reference; tests/test_shipped_model_served.py the engines)."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    config.setdefault("handler", {})["engine"] = engine
    if topk is not None:
        config.setdefault("handler", {})["topk"] = topk
    if flip_tta is not None:
        config.setdefault("handler", {})["flip_tta"] = flip_tta
    return Context("cifar100", str(model_dir), manifest, config["batchSize"], gpu, "0.12.0",
                   model_yaml_config=config)


def run_batch(handler: CIFAR100Handler, context: Context, rows: list[dict]) -> list[dict]:
    context.request_processor = [RequestProcessor({}) for _ in rows]
    handler.context = context
    return handler.postprocess(handler.inference(handler.preprocess(rows)))


def test_batch_with_bad_items_answers_each_request(model_dir, cifar100_test_split):
    context = make_context(model_dir)
    handler = CIFAR100Handler()
    handler.initialize(context)
    assert handler.device == torch.device("cpu")
    images = cifar100_test_split[0][:3]
    expected = ReferenceModel(weights_under_test(), "eager-fp32").probs_of_uint8(images)
    rows = [{"body": bytearray(encode(cifar_pil(images, 0)))}, {"body": bytearray(b"")},
            {"image": bytearray(encode(cifar_pil(images, 1)))}, {"body": bytearray(b"GIF89a junk")},
            {"body": bytearray(encode(cifar_pil(images, 2)))}]
    answers = run_batch(handler, context, rows)
    assert len(answers) == 5
    for i, image_index in ((0, 0), (2, 1), (4, 2)):
        assert context.get_response_status(i)[0] == 200
        assert_same_answer(answers[i], expected[image_index])
        assert answers[i]["model_version"] == weights_version(weights_under_test())
    assert context.get_response_status(1) == (400, "empty request: no image data received")
    assert answers[1] == {"error": "empty request: no image data received"}
    assert context.get_response_status(3)[0] == 400 and "not an image" in answers[3]["error"]
    assert all(context.get_response_headers(i)["X-Batch-Size"] == "5" for i in range(5))


def test_a_describe_header_on_the_first_request_does_not_take_the_batchs_answers(model_dir, cifar100_test_split):
    """TorchServe's BaseHandler.handle (the worker's entry point) answered a batch whose first request has
    the header describe: True with one description for all: TorchServe then failed all of them (503
    "number of batch response mismatched", 6 of 6 direct clients). Each request gets its own answer."""
    from pathlib import Path

    import ts
    from ts.context import RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    context = make_context(model_dir)
    handler = CIFAR100Handler()
    handler.initialize(context)
    images = cifar100_test_split[0][:3]
    rows = [{"body": bytearray(encode(cifar_pil(images, i)))} for i in range(3)]
    context.request_processor = [RequestProcessor({"describe": "True"}), RequestProcessor({}), RequestProcessor({})]
    context.metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    context.metrics.initialize_cache()
    context.metrics.model_name = "cifar100"
    context.metrics.set_request_ids({i: f"request-{i}" for i in range(len(rows))})
    answers = handler.handle(rows, context)
    assert len(answers) == 3
    expected = ReferenceModel(weights_under_test(), "eager-fp32").probs_of_uint8(images)
    for i in range(3):
        assert_same_answer(answers[i], expected[i])


def test_all_bad_batch_skips_the_model(model_dir):
    context = make_context(model_dir)
    handler = CIFAR100Handler()
    handler.initialize(context)
    answers = run_batch(handler, context, [{"body": bytearray(b"")}, {"photo": bytearray(b"x")}])
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]
    assert "fields: photo" in answers[1]["error"]


def test_topk_comes_from_model_config(model_dir, cifar100_test_split):
    for topk, served in ((3, 3), (1000, 100)):  # more than the classes: all 100
        context = make_context(model_dir, topk=topk)
        handler = CIFAR100Handler()
        handler.initialize(context)
        answer = run_batch(handler, context, [{"body": bytearray(encode(cifar_pil(cifar100_test_split[0], 0)))}])[0]
        assert len(answer["topk"]) == served, topk
    with pytest.raises(ValueError, match="handler.topk"):  # 0 was served as 1: the worker does not start
        CIFAR100Handler().initialize(make_context(model_dir, topk=0))


def test_flip_tta_setting_serves_the_mean_of_each_image_and_its_mirror(model_dir, cifar100_test_split, caplog):
    """handler.flip_tta: true answers softmax(mean of both logits / the flip-TTA temperature), the same
    for an image and its mirror; the shipped default is off (one forward pass per image). EngineImages
    counts the mirrors too: images through the forward pass (README)."""
    import logging
    import re
    from pathlib import Path

    import torch.nn.functional as F
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handler import engine as engines
    from PIL import Image

    from handler.calibration import load_calibration
    from model.tta import flip_tta_logits

    shipped = read_model_config(model_dir / "model-config.yaml")
    assert shipped["handler"]["flip_tta"] is False
    context = make_context(model_dir, engine="openvino-fp32", flip_tta=True)  # lossless, built in seconds
    handler = CIFAR100Handler()
    handler.initialize(context)
    assert handler.flip_tta and handler.engine.max_batch == 2 * shipped["batchSize"]
    tta = load_calibration(str(model_dir), flip_tta=True)
    assert handler.calibration == tta and tta != load_calibration(str(model_dir))  # its own temperature
    images = cifar100_test_split[0][:4]
    reference = ReferenceModel(weights_under_test(), "eager-fp32")
    with torch.inference_mode():
        expected = F.softmax(flip_tta_logits(reference.engine, normalize(images)) / tta.temperature, dim=1)
    assert not reference.flip_tta  # the tests' reference follows model-config.yaml, as served
    tta_reference = ReferenceModel(weights_under_test(), "eager-fp32", flip_tta=True)  # what tests use once it is on
    assert torch.allclose(tta_reference.probs_of_uint8(images), expected, atol=1e-6)
    pictures = [cifar_pil(images, i) for i in range(4)]
    rows = [{"body": bytearray(encode(p))} for p in pictures]
    rows += [{"body": bytearray(encode(p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))} for p in pictures]
    context.metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    context.metrics.initialize_cache()
    context.metrics.model_name = "cifar100"
    context.metrics.set_request_ids({i: f"request-{i}" for i in range(len(rows))})
    with caplog.at_level(logging.INFO):
        answers = run_batch(handler, context, rows)
    pattern = re.compile(rf"^\[METRICS\]{engines.IMAGES_METRIC}\.\w+:([0-9.]+)\|#.*Engine:{handler.engine.name}")
    assert [float(m.group(1)) for r in caplog.records if (m := pattern.match(r.getMessage()))] == [16.0]
    for i in range(4):
        assert_same_answer(answers[i], expected[i])
        assert_same_answer(answers[4 + i], expected[i])  # the mirror: the same answer
    plain = reference.probs_of_uint8(images)  # the plain forward pass: other probabilities
    assert any(abs(answers[i]["probability"] - float(plain[i].max())) > 1e-3 for i in range(4))
    assert context.get_response_headers(0)["X-Batch-Images"] == "8"  # photos, not forward-pass rows


def test_gpu_worker_uses_its_gpu_id(model_dir, monkeypatch):
    # MOCK: no GPU on this machine. TorchServe passes gpu_id; with CUDA available the handler
    # (via BaseHandler) must pick cuda:<gpu_id>. The model move is stubbed since there is no device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    handler = CIFAR100Handler()
    handler.initialize(make_context(model_dir, gpu=1))
    assert handler.device == torch.device("cuda:1")


def test_openvino_int8_counts_its_images_and_rechecks_as_torchserve_metrics(model_dir, cifar100_test_split, caplog):
    """The handler's counters through TorchServe's own metrics cache (the Prometheus lines a worker writes)."""
    import logging
    import re
    from pathlib import Path

    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handler import engine as engines

    pytest.importorskip("openvino")
    context = make_context(model_dir, engine=engines.OPENVINO_INT8)
    handler = CIFAR100Handler()
    handler.initialize(context)
    if handler.engine.name != engines.OPENVINO_INT8:
        # Skipped only where the archive has no int8 network made from these weights; any other refusal
        # (a guard, a recheck rule the record was not measured with) is a failure, not a skip.
        import hashlib

        import openvino as ov
        ir = model_dir / engines.INT8_FILE
        if not ir.is_file() or engines.int8_made_for(ov.Core().read_model(str(ir))) != hashlib.sha256(
                weights_under_test().read_bytes()).hexdigest():
            pytest.skip("no int8 network made from the weights under test (python -m training.quantize)")
        pytest.fail(f"openvino-int8 was not served: {handler.engine.name} instead ({handler.engine.info})")
    metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "cifar100"
    # 48 test images: a few that the served int8 network finds clear close calls (two largest logits within half
    # the recheck gap), the rest clearly not (beyond twice it): which ones depends on the CPU's int8 kernels.
    from model.normalization import normalize as normalized

    pool = cifar100_test_split[0][:600]
    with torch.no_grad():
        logits = torch.cat([handler.engine.forward.fast(normalized(part, channels_last=False))
                            for part in pool.split(6)])
    top2 = logits.topk(2, dim=1).values
    gaps = top2[:, 0] - top2[:, 1]
    close = (gaps < engines.RECHECK_LOGIT_GAP / 2).nonzero().flatten()[:6]
    clear = (gaps > engines.RECHECK_LOGIT_GAP * 2).nonzero().flatten()[:48 - len(close)]
    assert len(close) >= 2, gaps.min()
    images = pool[torch.cat([close, clear])]
    metrics.set_request_ids({i: f"request-{i}" for i in range(len(images))})
    context.metrics = metrics
    before = handler.engine.rechecked
    with caplog.at_level(logging.INFO):
        answers = run_batch(handler, context, [{"body": bytearray(encode(cifar_pil(images, i)))} for i in range(48)])
    assert len(answers) == 48 and all("index" in a for a in answers)
    rechecked = handler.engine.rechecked - before
    assert rechecked == len(close)  # the close calls, and only they, answered again by fp32

    def counted(name: str) -> list[float]:
        pattern = re.compile(rf"^\[METRICS\]{name}\.\w+:([0-9.]+)\|#.*Engine:{engines.OPENVINO_INT8}")
        return [float(m.group(1)) for r in caplog.records if (m := pattern.match(r.getMessage()))]

    assert counted(engines.IMAGES_METRIC) == [48.0]
    assert counted(engines.RECHECKED_METRIC) == [float(rechecked)]


def test_the_worker_drops_torchserves_per_batch_log_line_and_keeps_the_others(model_dir):
    import io
    import logging

    from handler.cifar100_handler import PER_BATCH_LOG_LINE, not_per_batch_line

    for _ in range(2):  # a second handler in the same process (tests; never two in one worker)
        CIFAR100Handler().initialize(make_context(model_dir))
    root, stream = logging.getLogger(), io.StringIO()
    sink = logging.StreamHandler(stream)
    root.addHandler(sink)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        logging.info(PER_BATCH_LOG_LINE, 1796082269)  # as ts/protocol/otf_message_handler.py logs it, per batch
        logging.info("model_name: %s, batchSize: %d", "cifar100", 6)  # TorchServe's other lines still pass
    finally:
        root.removeHandler(sink)
        root.setLevel(level)
    assert stream.getvalue() == "model_name: cifar100, batchSize: 6\n"
    assert logging.getLogger().filters.count(not_per_batch_line) == 1  # not added twice


def test_v1_and_v2_requests_in_one_batch_get_their_own_images_answers_as_tensors_in_order(model_dir,
                                                                                           cifar100_test_split):
    """KServe v1 and OIP v2 bodies through the handler in-process (tests/test_kserve.py sends them through
    Java): in a batch mixing them with a plain request, each gets its own images' answers in request order;
    v2 outputs are [n] and [n, k] row-major with OUTPUTS' datatypes (top-3 here, so [k, n] would show),
    ``outputs`` picks them in the order asked, ``id`` comes back when sent."""
    import base64
    import math

    from handler.protocols import OUTPUTS

    context = make_context(model_dir, topk=3)
    handler = CIFAR100Handler()
    handler.initialize(context)
    images = cifar100_test_split[0][:6]
    expected = ReferenceModel(weights_under_test(), "eager-fp32").probs_of_uint8(images)
    b64 = [base64.b64encode(encode(cifar_pil(images, i))).decode() for i in range(6)]
    rows = [{"body": {"id": "first", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": b64[:2]}]}},
            {"body": bytearray(encode(cifar_pil(images, 2)))},
            {"body": {"instances": [{"data": b64[3]}, b64[4]]}},
            {"body": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64[5]]}],
                      "outputs": [{"name": "topk_index"}, {"name": "probability"}]}}]
    answers = run_batch(handler, context, rows)
    assert [context.get_response_status(i)[0] for i in range(4)] == [200] * 4
    assert context.get_response_headers(0)["X-Batch-Images"] == "6"
    first = answers[0]
    assert (first["id"], first["model_name"], first["model_version"]) == (
        "first", "cifar100", weights_version(weights_under_test()))
    outputs = {o["name"]: o for o in first["outputs"]}
    assert list(outputs) == list(OUTPUTS)
    for name, out in outputs.items():
        assert out["datatype"] == OUTPUTS[name], name
        assert out["shape"] == ([2, 3] if name.startswith("topk_") else [2]), name
        assert len(out["data"]) == math.prod(out["shape"]), name
    for i in range(2):
        row = slice(3 * i, 3 * i + 3)
        topk = [{"index": index, "probability": p}
                for index, p in zip(outputs["topk_index"]["data"][row], outputs["topk_probability"]["data"][row])]
        assert_same_answer({"index": outputs["index"]["data"][i], "topk": topk}, expected[i])
        assert outputs["probability"]["data"][i] == topk[0]["probability"]
        assert outputs["label"]["data"][i] == outputs["topk_label"]["data"][3 * i]
        assert outputs["name"]["data"][i] == outputs["topk_name"]["data"][3 * i]
        assert outputs["unsure"]["data"][i] == handler.calibration.is_unsure(topk[0]["probability"])
    assert_same_answer(answers[1], expected[2])
    assert len(answers[2]["predictions"]) == 2
    for answer, image_index in zip(answers[2]["predictions"], (3, 4)):
        assert_same_answer(answer, expected[image_index])
    last = answers[3]
    assert "id" not in last
    assert [(o["name"], o["datatype"], o["shape"]) for o in last["outputs"]] == [
        ("topk_index", "INT64", [1, 3]), ("probability", "FP32", [1])]
    topk = [{"index": i, "probability": float(expected[5][i])} for i in last["outputs"][0]["data"]]
    assert_same_answer({"index": topk[0]["index"], "topk": topk}, expected[5])
    assert abs(last["outputs"][1]["data"][0] - float(expected[5].max())) < 2e-4


def test_a_refused_request_gets_its_own_4xx_and_the_rest_of_the_batch_its_own_answers(model_dir, cifar100_test_split):
    """One batch: a v1 request with one bad image of two (400 naming it), a decompression bomb (413), a v1
    request over the image limit (413); the plain requests around them get their own images' answers, with
    the engine that answered; X-Batch-Images counts only the images that reached the model."""
    import base64

    from serving_helpers import decompression_bomb_png

    context = make_context(model_dir)
    handler = CIFAR100Handler()
    handler.initialize(context)
    images = cifar100_test_split[0][:3]
    expected = ReferenceModel(weights_under_test(), "eager-fp32").probs_of_uint8(images)
    good = [encode(cifar_pil(images, i)) for i in range(3)]
    rows = [{"body": bytearray(good[0])},
            {"body": {"instances": [base64.b64encode(good[1]).decode(), base64.b64encode(b"GIF89a junk").decode()]}},
            {"body": bytearray(decompression_bomb_png())},
            {"body": {"instances": [base64.b64encode(good[1]).decode()] * 65}},
            {"body": bytearray(good[2])}]
    answers = run_batch(handler, context, rows)
    assert [context.get_response_status(i)[0] for i in range(5)] == [200, 400, 413, 413, 200]
    assert "instances[1]" in answers[1]["error"] and set(answers[1]) == {"error"}
    assert "decompression bomb" in answers[2]["error"] and "limit of 64" in answers[3]["error"]
    for i, image_index in ((0, 0), (4, 2)):
        assert_same_answer(answers[i], expected[image_index])
        assert answers[i]["engine"] == "eager-fp32"
    assert context.get_response_headers(4)["X-Batch-Images"] == "2"


def test_an_engine_whose_calibration_moved_serves_its_refit_and_flip_tta_keeps_its_own(model_dir):
    """engines.json: an engine whose logits moved gets training/engines.py's refit (temperature and unsure
    threshold); with flip TTA on, the flip-TTA fit stays (the refit is of plain logits), where the engine passed
    the guard with flip TTA too (else it is not served with flip TTA: eager fp32 is)."""
    from handler.calibration import Calibration, load_calibration

    pytest.importorskip("openvino")
    record = json.loads((model_dir / "engines.json").read_text()) if (model_dir / "engines.json").is_file() else {}
    moved = {name: e["calibration"] for name, e in record.get("engines", {}).items()
             if (e.get("calibration") or {}).get("moved")}
    if not moved:
        pytest.skip("no engine of the weights under test has a refit calibration (python -m training.engines)")
    served = []
    for name, refit in moved.items():  # each one this CPU serves (openvino-bf16 needs native bf16; int8 runs anywhere)
        handler = CIFAR100Handler()
        handler.initialize(make_context(model_dir, engine=name))
        if handler.engine.name != name:
            continue
        served.append(name)
        assert handler.calibration == Calibration(refit["temperature"], refit["unsure_threshold"]), name
        assert handler.calibration != load_calibration(str(model_dir)), name
        tta = CIFAR100Handler()
        tta.initialize(make_context(model_dir, engine=name, flip_tta=True))
        assert tta.calibration == load_calibration(str(model_dir), flip_tta=True), name
        passed_with_tta = (record["engines"][name].get("flip_tta") or {}).get("passed")
        assert tta.engine.name == (name if passed_with_tta else "eager-fp32"), name
    assert served, f"none of the engines with a refit calibration ({sorted(moved)}) is served here"


def test_the_unpacked_archive_holds_every_module_its_handler_imports(model_dir):
    # A TorchServe worker imports the handler from the unpacked archive alone: serving/images.py importing a module
    # left out of serving/archive.py's PACKAGES (serving/avif.py) killed every worker at load (session 60).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import cifar100_handler, handler.explain; import handler; print(handler.__file__)"
    done = subprocess.run([sys.executable, "-c", script], cwd=model_dir, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parent.parent == model_dir  # (the archive's handler/, not this checkout's)


def test_the_archive_is_rebuilt_when_weights_handler_or_config_change_and_kept_otherwise(tmp_path, monkeypatch):
    """`make archive` before every start is cheap: same inputs, same digest, the .mar is kept; another
    model-config.yaml, handler file or weights file changes the digest, and the archive is rebuilt."""
    import shutil

    from serving import archive

    weights = weights_under_test()
    version = weights_version(weights)
    digest = archive.inputs_digest(weights, version)
    assert archive.inputs_digest(weights, version) == digest
    config = tmp_path / "model-config.yaml"
    config.write_text(MODEL_CONFIG.read_text())
    copied = archive.inputs_digest(weights, version, config)
    assert archive.inputs_digest(weights, version, config) == copied
    config.write_text(MODEL_CONFIG.read_text().replace("topk: 5", "topk: 3"))
    assert "topk: 3" in config.read_text() and archive.inputs_digest(weights, version, config) != copied
    other = tmp_path / "weights" / weights.name
    other.parent.mkdir()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state[next(k for k, v in state.items() if v.is_floating_point())].add_(1e-3)
    torch.save(state, other)
    moved = archive.inputs_digest(other, version)
    shutil.copyfile(weights, other)
    assert moved != archive.inputs_digest(other, version)  # the weights' content, not only their path
    handler_copy = tmp_path / "cifar100_handler.py"
    handler_copy.write_text(archive.HANDLER_FILE.read_text() + "\n# changed\n")
    monkeypatch.setattr(archive, "HANDLER_FILE", handler_copy)  # the handler file as edited, outside the repo
    assert archive.inputs_digest(weights, version) != digest
    monkeypatch.undo()

    # A packaged support file (a calibration fitted on these weights beside them, a handler/ module) is an input too.
    beside = tmp_path / "fitted" / weights.name
    beside.parent.mkdir()
    shutil.copyfile(weights, beside)
    bare = archive.inputs_digest(beside, version)
    calibration = json.loads((SHIPPED_WEIGHTS_DIR / CALIBRATION_FILE).read_text())
    (beside.parent / "calibration.json").write_text(json.dumps({**calibration, "weights_sha256": archive.sha256_of(beside)}))
    assert archive.inputs_digest(beside, version) != bare
    module = tmp_path / "answers.py"
    module.write_text((archive.REPO / "handler" / "answers.py").read_text() + "\n# changed\n")
    packaged = archive.package_files
    monkeypatch.setattr(archive, "package_files", lambda w: [(module if src.name == "answers.py" else src, dest)
                                                             for src, dest in packaged(w)])
    assert archive.inputs_digest(weights, version) != digest
    monkeypatch.undo()

    store = tmp_path / "store"
    mar = build_archive(weights, store, quiet=True)
    built = mar.stat().st_mtime_ns
    assert build_archive(weights, store, quiet=True).stat().st_mtime_ns == built  # unchanged inputs: kept
    assert (store / "cifar100.mar.inputs").read_text().strip() == digest
    build_archive(weights, store, quiet=True, model_config=config)
    assert mar.stat().st_mtime_ns != built  # another config: rebuilt
    assert (store / "cifar100.mar.inputs").read_text().strip() == archive.inputs_digest(weights, version, config)


def test_another_model_config_is_packed_from_the_command_line_or_ts_model_config(tmp_path):
    """Serving other settings (flip TTA on, say) meant editing handler/model-config.yaml: the archive's CLI took
    no config. `--model-config` or TS_MODEL_CONFIG (which the adapter reads too) now name one; a file that is
    not a model config is refused by name, before torch-model-archiver runs, and no archive is written."""
    import os

    repo = Path(__file__).resolve().parents[1]
    flip = tmp_path / "flip.yaml"
    flip.write_text(MODEL_CONFIG.read_text().replace("flip_tta: false", "flip_tta: true"))
    assert flip.read_text() != MODEL_CONFIG.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("batchSize: 6\n")

    def build(store: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serving.archive", "--weights", str(weights_under_test()),
                               "--export-path", str(tmp_path / store), *args], cwd=repo, capture_output=True,
                              text=True, timeout=300, env={**os.environ, **(env or {})})

    def packed(store: str) -> str:
        with zipfile.ZipFile(tmp_path / store / "cifar100.mar") as mar:  # under its own name, which the manifest gives
            return mar.read(json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]).decode()

    assert build("by-option", "--model-config", str(flip)).returncode == 0
    assert packed("by-option") == flip.read_text()
    assert build("by-env", env={"TS_MODEL_CONFIG": str(flip)}).returncode == 0
    assert packed("by-env") == flip.read_text()
    assert build("default", env={"TS_MODEL_CONFIG": ""}).returncode == 0  # set but empty: the shipped one
    assert packed("default") == MODEL_CONFIG.read_text()

    for args, env, named in ((["--model-config", str(bad)], None, bad), ([], {"TS_MODEL_CONFIG": str(tmp_path / "gone.yaml")},
                                                                        tmp_path / "gone.yaml")):
        refused = build("refused", *args, env=env)
        assert refused.returncode == 1 and f"error: model config {named}" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and not (tmp_path / "refused" / "cifar100.mar").exists()
    started = subprocess.run([sys.executable, "-m", "serving.torchserve", "start"], cwd=repo, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "TS_MODEL_CONFIG": str(bad)})
    assert started.returncode == 2 and f"error: model config {bad}" in started.stderr, started.stderr
    status = subprocess.run([sys.executable, "-m", "serving.torchserve", "status"], cwd=repo, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "TS_MODEL_CONFIG": str(bad)})
    assert "model config" not in status.stderr and "TorchServe" in status.stdout, status  # stop/status need none


def test_an_archive_build_cut_short_or_a_truncated_archive_is_never_up_to_date(tmp_path, monkeypatch):
    """torch-model-archiver --force rewrote cifar100.mar in place while the stamp still held the previous inputs'
    digest: a build of other weights interrupted mid-write, then `make archive` of the first ones again, called the
    truncated file "up to date". A build cut short now leaves the archive whole (or absent) and no stamp, and a
    .mar that is not a zip is rebuilt whatever the stamp says."""
    from serving import archive

    weights, store = weights_under_test(), tmp_path / "store"
    other = tmp_path / "other" / weights.name
    other.parent.mkdir()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state[next(k for k, v in state.items() if v.is_floating_point())].add_(1e-3)
    torch.save(state, other)
    mar = build_archive(weights, store, quiet=True)
    whole = mar.read_bytes()
    real_run = archive.subprocess.run

    def killed_mid_write(cmd, **kwargs):  # the archiver's output half written, then Ctrl-C
        out = Path(cmd[cmd.index("--export-path") + 1]) / mar.name
        out.write_bytes(whole[:len(whole) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(archive.subprocess, "run", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        build_archive(other, store, quiet=True)
    monkeypatch.setattr(archive.subprocess, "run", real_run)
    assert zipfile.is_zipfile(mar)
    assert build_archive(weights, store, quiet=True) == mar and zipfile.ZipFile(mar).testzip() is None

    mar.write_bytes(whole[:len(whole) // 2])  # cut short by a full disk: the stamp still matches
    build_archive(weights, store, quiet=True)
    assert zipfile.is_zipfile(mar) and zipfile.ZipFile(mar).testzip() is None
    assert sorted(p.name for p in store.iterdir()) == [mar.name, mar.name + ".inputs"]  # no build folder left


def test_the_archive_version_names_the_width_and_the_weights_first_eight_hex_digits():
    import re

    from serving.archive import sha256_of

    weights = weights_under_test()
    version = weights_version(weights)
    assert re.fullmatch(r"w\d+-[0-9a-f]{8}", version), version
    width = torch.load(weights, map_location="cpu", weights_only=True)["stage1.0.conv1.weight"].shape[0] // 16  # 16k
    assert version == f"w{width}-{sha256_of(weights)[:8]}"


def test_a_request_holding_too_many_pixels_in_all_is_refused_before_any_is_decoded(model_dir):
    """MAX_REQUEST_PIXELS: each image under its own limit, together over the request's (64 images of 16 MP
    held a worker ~22 s, past TorchServe's responseTimeout with a second such request in the batch). The
    headers decide (these PNGs have no pixel data: decoded, they would be 400 corrupt, not 413); a JPEG
    counts at the scale it is decoded at, so a request of large photos still passes."""
    import base64
    import io

    from PIL import Image

    from serving.images import MAX_REQUEST_PIXELS
    from serving_helpers import png_declaring_size

    context = make_context(model_dir)
    handler = CIFAR100Handler()
    handler.initialize(context)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    headers_only = b64(png_declaring_size(4000, 4000))  # 16 MP: at the per-image limit
    photo = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 30, 40)).save(photo, "JPEG")  # 64 MP, decoded at 1/8: 1 MP
    flat = io.BytesIO()
    Image.new("RGB", (4000, 4000), (20, 90, 160)).save(flat, "PNG")
    rows = [{"body": {"instances": [headers_only] * (MAX_REQUEST_PIXELS // 16_000_000 + 1)}},
            {"body": {"instances": [headers_only] * 2}},
            {"body": {"instances": [b64(flat.getvalue())] + [b64(photo.getvalue())] * 8}}]
    answers = run_batch(handler, context, rows)
    assert [context.get_response_status(i)[0] for i in range(3)] == [413, 400, 200], answers
    assert "80 MP to decode in all, above the 64 MP limit per request" in answers[0]["error"]
    assert "corrupt" in answers[1]["error"]
    assert len(answers[2]["predictions"]) == 9


def test_weights_of_another_class_count_than_the_names_are_refused_at_start_and_by_the_archive(model_dir, tmp_path):
    """A 101-class network with CIFAR-100's 100 names would fail every batch whose top-k reaches class 100: the
    TorchServe worker, KServe's predictor and the archive build refuse it with one clear line instead."""
    import shutil

    from model import CIFAR100Model, WeightsError
    from serving.archive import ArchiveError

    wider = tmp_path / "model"
    shutil.copytree(model_dir, wider)
    manifest = json.loads((wider / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    torch.save(CIFAR100Model(width=1, num_classes=101).state_dict(), wider / manifest["serializedFile"])
    refused = "a network of 101 classes, but index_to_name.json names 100"
    with pytest.raises(WeightsError, match=refused):
        CIFAR100Handler().initialize(make_context(wider))
    # KServe's predictor in a process of its own: tests/kserve_types.py registers the kserve package bare in
    # this one (test_kserve_manifests.py), where KServe's model server does not import.
    load = ("import sys; from pathlib import Path; from handler.kserve_predictor import CIFAR100Predictor\n"
            "try:\n    CIFAR100Predictor('cifar100', Path(sys.argv[1]), 'eager-fp32').load()\n"
            "except Exception as err:\n    print(type(err).__name__, err); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", load, str(wider)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 3 and done.stdout.startswith("WeightsError") and refused in done.stdout, (done.stdout, done.stderr[-2000:])
    with pytest.raises(ArchiveError, match=refused):
        weights_version(wider / manifest["serializedFile"])


def weights_copy(model_dir: Path, into: Path, change) -> Path:
    """The unpacked archive under ``into``, its weights passed through ``change(state_dict)``."""
    import shutil

    shutil.copytree(model_dir, into)
    serialized = into / json.loads((into / "MAR-INF" / "MANIFEST.json").read_text())["model"]["serializedFile"]
    state = torch.load(serialized, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, serialized)
    return into


def _diverged(state):
    state["fc.weight"][3, 5] = float("nan")


def _overflowing(state):
    state["fc.weight"] *= 1e38  # every value finite, every logit infinite


@pytest.mark.parametrize("change, refused", [(_diverged, "NaN or infinite values in 'fc.weight'"),
                                             (_overflowing, "give NaN or infinite logits for a blank image")])
def test_weights_holding_nan_or_overflowing_are_refused_at_start_and_by_the_archive(model_dir, tmp_path, change,
                                                                                  refused):
    """A diverged training run leaves NaN weights: served, every answer was NaN (TorchServe sent the
    non-JSON literal, the adapter a 500 for each); the worker and the archive build refuse them instead.
    Finite weights that overflow started, then answered every request 500 while /health said ok: refused
    the same way now (one check, model/weights.py, which KServe's predictor's serving_model runs too)."""
    from handler.engine import serving_model
    from model import WeightsError
    from serving.archive import ArchiveError

    broken = weights_copy(model_dir, tmp_path / "model", change)
    with pytest.raises(WeightsError, match=refused):
        CIFAR100Handler().initialize(make_context(broken))
    serialized = next(broken.glob("*.pth"))
    with pytest.raises(ArchiveError, match=refused):
        weights_version(serialized)
    with pytest.raises(WeightsError, match=refused):
        serving_model(torch.load(serialized, map_location="cpu", weights_only=True))


def test_an_answer_that_is_not_finite_is_a_500_naming_it_logged_once_with_its_request_id(model_dir, tmp_path,
                                                                                         cifar100_test_split, caplog,
                                                                                         monkeypatch):
    """Finite weights can still overflow: every logit is then infinite and every probability NaN, which no
    JSON can carry. Each such request gets a 500 that says why (said once in the worker's log, with the
    request's X-Request-ID); a request the handler refuses gets its 4xx and a log line with its id (the
    adapter sends its X-Request-ID on: model_log.log can now be tied to the adapter's access line).
    The start's probe (one blank image) refuses these weights; weights that overflow only on some images
    would pass it, so here the probe is left out to reach the per-request rule."""
    import base64
    import logging

    import model.weights
    from handler.answers import NOT_FINITE
    from ts.context import RequestProcessor

    monkeypatch.setattr(model.weights, "check_finite_output", lambda network, source="weights": None)

    def overflowing(state):
        state["fc.weight"] = torch.full_like(state["fc.weight"], 3e38)  # finite, but each logit sums to infinity
    context = make_context(weights_copy(model_dir, tmp_path / "model", overflowing))
    handler = CIFAR100Handler()
    handler.initialize(context)
    png = encode(cifar_pil(cifar100_test_split[0], 0))
    rows = [{"body": bytearray(png)}, {"body": bytearray(b"")},
            {"body": {"instances": [base64.b64encode(png).decode()]}}, {"body": bytearray(png)}]
    headers = [{"X-Request-ID": "corr-0"}, {"X-Request-ID": "corr-1"}, {"x-request-id": "corr-2"},
               {"X-Request-ID": "corr-3", "explain": "True"}]
    with caplog.at_level(logging.INFO, logger="handler.cifar100_handler"):
        for _ in range(2):  # a second batch: no second log line
            context.request_processor = [RequestProcessor(h) for h in headers]
            handler.context = context
            data = handler.preprocess(rows)
            answers = handler.explain_handle(data, rows)  # TorchServe's path when a request asks to explain
            assert [context.get_response_status(i)[0] for i in range(4)] == [500, 400, 500, 500], answers
            assert answers[0] == answers[2] == answers[3] == {"error": NOT_FINITE}  # no heatmap either
            json.dumps(answers, allow_nan=False)
    failed = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(failed) == 1 and "request 'corr-0' failed" in failed[0] and NOT_FINITE in failed[0], failed
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["request 'corr-1' refused: 400 empty request: no image data received"] * 2, refused
