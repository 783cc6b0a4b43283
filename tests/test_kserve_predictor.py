"""KServe's own Python model server on the KServe bundle (handler/kserve_predictor.py): the Open
Inference Protocol without TorchServe, and the adapter in OIP mode in front of it.

Real processes and HTTP: the bundle built by ``make kserve-bundle``'s code, the predictor started as
its container would run it (serving/kserve.py KServePredictor), real CIFAR-100 test images; the
reference answers come from the same network and engine in-process.
"""
from __future__ import annotations

import base64
import codecs
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from serving.archive import weights_version
from serving.kserve import KServePredictor, build_bundle
from serving.rotating_log import stderr_file
from serving.torchserve import read_properties
from serving_helpers import assert_same_answer, cifar_pil, decompression_bomb_png, encode, v1_body, v2_answers, v2_body
from torchserve_fixture import weights_under_test
from warm_child import WarmChild

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 120
CONCURRENCY = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(weights_under_test(), tmp_path_factory.mktemp("kserve-bundle") / "dist-kserve", quiet=True)


@pytest.fixture(scope="module")
def kserve_predictor(bundle, tmp_path_factory):
    predictor = KServePredictor(tmp_path_factory.mktemp("kserve-predictor"), bundle)
    predictor.start()
    yield predictor
    predictor.stop()


def infer_url(predictor: KServePredictor) -> str:
    return f"{predictor.url}/v2/models/cifar100/infer"


def counters(predictor: KServePredictor) -> dict[str, float]:
    """The predictor's own Prometheus counters, summed over their labels."""
    text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    names = "EngineImages_total|EngineRecheckedImages_total|ForwardBatches_total"
    for name, value in re.findall(rf"^({names})\{{[^}}]*\}} (\S+)$", text, re.M):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def test_test_images_get_the_in_process_answer_through_shared_forward_passes(kserve_predictor, client, reference,
                                                                             cifar100_test_split):
    images = cifar100_test_split[0][:N_IMAGES]
    expected = reference.probs_of_uint8(images)
    payloads = [encode(cifar_pil(images, i)) for i in range(N_IMAGES)]
    before = counters(kserve_predictor)

    def call(i):
        return client.post(infer_url(kserve_predictor), json=v2_body([payloads[i]], request_id=f"req-{i}"))

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        responses = list(pool.map(call, range(N_IMAGES)))
    version = weights_version(weights_under_test())
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["id"], body["model_name"], body["model_version"]) == (f"req-{i}", "cifar100", version)
        assert body["parameters"] == {"engine": reference.engine.name}  # the forward pass that answered
        [answer] = v2_answers(body)
        assert_same_answer(answer, expected[i])
    after = counters(kserve_predictor)
    images_run = after["EngineImages_total"] - before.get("EngineImages_total", 0)
    batches = after["ForwardBatches_total"] - before.get("ForwardBatches_total", 0)
    assert images_run == N_IMAGES
    assert batches < N_IMAGES, "no two concurrent requests shared a forward pass"


def test_v1_several_images_and_chosen_outputs_are_answered_in_order(kserve_predictor, client, reference,
                                                                    cifar100_test_split):
    images = cifar100_test_split[0][N_IMAGES:N_IMAGES + 5]
    expected = reference.probs_of_uint8(images)
    payloads = [encode(cifar_pil(images, i)) for i in range(5)]
    v1 = client.post(f"{kserve_predictor.url}/v1/models/cifar100:predict", json=v1_body(payloads))
    assert v1.status_code == 200, v1.text
    assert len(v1.json()["predictions"]) == 5
    for i, answer in enumerate(v1.json()["predictions"]):
        assert_same_answer(answer, expected[i])
    b64 = [base64.b64encode(p).decode() for p in payloads]
    two_inputs = {"inputs": [{"name": "first", "shape": [1], "datatype": "BYTES", "data": [b64[0]]},
                             {"name": "more", "shape": [2, 2], "datatype": "BYTES", "data": [b64[1:3], b64[3:]]}]}
    v2 = client.post(infer_url(kserve_predictor), json=two_inputs, headers={"X-Request-ID": "from-the-edge"})
    assert v2.status_code == 200, v2.text
    assert v2.json()["id"] == "from-the-edge"  # none in the body: the caller's request id
    for i, answer in enumerate(v2_answers(v2.json())):
        assert_same_answer(answer, expected[i])
    # Unlike KServe's TorchServe wrapper (README), this server honours an outputs selection.
    chosen = client.post(infer_url(kserve_predictor),
                         json={**v2_body(payloads[:1]), "outputs": [{"name": "name"}, {"name": "topk_index"}]})
    assert chosen.status_code == 200, chosen.text
    assert [o["name"] for o in chosen.json()["outputs"]] == ["name", "topk_index"]


def test_an_explanation_is_the_answer_plus_a_heatmap_with_the_pictures_aspect(kserve_predictor, client, reference,
                                                                              cifar100_test_split):
    import io

    from PIL import Image

    images = cifar100_test_split[0][:2]
    expected = reference.probs_of_uint8(images)
    wide = cifar_pil(images, 1).resize((96, 48))  # its heatmap follows the picture's aspect
    payloads = [encode(cifar_pil(images, 0)), encode(wide)]
    r = client.post(f"{kserve_predictor.url}/v1/models/cifar100:explain", json=v1_body(payloads))
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    assert_same_answer(first, expected[0])
    sizes = []
    for answer in (first, second):
        assert answer["heatmap"].startswith("data:image/png;base64,")
        heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"].split(",", 1)[1])))
        assert heatmap.mode == "L" and heatmap.getextrema()[1] == 255  # the peak of its evidence
        sizes.append(heatmap.size)
    assert sizes == [(32, 32), (96, 48)]


def test_an_explanation_is_answered_with_its_own_headers_not_the_requests(kserve_predictor, client,
                                                                         cifar100_test_split):
    """KServe's :explain route answered with a copy of the request's headers: a client's Authorization and
    Cookie came back, curl -d's form Content-Type labelled the JSON answer, and a chunked request's answer
    had Transfer-Encoding beside Content-Length. Now: none of them, application/json, and a chunked request
    is answered readably; a binary CloudEvent is still answered as one (KServe reads the request's ce-
    headers for that), with its own ce-id."""
    url = f"{kserve_predictor.url}/v1/models/cifar100:explain"
    body = json.dumps(v1_body([encode(cifar_pil(cifar100_test_split[0], 0))])).encode()
    sent = {"Authorization": "Bearer secret", "Cookie": "session=secret", "X-Echo": "me",
            "Content-Type": "application/x-www-form-urlencoded"}
    r = client.post(url, content=body, headers=sent)
    assert r.status_code == 200 and r.json()["predictions"][0]["heatmap"], r.text
    assert r.headers["content-type"] == "application/json", r.headers
    assert not {"authorization", "cookie", "x-echo"} & set(r.headers), r.headers
    chunked = client.post(url, content=iter([body[:100], body[100:]]), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 200 and chunked.json()["predictions"][0]["heatmap"], chunked.text
    assert "transfer-encoding" not in chunked.headers, chunked.headers
    event = client.post(url, content=body, headers={"Content-Type": "application/json", "ce-specversion": "1.0",
                                                    "ce-source": "test", "ce-type": "explain", "ce-id": "asked-1"})
    assert event.status_code == 200 and event.json()["predictions"][0]["heatmap"], event.text
    assert event.headers["ce-type"] == "io.kserve.inference.response" and event.headers["ce-id"] != "asked-1"


def test_refused_requests_get_their_4xx_and_error_and_the_server_goes_on(kserve_predictor, client, bundle,
                                                                        cifar100_test_split):
    good = encode(cifar_pil(cifar100_test_split[0], 0))
    url = infer_url(kserve_predictor)
    limit = int(read_properties(bundle / "config" / "config.properties")["max_request_size"])
    cases = [
        (v2_body([good, b"name,score\nalice,3\n" * 20]), 400, "inputs[0] ('image') data[1]: not an image"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
        (v2_body([decompression_bomb_png()]), 413, "limit"),
        (v2_body([good] * 65), 413, "above the limit of 64"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, 400, "base64"),
        ({"instances": [{"pixels": "x"}]}, 400, "instances[0]"),
    ]
    for body, status, words in cases:
        r = client.post(url if "inputs" in body else f"{kserve_predictor.url}/v1/models/cifar100:predict", json=body)
        assert r.status_code == status and words in r.json()["error"], (words, r.status_code, r.text)
    # A body over max_request_size (the bundle's config.properties, as TorchServe): 413 whether it says its
    # length or streams it in chunks, before any of it is parsed.
    big = b"{" + b" " * limit + b"}"
    declared = client.post(url, content=big, headers={"Content-Type": "application/json"})
    chunked = client.post(url, content=iter([big[:limit // 2], big[limit // 2:]]),
                          headers={"Content-Type": "application/json"})
    for r in (declared, chunked):
        assert r.status_code == 413 and "max_request_size" in r.json()["error"], r.text
    # The binary tensor extension (tritonclient's binary_data=True): refused as on TorchServe, not KServe's own
    # decoding failure (a 500 that echoes the image's bytes).
    raw = len(good).to_bytes(4, "little") + good
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    binary = client.post(url, content=head + raw, headers={"Inference-Header-Content-Length": str(len(head)),
                                                           "Content-Type": "application/octet-stream"})
    assert binary.status_code == 400 and "binary tensor extension" in binary.json()["error"], binary.text
    malformed = client.post(url, content=b'{"inputs": [', headers={"Content-Type": "application/json"})
    # KServe's own parser answers first (FastAPI's 422), as {"error": ...}
    assert malformed.status_code == 422 and "not an inference request" in malformed.json()["error"], malformed.text
    r = client.post(url, json=v2_body([good]))
    assert r.status_code == 200 and kserve_predictor.process.poll() is None, r.text


def test_bodies_that_no_route_could_parse_get_a_400_that_says_why(kserve_predictor, client, cifar100_test_split):
    """JSON that Python's parser takes but KServe's route failed on with a 500 (NaN; data nested past the
    recursion limit), and a v2 body of another Content-Type (KServe's route blamed a missing binary
    extension header); a v1 body of another Content-Type is read as JSON, as on TorchServe."""
    good = base64.b64encode(encode(cifar_pil(cifar100_test_split[0], 0))).decode()
    url = infer_url(kserve_predictor)

    def nested(depth: int) -> bytes:
        return ('{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": '
                + "[" * depth + json.dumps(good) + "]" * depth + "}]%s}").encode()
    json_type = {"Content-Type": "application/json"}
    for route in (b"", b', "parameters": {}'):  # the plain route, then KServe's
        for depth, words in ((600, "nested deeper than"), (5000, "nested too deeply")):
            r = client.post(url, content=nested(depth) % route, headers=json_type)
            assert r.status_code == 400 and words in r.json()["error"], (route, depth, r.status_code, r.text[:200])
        body = ('{"inputs": [{"name": "image", "shape": [NaN], "datatype": "BYTES", "data": ["%s"]}]%s}'
                % (good, route.decode())).encode()
        r = client.post(url, content=body, headers=json_type)
        assert r.status_code == 400 and "NaN is not a JSON number" in r.json()["error"], (route, r.text[:200])
        # A shape's product Python would not print (4,341 digits: a 500 and its traceback in the log).
        body = ('{"inputs": [{"name": "image", "shape": [%s], "datatype": "BYTES", "data": ["%s"]}]%s}'
                % (", ".join([str(10**31)] * 140), good, route.decode())).encode()
        r = client.post(url, content=body, headers=json_type)
        assert r.status_code == 400 and "shape has 140 dimensions, more than 32" in r.json()["error"], (route, r.text)
    r = client.post(url, content=json.dumps(v2_body([base64.b64decode(good)])), headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"], r.text[:200]
    v1 = client.post(f"{kserve_predictor.url}/v1/models/cifar100:predict", content=json.dumps({"instances": [good]}),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d's type
    assert v1.status_code == 200 and v1.json()["predictions"][0]["label"], v1.text[:200]
    # No Content-Type at all: read as JSON, on the plain route and KServe's (which took it for the binary
    # extension's and answered 400 "'inference-header-content-length' header is missing").
    for extra in ({}, {"parameters": {}}):
        r = client.post(url, content=json.dumps({**v2_body([base64.b64decode(good)]), **extra}).encode())
        assert "content-type" not in r.request.headers
        assert r.status_code == 200 and r.json()["outputs"][0]["data"], (extra, r.text[:200])
    assert client.post(url, json=v2_body([base64.b64decode(good)])).status_code == 200
    assert kserve_predictor.process.poll() is None


def predict_histogram_count(predictor: KServePredictor) -> float:
    """KServe's own latency histogram of its model's predict step (``request_predict_seconds``)."""
    text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'^request_predict_seconds_count\{[^}]*\} (\S+)$', text, re.M))


def test_plain_v2_bodies_skip_fastapi_and_are_answered_as_kserves_route_answers(kserve_predictor, client,
                                                                                  cifar100_test_split):
    """A plain v2 JSON body is answered past FastAPI and pydantic (PlainV2Route: half the event loop's
    time per image); the same request with ``parameters`` goes through KServe's route. Both must give
    the same answer, id and refusals, and both pass KServe's Model call (its latency histogram)."""
    url = infer_url(kserve_predictor)
    good = encode(cifar_pil(cifar100_test_split[0], 7))
    bad = b"name,score\nalice,3\n" * 20
    before = predict_histogram_count(kserve_predictor)
    for images, status in (([good, good], 200), ([good, bad], 400)):
        plain = v2_body(images)
        answered = [client.post(url, json=body, headers={"X-Request-ID": "edge-7"})
                    for body in (plain, {**plain, "parameters": {}})]
        assert [r.status_code for r in answered] == [status, status], [r.text for r in answered]
        fast, kserves = (r.json() for r in answered)
        if status != 200:
            assert fast == kserves and "data[1]: not an image" in fast["error"]
            continue
        # KServe's answer model writes "parameters": null into every output; the plain route writes none.
        assert all("parameters" not in o for o in fast["outputs"]), "the plain body went through KServe's route"
        assert all(o.pop("parameters") is None for o in kserves["outputs"])
        assert fast == kserves and fast["id"] == "edge-7"
    assert predict_histogram_count(kserve_predictor) - before == 4


def test_a_small_file_of_many_pixels_does_not_hold_up_the_requests_behind_it(kserve_predictor, client, grpc_stub,
                                                                          cifar100_test_split):
    """Small requests are decoded on the server's event loop (handler/preprocessing.py decodes_inline); a
    flat 3000x3000 PNG is small too (~30 KB) but takes ~0.1-0.2 s to decode: it must go to a thread, so a
    CIFAR image sent after it is answered first, not after its decode; over REST and over gRPC."""
    from PIL import Image

    url = infer_url(kserve_predictor)
    flat = encode(Image.new("RGB", (3000, 3000), (10, 200, 30)))
    small = v2_body([encode(cifar_pil(cifar100_test_split[0], 5))])
    for over_grpc in (False, False, True, True):  # the order, again and again: not a lucky schedule
        finished = []

        def call(name, body):
            if name == "flat" and over_grpc:
                grpc_stub.ModelInfer(grpc_request([flat]), timeout=60)
            else:
                r = client.post(url, json=body)
                assert r.status_code == 200, r.text
            finished.append(name)

        with ThreadPoolExecutor(2) as pool:
            heavy = pool.submit(call, "flat", v2_body([flat]))
            time.sleep(0.03)  # the flat images' request is read and decoding
            pool.submit(call, "small", small).result()
            heavy.result()
        assert finished == ["small", "flat"], finished


def test_the_adapter_in_oip_mode_serves_classify_from_kserves_model_server(kserve_predictor, client, tmp_path,
                                                                           cifar100_test_split, reference):
    from adapter.run import running_adapter

    image = encode(cifar_pil(cifar100_test_split[0], 7))
    direct = v2_answers(client.post(infer_url(kserve_predictor), json=v2_body([image])).json())[0]
    env = {"OIP_URL": kserve_predictor.url, "TS_KEY_FILE": str(tmp_path / "none.json")}
    with running_adapter(env, tmp_path / "adapter.log") as adapter:
        health = client.get(f"{adapter.base_url}/health")
        assert health.status_code == 200 and health.json()["backend"] == "oip", health.text
        r = client.post(f"{adapter.base_url}/classify/", files={"image": ("a.png", image, "image/png")})
        assert r.status_code == 200, r.text
        assert (r.json()["prediction"], r.json()["probability"]) == (direct["prediction"], direct["probability"])
        # /health names the engine the answers came from, as in front of TorchServe.
        assert client.get(f"{adapter.base_url}/health").json()["engine"] == reference.engine.name
        assert [t["index"] for t in r.json()["top5"]] == [t["index"] for t in direct["topk"]]
        explained = client.post(f"{adapter.base_url}/explain/", files={"image": ("a.png", image, "image/png")})
        assert explained.status_code == 200, explained.text
        assert explained.json()["prediction"] == direct["prediction"]
        assert explained.json()["heatmap"].startswith("data:image/png;base64,")
        junk = client.post(f"{adapter.base_url}/classify/", files={"image": ("a.png", b"\x89PNG" + b"x" * 500,
                                                                              "image/png")})
        assert junk.status_code == 400 and "not an image" in junk.json()["error"], junk.text


@pytest.mark.integration  # starts the server's process
def test_the_manifests_liveness_probes_pass_on_the_server_and_fail_while_it_is_wedged(kserve_predictor):
    """deploy/kserve's predictor manifests' liveness probes (test_kserve_manifests checks their form), run against
    the real server on its own ports: KServe's v2 liveness route answers 200 and the gRPC manifest's exec command
    exits 0; with the server stopped (SIGSTOP: a wedged event loop, its ports still open) both fail within the
    probe's timeout, where the TCP probe the gRPC manifest had (readiness) still passes."""
    import socket

    import psutil

    from manifest_probes import KSERVE_DEPLOY, liveness_probe, run_exec_probe

    http_probe = liveness_probe(KSERVE_DEPLOY / "inferenceservice-predictor.yaml")
    live_url = f"{kserve_predictor.url}{http_probe['httpGet']['path']}"
    command = liveness_probe(KSERVE_DEPLOY / "inferenceservice-predictor-grpc.yaml")["exec"]["command"]
    assert httpx.get(live_url, timeout=http_probe["timeoutSeconds"]).status_code == 200
    assert run_exec_probe(command, kserve_predictor.port)[0] == 0
    server = psutil.Process(kserve_predictor.process.pid)
    server.suspend()
    try:
        with ThreadPoolExecutor(1) as pool:  # each waits out its timeout: side by side
            exec_probe = pool.submit(run_exec_probe, command, kserve_predictor.port)
            with pytest.raises(httpx.TimeoutException):
                httpx.get(live_url, timeout=http_probe["timeoutSeconds"])
            code, seconds = exec_probe.result(timeout=60)
        assert code != 0 and seconds < http_probe["timeoutSeconds"] + 1, (code, seconds)
        socket.create_connection(("127.0.0.1", kserve_predictor.grpc_port), timeout=3).close()  # an open port
    finally:
        server.resume()
    assert httpx.get(live_url, timeout=30).status_code == 200


def test_both_ports_listen_on_the_host_asked_for_not_every_interface(kserve_predictor):
    """KServe listens on every interface (0.0.0.0 and [::]), as a pod must; started here (serving/kserve.py: make
    serve-kserve, the tests, the benchmarks) it is asked for --host=127.0.0.1, as TorchServe and the adapter listen."""
    import psutil

    listening = {(conn.laddr.ip.removeprefix("::ffff:"), conn.laddr.port)  # grpc's IPv4 on an IPv6 socket
                 for conn in psutil.Process(kserve_predictor.process.pid).net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN}
    # and grpc's own port behind the gRPC port's relay (handler/grpc_relay.py), on 127.0.0.1 too
    assert {("127.0.0.1", kserve_predictor.port), ("127.0.0.1", kserve_predictor.grpc_port)} < listening, listening
    assert len(listening) == 3 and {ip for ip, _ in listening} == {"127.0.0.1"}, listening


def test_a_model_dir_without_the_archive_stops_the_start_with_the_reason(tmp_path):
    from serving.process import ServiceStartError

    with pytest.raises(ServiceStartError) as err:
        KServePredictor(tmp_path / "run", tmp_path).start(timeout=120)
    assert "exited while starting" in str(err.value) and "no model-store/cifar100.mar" in str(err.value)


def test_a_bare_archive_is_served_too_and_a_free_port_taken_before_the_bind_is_picked_again(bundle, client, tmp_path,
                                                                                           cifar100_test_split):
    """--model_dir may name the .mar itself (no bundle around it: TorchServe's max_request_size from the repo's
    config.properties). And a port picked free for it but taken before the server bound it, seconds later (26 tests
    lost their predictor so once, when free ports came from the ephemeral range), is picked again."""
    predictor = KServePredictor(tmp_path, bundle / "model-store" / "cifar100.mar")
    taken = predictor.grpc_port
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", taken))
        thief.listen()
        predictor.start()
    try:
        assert predictor.grpc_port != taken
        r = client.post(infer_url(predictor), json=v2_body([encode(cifar_pil(cifar100_test_split[0], 3))]))
        assert r.status_code == 200 and v2_answers(r.json())[0]["prediction"], r.text
    finally:
        predictor.stop()


def test_kserves_timing_middleware_is_left_out_of_the_stack_and_the_rest_kept(warm_child):
    """KServe adds a middleware that reads the process's CPU time twice a request for log lines the
    predictor silences (~15% of its event loop at concurrency 16): left out; KServe's other layers and
    the predictor's own checks stay. In a child process (importing kserve here would clash with
    tests/kserve_types.py); KServe's own start-up code adds the middlewares."""
    script = """
from kserve import model_server
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer
from timing_asgi import TimingMiddleware
from handler.kserve_predictor import RequestChecks, _without_timing
app = model_server.app
app.add_middleware(RequestChecks, max_bytes=1)
_without_timing(app)
RESTServer("kserve.model_server:app", DataPlane(ModelRepository()), None, 0).create_application()  # KServe's start
layers, layer = [], app.build_middleware_stack()
while layer is not None:
    layers.append(type(layer).__name__)
    layer = getattr(layer, "app", None)
print(" ".join(layers))
"""
    done = warm_child.run(script)
    assert done.returncode == 0, done.stderr[-2000:]
    layers = done.stdout.split()
    assert "TimingMiddleware" not in layers, layers
    assert "RequestChecks" in layers and "ServerErrorMiddleware" in layers, layers


def test_options_that_would_break_the_server_are_refused_at_start(tmp_path, warm_child):
    """--max_waiting_requests 0 once became the default 100 and a negative one refused every request; a body bound
    below max_request_size could never read a full-size body; a client share of nothing, or a proxy that is no
    address, would refuse every gRPC call or trust nobody. --enable-grpc (dashes) for --enable_grpc: KServe's
    parse_known_args dropped it, and gRPC stayed open on every interface while the operator believed it off.
    KServe's --workers N starts N processes that import its bare FastAPI app: every bound, check and route this
    server sets up in its one process would be missing from them."""
    cases = [(["--max_waiting_requests=0"], "needs 1 or more"), (["--max_waiting_explanations=-1"], "needs 1 or more"),
             (["--max_body_bytes_held=1000"], "--max_body_bytes_held 1000 is below max_request_size"),
             (["--max_body_bytes_held=20000000", "--grpc_max_receive_message_length=30000000"],
              "--max_body_bytes_held 20000000 is below --grpc_max_receive_message_length 30000000"),
             (["--max_client_share=0"], "needs 0 < x <= 1, not 0"),
             (["--trusted_proxies=10.0.0.1, proxy.local"], "--trusted_proxies: 'proxy.local' is not an IP address"),
             (["--enable-grpc", "false"], "unrecognized arguments: --enable-grpc false"),
             (["--workers", "2"], "--workers 2: this server runs one process"),
             (["--max_streams=10"], "--max_streams 10 is below --max_client_streams 1000")]
    for options, said in cases:
        # `python -m handler.kserve_predictor OPTIONS`, forked after the imports (a fresh process each cost ~3 s of
        # imports: 14-25 s for these); KServe parses its own options from sys.argv as kserve.model_server is imported.
        argv = ["kserve_predictor", f"--model_dir={tmp_path}", *options]
        done = warm_child.run(f"""
import sys
from kserve import model_server
sys.argv = {argv!r}
model_server.args, _ = model_server.parser.parse_known_args()
from handler.kserve_predictor import main
main()
""")
        assert done.returncode == 2 and said in done.stderr, (options, done.stderr[-1000:])


@pytest.fixture(scope="module")
def warm_child() -> Iterator[WarmChild]:
    """Scripts that import KServe and the predictor, each in a child process (importing kserve here would clash
    with tests/kserve_types.py), forked from one that imported them once."""
    with WarmChild(["handler.kserve_predictor"], REPO) as child:
        yield child


@pytest.fixture
def in_child(warm_child) -> Callable[[str], dict]:
    def run(script: str) -> dict:
        """``script``'s last line of output, JSON."""
        done = warm_child.run(script)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    return run


def test_a_grpc_parameters_map_of_more_than_the_limit_is_refused_on_its_count(in_child):
    """MAX_GRPC_PARAMETERS on the request's, an input's and an output's parameters map: 65 entries
    refused before KServe converts anything, exactly 64 passed on (no test built such a map)."""
    result = in_child("""
import json
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from handler.kserve_predictor import MAX_GRPC_PARAMETERS, grpc_count_refusal

def request(where, entries):
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"an image")
    out = pb.ModelInferRequest(model_name="cifar100", inputs=[tensor],
                               outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label")])
    parameters = {"request": out.parameters, "input": out.inputs[0].parameters, "output": out.outputs[0].parameters}[where]
    for n in range(entries):
        parameters[f"p{n}"].string_param = "x"
    return out

print(json.dumps({"limit": MAX_GRPC_PARAMETERS, **{
    f"{where} {entries}": grpc_count_refusal(request(where, entries), 64)
    for where in ("request", "input", "output") for entries in (MAX_GRPC_PARAMETERS, MAX_GRPC_PARAMETERS + 1)}}))
""")
    limit = result.pop("limit")
    for where in ("request", "input", "output"):
        assert result[f"{where} {limit}"] is None, where
        assert result[f"{where} {limit + 1}"] == f"a parameters map of more than {limit} entries (this model reads none)"


def test_a_bytes_tensor_with_its_elements_in_another_contents_field_is_told_where_they_go(in_child):
    """A BYTES tensor whose elements came in int64_contents was refused "shape [1] holds 1 elements, data has 0"; one
    with contents beside raw_input_contents by KServe, with a traceback in the log each time (1,686 in 60 s)."""
    result = in_child("""
import json
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from handler.kserve_predictor import grpc_count_refusal

tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
tensor.contents.int64_contents.append(7)
good = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
good.contents.bytes_contents.append(b"an image")
both = pb.ModelInferRequest(model_name="cifar100", inputs=[good], raw_input_contents=[(1).to_bytes(4, "little") + b"x"])
print(json.dumps([grpc_count_refusal(pb.ModelInferRequest(model_name="cifar100", inputs=[t]), 64) for t in (tensor, good)]
                 + [grpc_count_refusal(both, 64)]))
""")
    assert result == ["inputs[0] ('image'): a BYTES tensor's elements go in bytes_contents (or raw_input_contents), "
                      "not int64_contents", None,
                      "inputs[0] ('image'): its elements go in raw_input_contents or in contents, not both"], result


def test_more_raw_input_contents_than_inputs_are_refused_on_their_count_before_any_is_walked(in_child):
    """3,000,000 empty raw_input_contents for one input (5.7 MiB) were each walked for elements (0.1 s of the
    event loop), found none and passed, for KServe to refuse with a traceback: refused on the two counts now;
    one raw entry per input still passes."""
    result = in_child("""
import json, time
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from handler.kserve_predictor import grpc_count_refusal

def request(raw_entries):
    out = pb.ModelInferRequest(model_name="cifar100",
                               inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])])
    out.raw_input_contents.extend(raw_entries)
    return out

flood, one = request([b""] * 3_000_000), request([(8).to_bytes(4, "little") + b"an image"])
started = time.perf_counter()
refusal = grpc_count_refusal(flood, 64)
print(json.dumps({"flood": refusal, "s": time.perf_counter() - started, "one": grpc_count_refusal(one, 64)}))
""")
    assert result["flood"] == "3000000 raw_input_contents for 1 inputs: one per input, or none", result
    assert result["one"] is None and result["s"] < 0.05, result


def test_a_body_over_max_bytes_is_refused_on_its_declared_length_at_once_or_as_it_streams_past(in_child):
    """RequestChecks, in-process: a head declaring max_bytes + 1 gets 413 before any body byte (a client
    that then sends nothing is not waited for: the streaming check alone answered 408 after the body's
    deadline), a body streaming one byte past max_bytes gets 413 at that chunk, and one of exactly
    max_bytes reaches the app."""
    script = """
import asyncio, json, time
from handler.kserve_predictor import RequestChecks

LIMIT = 100

def scope(length=None):
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "method": "POST", "path": "/x", "headers": headers}

async def exchange(head, *chunks):
    reached, sent, client = [], [], asyncio.Queue()
    for n, chunk in enumerate(chunks):
        client.put_nowait({"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1})

    async def app(scope, receive, send):
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        sent.append(message.get("status", "body"))

    started = time.monotonic()
    await asyncio.wait_for(RequestChecks(app, max_bytes=LIMIT)(head, client.get, send), 10)
    return {"status": sent[0], "app": [len(b) for b in reached], "s": time.monotonic() - started, "unread": client.qsize()}

async def main():
    print(json.dumps({
        "declared": await exchange(scope(LIMIT + 1)),  # the head alone: no body byte ever comes
        "streamed": await exchange(scope(), b"a" * 60, b"b" * 41, b"c" * 10),
        "exact": await exchange(scope(), b"a" * 60, b"b" * 40),
    }))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["declared"]["status"] == 413 and out["declared"]["app"] == [] and out["declared"]["s"] < 1, out
    assert (out["streamed"]["status"], out["streamed"]["app"], out["streamed"]["unread"]) == (413, [], 1), out
    assert (out["exact"]["status"], out["exact"]["app"]) == (200, [100]), out


def test_bodies_held_at_once_are_bounded_and_given_back_when_their_answers_end(in_child):
    """RequestChecks, in-process: in KServe's Standard mode nothing bounded the bodies held at once (64 bodies of 11 MiB held
    2.35 GB). With max_held 150: a request holding 80 bytes while its answer is under way makes one declaring 80 more
    get 503 busy (with Retry-After) before any byte is read, and a chunked one 503 at the chunk that would pass it;
    once the first answer ends its bytes are given back and the same request is answered."""
    script = """
import asyncio, json
from handler.kserve_predictor import RequestChecks

def scope(length=None):
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "method": "POST", "path": "/x", "headers": headers}

release, reached = asyncio.Event(), []

async def app(scope, receive, send):
    reached.append(len((await receive())["body"]))
    if len(reached) == 1:
        await release.wait()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

checks = RequestChecks(app, max_bytes=100, max_held=150)

async def exchange(head, *chunks):
    sent, client = [], asyncio.Queue()
    for n, chunk in enumerate(chunks):
        client.put_nowait({"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1})

    async def send(message):
        if message["type"] == "http.response.start":
            sent.append([message["status"], dict(message["headers"]).get(b"retry-after", b"").decode()])
    await asyncio.wait_for(checks(head, client.get, send), 10)
    return {"answer": sent[0], "unread": client.qsize(), "held_after": checks.bodies.held}

async def main():
    first = asyncio.ensure_future(exchange(scope(80), b"a" * 80))
    while not reached:
        await asyncio.sleep(0.01)
    held_during = checks.bodies.held
    declared = await exchange(scope(80), b"b" * 80)
    streamed = await exchange(scope(), b"c" * 60, b"d" * 40)
    release.set()
    print(json.dumps({"held_during": held_during, "declared": declared, "streamed": streamed, "first": await first,
                      "again": await exchange(scope(80), b"e" * 80), "reached": reached}))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["held_during"] == 80, out
    assert out["declared"] == {"answer": [503, "1"], "unread": 1, "held_after": 80}, out
    assert out["streamed"] == {"answer": [503, "1"], "unread": 0, "held_after": 80}, out
    assert out["first"]["answer"] == [200, ""] and out["first"]["held_after"] == 0, out
    assert out["again"] == {"answer": [200, ""], "unread": 0, "held_after": 0}, out
    assert out["reached"] == [80, 80], out


def test_a_body_still_arriving_of_a_client_past_its_fair_share_gives_its_bytes_to_another_clients(in_child):
    """RequestChecks, in-process: one client's bodies stalled near their end held all of --max_body_bytes_held for
    --body_timeout_s, and every other client's REST request was 503. With max_held 150: client A's request of 80
    bytes is at the model (its body all arrived), B's has sent 60 and waits for more. C declares 30: within its fair
    share (150 // 3 clients = 50), it takes B's bytes (B past its share, still arriving), B's request gets 503 at
    once, and C is answered; A's is never stopped, being past its body. D declaring 60, past its share, gets the
    ordinary 503 busy and stops nothing."""
    script = """
import asyncio, json
from handler.kserve_predictor import RequestChecks

def scope(client, length=None):
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "method": "POST", "path": "/x", "headers": headers, "client": (client, 1)}

release, reached = asyncio.Event(), []

async def app(scope, receive, send):
    reached.append(scope["client"][0])
    await receive()
    if scope["client"][0] == "10.0.0.1":
        await release.wait()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

checks = RequestChecks(app, max_bytes=100, max_held=150)

async def exchange(head, *chunks, more=False):
    sent, client = [], asyncio.Queue()
    for n, chunk in enumerate(chunks):
        client.put_nowait({"type": "http.request", "body": chunk, "more_body": more or n < len(chunks) - 1})
    async def send(message):
        if message["type"] == "http.response.start":
            sent.append(message["status"])
        elif message["type"] == "http.response.body":
            sent.append(json.loads(message["body"]).get("error", "") if sent[-1] != 200 else "")
    await asyncio.wait_for(checks(head, client.get, send), 10)
    return sent

async def main():
    a = asyncio.ensure_future(exchange(scope("10.0.0.1", 80), b"a" * 80))
    b = asyncio.ensure_future(exchange(scope("10.0.0.2"), b"b" * 60, more=True))  # then nothing more
    await asyncio.sleep(0.05)
    log = {"held": checks.bodies.held}
    log["d"] = await exchange(scope("10.0.0.4", 60), b"d" * 60)
    log["c"] = await exchange(scope("10.0.0.3", 30), b"c" * 30)
    log["b"] = await b
    release.set()
    log["a"] = await a
    log["held after"], log["reached"] = checks.bodies.held, reached
    print(json.dumps(log))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["held"] == 140, out
    assert out["d"][0] == 503 and "--max_body_bytes_held" in out["d"][1], out
    assert out["c"] == [200, ""], out
    assert out["b"][0] == 503 and "from your address (10.0.0.2)" in out["b"][1] and "fair share" in out["b"][1], out
    assert out["a"] == [200, ""] and out["held after"] == 0, out
    assert out["reached"] == ["10.0.0.1", "10.0.0.3"], out


def test_bodies_give_way_only_when_their_bytes_make_room_newest_first_down_to_the_share(in_child):
    """handler/held_bodies.py RestBodies, in-process: bodies were stopped one after another even when all their bytes
    could not make room (a complete body at the model cannot be stopped): 510 small ones stopped, the newcomer still
    refused. Now nothing is stopped unless the arriving bodies' bytes of clients past their share cover what is
    missing; then the newest first, none once their client is down to its share. Limit 150, shares of 50."""
    script = """
import json
from handler.held_bodies import HeldBytes, RestBodies

def arriving(rest, owner, size, stopped, name):
    body = rest.open(owner)
    assert rest.take(body, size)
    body.stop = lambda: stopped.append(name)
    return body

log, stopped = {}, []
rest = RestBodies(HeldBytes(150))
done = rest.open("a")
assert rest.take(done, 100)  # at the model: no stop
small = [arriving(rest, "a", 5, stopped, "a-small"), rest.open("a")]  # 5 bytes arriving, and one with none yet
small[1].stop = lambda: stopped.append("a-empty")
assert rest.take(rest.open("b"), 40)
log["cannot make room"] = [rest.fits(rest.open("c"), 30), list(stopped), rest.held.held]

stopped.clear()
rest = RestBodies(HeldBytes(150))
four = [arriving(rest, "a", 20, stopped, f"a{n}") for n in range(4)]
assert rest.take(rest.open("b"), 60)
newcomer = rest.open("c")
log["declared: would fit, nothing stopped"] = [rest.fits(newcomer, 50, stop=False), list(stopped)]
log["two make room"] = [rest.take(newcomer, 50), list(stopped), rest.held.held, [body.given_way for body in four]]
log["a stopped body takes nothing more"] = rest.take(four[3], 1)
log["past its share"] = rest.fits(rest.open("d"), 51)
print(json.dumps(log))
"""
    out = in_child(script)
    assert out["cannot make room"] == [False, [], 145], out  # need 25, 5 arriving: nothing stopped
    assert out["declared: would fit, nothing stopped"] == [True, []], out  # its bytes, not its length, claim
    # need 40: a's two newest (20 + 20), a then at 40, under its share; b's body is complete.
    assert out["two make room"] == [True, ["a3", "a2"], 150, [False, False, True, True]], out
    assert out["a stopped body takes nothing more"] is False, out
    assert out["past its share"] is False, out


def test_a_refused_requests_log_line_shows_its_path_escaped_not_a_line_of_the_clients_making(in_child):
    """RequestChecks, in-process: uvicorn decodes %0A into the path, and KServe's log is plain text. A busy
    503's warning names the path escaped and cut, on one line: a path holding a newline and a forged
    log line starts no line of its own."""
    script = """
import asyncio, json, logging
from adapter.edge import PATH_LOGGED
from handler.kserve_predictor import RequestChecks

lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("handler.kserve_predictor").addHandler(handler)
forged = "/v1/models/cifar100:predict\\n2026-12-05 23:59:59,000 INFO [kserve] FORGED" + "x" * 500
head = {"type": "http", "method": "POST", "path": forged, "headers": [(b"content-length", b"80")]}
sent = []

async def send(message):
    if message["type"] == "http.response.start":
        sent.append(message["status"])

async def main():
    await RequestChecks(None, max_bytes=100, max_held=10)(head, None, send)

asyncio.run(main())
print(json.dumps({"status": sent, "lines": lines, "cut": PATH_LOGGED}))
"""
    out = in_child(script)
    assert out["status"] == [503] and len(out["lines"]) == 1, out
    [line] = out["lines"]
    assert "\n" not in line and "\\n2026-12-05 23:59:59,000 INFO [kserve] FORGED" in line, out
    assert "x" * 500 not in line and "x" * (out["cut"] - 80) in line, out


def test_held_bytes_grants_turns_in_order_and_a_turn_given_up_leaves_nothing_taken(in_child):
    """handler/held_bodies.py HeldBytes, in-process: a reservation that does not fit waits, turns are granted in
    order of arrival (a small one behind a large one waits too: no call passes the others for ever), a waiter
    that gives up (its deadline) leaves nothing taken and lets the turns behind it through, and what is given
    back is granted at once."""
    script = """
import asyncio, json
from handler.held_bodies import HeldBytes

async def main():
    held, granted, log = HeldBytes(100), [], {}
    held.take(60)
    async def turn(name, size, timeout=5):
        try:
            async with asyncio.timeout(timeout):
                await held.reserve(size)
            granted.append(name)
        except TimeoutError:
            granted.append(name + " gave up")
    waiters = [asyncio.ensure_future(turn("large", 70)), asyncio.ensure_future(turn("impatient", 90, 0.2)),
               asyncio.ensure_future(turn("small", 10))]
    await asyncio.sleep(0.05)
    log["while 60 held"] = (list(granted), held.held, held.waiting)  # small fits, but waits behind large
    await asyncio.sleep(0.3)
    log["after the impatient one"] = (list(granted), held.held, held.waiting)
    held.give(60)
    await asyncio.gather(*waiters)
    log["after 60 given back"] = (list(granted), held.held, held.waiting)
    log["take past the limit"] = (held.take(21), held.held)
    print(json.dumps(log))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["while 60 held"] == [[], 60, 3], out
    assert out["after the impatient one"] == [["impatient gave up"], 60, 2], out
    assert out["after 60 given back"] == [["impatient gave up", "large", "small"], 80, 0], out
    assert out["take past the limit"] == [False, 80], out


def test_held_bytes_a_waiter_that_stops_gives_back_a_turn_granted_as_it_stopped_and_lets_the_next_through(in_child):
    """HeldBytes.reserve, in-process: a call whose turn was granted just as it stopped waiting (its deadline, its
    client gone) holds nothing after, or each such race kept a largest message's bytes reserved for ever, and the
    bound shrank until every gRPC call waited; and a large waiter that gives up lets a smaller one behind it, which
    fits, go at once, not at the next bytes given back (or its deadline)."""
    script = """
import asyncio, json
from handler.held_bodies import HeldBytes

async def main():
    log = {}
    held = HeldBytes(100)
    held.take(60)
    racing = asyncio.ensure_future(held.reserve(50))
    await asyncio.sleep(0.01)
    held.give(60)  # its turn granted: its task not yet run
    racing.cancel()  # and its caller stops
    try:
        await racing
    except asyncio.CancelledError:
        pass
    log["granted as it stopped"] = [held.held, held.waiting]
    held.take(60)
    large = asyncio.ensure_future(asyncio.wait_for(held.reserve(70), 0.2))
    await asyncio.sleep(0.02)
    small = asyncio.ensure_future(held.reserve(30))
    await asyncio.sleep(0.02)
    log["behind a large one"] = [small.done(), held.held, held.waiting]  # it fits, but waits its turn
    await asyncio.sleep(0.5)  # the large one gave up 0.2 s in
    log["behind a large one that gave up"] = [small.done(), held.held, held.waiting]
    for waiter in (large, small):
        waiter.cancel()
    await asyncio.gather(large, small, return_exceptions=True)
    print(json.dumps(log))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["granted as it stopped"] == [0, 0], out
    assert out["behind a large one"] == [False, 60, 2], out
    assert out["behind a large one that gave up"] == [True, 90, 0], out


def test_held_bytes_passes_over_an_owner_at_its_share_and_lets_it_go_when_its_turn_ends(in_child):
    """HeldBytes with turns_per_owner, in-process: an owner holds at most that many turns at once; its next waits and
    is passed over, so another owner's reservation goes first, at once, even behind it in the queue; the owner's
    turn ending (its bytes still held) lets its waiter through when the bytes fit; an owner-less take is not
    counted. Without the share the second owner would wait behind the first's waiter (the test's control)."""
    script = """
import asyncio, json
from handler.held_bodies import HeldBytes

async def run(share):
    held, granted = HeldBytes(100, turns_per_owner=share), []
    a_turns = [held.take_turn(25, "a"), held.take_turn(25, "a")]
    log = {"a's first two at once": [turn is not None for turn in a_turns]}
    async def turn(name, owner):
        try:
            async with asyncio.timeout(0.3):
                await held.reserve(25, owner)
            granted.append(name)
        except TimeoutError:
            granted.append(name + " gave up")
    stalled = asyncio.ensure_future(turn("a3", "a"))
    await asyncio.sleep(0.05)
    log["b at once, a3 waiting"] = [held.take_turn(25, "b") is not None, held.waiting_of("a"), held.turns_of("a"),
                                    held.held]
    log["owner-less take"] = [held.take(25), held.turns_of("a"), held.turns_of("b")]
    held.give(25)
    held.end_turn(a_turns[0])  # a's first has its message: its bytes stay, its turn is over
    held.end_turn(a_turns[0])  # again (the call's last word): nothing more
    await asyncio.sleep(0.05)
    log["a3 after a's turn ended"] = [list(granted), held.held, held.turns_of("a")]
    await stalled
    return log

print(json.dumps({"share 2": asyncio.run(run(2)), "no share": asyncio.run(run(None))}))
"""
    out = in_child(script)
    shared = out["share 2"]
    assert shared["a's first two at once"] == [True, True], out
    assert shared["b at once, a3 waiting"] == [True, 1, 2, 75], out
    assert shared["owner-less take"] == [True, 2, 1], out
    assert shared["a3 after a's turn ended"] == [["a3"], 100, 2], out
    # The control: without a share a3 takes the third turn at once, and b the fourth.
    assert out["no share"]["b at once, a3 waiting"] == [True, 0, 3, 100], out


def test_held_bytes_takes_the_newest_turn_of_an_owner_past_its_fair_share_for_a_newcomer(in_child):
    """Two owners at their share (half each) held every turn, stalled until their deadline, and a third owner's
    reservation waited it out. Now a waiting newcomer within its fair share (an equal part of the turns among the
    owners holding or waiting) takes the newest turn of the owner holding the most, past that part: that turn's
    call is stopped, and the bytes it gives back go to the owner holding the fewest turns first, before older
    waiters of the owners past their part. A newcomer past its part takes nothing."""
    script = """
import asyncio, json
from handler.held_bodies import HeldBytes

async def main():
    held, granted, stopped = HeldBytes(200, turns_per_owner=4), [], []  # eight turns of 25, four an owner at most
    turns = {owner: [held.take_turn(25, owner) for _ in range(4)] for owner in ("a", "b")}
    for owner, owned in turns.items():
        for n, turn in enumerate(owned):
            turn.stop = lambda name=f"{owner}{n}": stopped.append(name)
    async def turn(name, owner):
        got = await held.reserve(25, owner)
        granted.append(name)
        return got
    waiters = [asyncio.ensure_future(turn("a4", "a"))]  # a at its share: passed over until a's turns end
    await asyncio.sleep(0.01)
    log = {"a4 waits, nothing stopped": [held.waiting, list(stopped)]}
    waiters += [asyncio.ensure_future(turn(f"c{n}", "c")) for n in range(3)]
    await asyncio.sleep(0.01)
    # c0 and c1 are within c's part (8 // 3 = 2): a's newest, then b's; c2 is past it and waits.
    log["c's three wait"] = [list(stopped), [held.turns_of(o) for o in "abc"], held.waiting, list(granted)]
    held.give(25)  # the stopped calls end: their bytes back
    held.give(25)
    await asyncio.sleep(0.01)
    log["bytes back"] = [list(granted), [held.turns_of(o) for o in "abc"], held.held]
    held.end_turn(turns["a"][0])  # a's oldest has its message
    held.give(25)
    await asyncio.sleep(0.01)
    log["one more free"] = [list(granted), [held.turns_of(o) for o in "abc"]]
    for waiter in waiters:
        waiter.cancel()
    print(json.dumps(log))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["a4 waits, nothing stopped"] == [1, []], out
    assert out["c's three wait"] == [["a3", "b3"], [3, 3, 0], 4, []], out
    # c0 and c1 before a4 (older, but a holds more); c2 waits: c at its part of 2, the bytes full.
    assert out["bytes back"] == [["c0", "c1"], [3, 3, 2], 200], out
    # a's oldest ended: a holds 2, as c does; between equals, the order of arrival: a4 before c2.
    assert out["one more free"] == [["c0", "c1", "a4"], [3, 3, 2]], out


def test_held_bytes_hands_a_turn_held_past_its_grace_to_a_newcomer_holding_fewer_oldest_first(in_child):
    """Four owners at one turn each are each within their fair share: their stalled calls held every turn until their
    deadlines (eight addresses x one stalled gRPC call: another client's call waited 28 s). With grace_s, a waiting
    newcomer within its share takes the oldest turn of another owner's held past the grace: that turn's call is
    stopped and its bytes become the newcomer's turn (nothing given back, nothing over the limit). A newcomer past its
    share, or wanting more than a turn holds, takes nothing; without grace_s nothing moves (the control)."""
    script = """
import asyncio, json, time
from handler.held_bodies import HeldBytes

async def run(grace_s):
    held, granted, stopped = HeldBytes(100, turns_per_owner=2, grace_s=grace_s), [], []
    start = time.monotonic()
    turns = {}
    for owner in "abcd":
        turns[owner] = held.take_turn(25, owner)
        turns[owner].stop = lambda owner=owner: stopped.append(owner)
        if owner == "b":
            await asyncio.sleep(0.2)  # c and d come 0.2 s after a and b
    async def turn(owner):
        got = await held.reserve(25, owner)
        granted.append([owner, got.size, got.owner])
    waiters = [asyncio.ensure_future(turn("e"))]
    await asyncio.sleep(0.02)
    waiters.append(asyncio.ensure_future(turn("f")))
    await asyncio.sleep(0.02)
    log = {"before the grace": [list(stopped), held.waiting]}
    await asyncio.sleep(start + 0.45 - time.monotonic())  # a's and b's turns past 0.4 s, c's and d's not
    log["a and b past it"] = [list(stopped), list(granted), held.held, held.waiting,
                              [turns[o].given_way for o in "abcd"], [turns[o].handed_on for o in "abcd"],
                              [held.turns_of(o) for o in "abcdef"]]
    waiters.append(asyncio.ensure_future(turn("e")))  # e holds one now, as c and d do: nothing of theirs
    await asyncio.sleep(start + 0.9 - time.monotonic())  # c's and d's past it too
    log["e's second"] = [list(stopped), held.waiting]
    waiters.append(asyncio.ensure_future(held.reserve(50, "g")))  # within g's share, but larger than any turn held
    await asyncio.sleep(0.05)
    log["g's larger"] = [list(stopped), held.waiting]
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    log["keep"] = [held.keep(25, 10), held.held, held.keep(0, 30), held.held]
    return log

print(json.dumps({"grace": asyncio.run(run(0.4)), "none": asyncio.run(run(None))}))
"""
    out = in_child(script)
    grace = out["grace"]
    assert grace["before the grace"] == [[], 2], out
    # e, first to wait, took a's (the oldest), f b's; the bytes went with them: 100 held, none given or over.
    assert grace["a and b past it"] == [["a", "b"], [["e", 25, "e"], ["f", 25, "f"]], 100, 0,
                                        ["grpc_message_grace_s", "grpc_message_grace_s", None, None],
                                        [True, True, False, False], [0, 0, 1, 1, 1, 1]], out
    assert grace["e's second"] == [["a", "b"], 1], out
    assert grace["g's larger"] == [["a", "b"], 2], out
    # A message of 10 held instead of its reservation of 25; 30 more for a message whose turn went on: no room.
    assert grace["keep"] == [True, 85, False, 85], out
    assert out["none"]["a and b past it"][:4] == [[], [], 100, 2], out
    assert out["none"]["e's second"] == [[], 3], out


def test_a_refused_grpc_call_lets_go_of_its_request_without_the_garbage_collector(in_child):
    """grpc keeps an aborted call's AbortError in the call's state and its traceback reaches the call's frames: a
    reference cycle, so every refused request (up to a largest message) lived until the collector's next full
    pass: 64 clients x 2 refused messages of 11 MiB held KServe's server at 2.4 GB with two read at a time.
    GrpcMessageBound cuts it. A real aio server, the collector off: an object in an aborting handler's frame
    dies with the call through the bound, and lives on without it (the cycle is still grpc's)."""
    script = """
import asyncio, gc, json, weakref
import grpc
from grpc import aio
from handler.held_bodies import GrpcMessageBound, HeldBytes

class Payload:
    pass

async def serve_and_call(interceptors):
    alive = []
    async def refuse(request, context):
        payload = Payload()  # stands for the decoded request, held by this frame
        alive.append(weakref.ref(payload))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not an image")
    server = aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_unary_rpc_method_handler(refuse)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(3):
            try:
                await channel.unary_unary("/t.S/M")(b"x" * 1000, timeout=10)
            except grpc.RpcError as err:
                codes.append(err.code().name)
    await server.stop(0)
    await asyncio.sleep(0.1)
    return codes, sum(ref() is not None for ref in alive)

async def main():
    gc.disable()
    bound = GrpcMessageBound(HeldBytes(1 << 20), 1 << 16, max_waiting=8, deadline_s=10)
    print(json.dumps({"bound": await serve_and_call([bound]), "plain": await serve_and_call([])}))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["bound"] == [["INVALID_ARGUMENT"] * 3, 0], out
    assert out["plain"] == [["INVALID_ARGUMENT"] * 3, 3], out


def test_a_client_that_leaves_cancels_its_request_until_the_answer_has_started(in_child):
    """RequestChecks reads the connection while the app answers: a disconnect before the answer starts
    cancels the app (nothing sent); after, the app finishes, and an app that asks for the disconnect
    itself gets its body first, then the disconnect. In-process ASGI, a queue as the connection."""
    script = """
import asyncio, json
from handler.kserve_predictor import RequestChecks

SCOPE = {"type": "http", "method": "POST", "path": "/x", "headers": []}
DISCONNECT = {"type": "http.disconnect"}

def connection(*messages):
    queue = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)
    return queue

async def main():
    seen, sent, cancelled = [], [], asyncio.Event()

    async def streaming(scope, receive, send):  # answers, then waits for the client to leave
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(await receive())
        await send({"type": "http.response.body", "body": b"ok"})

    async def slow(scope, receive, send):
        seen.append(await receive())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def send(message):
        sent.append(message["type"])

    client = connection({"type": "http.request", "body": b"ab", "more_body": True},
                        {"type": "http.request", "body": b"c", "more_body": False})
    answering = asyncio.ensure_future(RequestChecks(streaming, max_bytes=100)(SCOPE, client.get, send))
    await asyncio.sleep(0.05)
    started = (len(seen), sent[:])
    client.put_nowait(DISCONNECT)
    await asyncio.wait_for(answering, 5)
    out = {"started": started, "streaming": [m["type"] for m in seen], "body": seen[0]["body"].decode(),
           "sent": sent[:]}
    seen.clear(), sent.clear()
    client = connection({"type": "http.request", "body": b"abc", "more_body": False})
    answering = asyncio.ensure_future(RequestChecks(slow, max_bytes=100)(SCOPE, client.get, send))
    await asyncio.sleep(0.05)
    client.put_nowait(DISCONNECT)
    await asyncio.wait_for(answering, 5)
    out.update(slow=len(seen), cancelled=cancelled.is_set(), slow_sent=sent,
               left=len(asyncio.all_tasks()) - 1)
    print(json.dumps(out))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["started"] == [1, ["http.response.start"]] and out["body"] == "abc", out
    assert out["streaming"] == ["http.request", "http.disconnect"], out  # its body, then the disconnect
    assert out["sent"] == ["http.response.start", "http.response.body"], out
    assert (out["slow"], out["cancelled"], out["slow_sent"]) == (1, True, []), out
    assert out["left"] == 0, out  # no watcher left behind


def test_busy_bounds_refuse_before_decoding_and_bound_explanations_too(in_child):
    """In-process, with a stand-in forward pass (a sleep) and Grad-CAM patched to a short sleep (its
    time, not its work): with the one waiting slot taken, an 8-image request is refused (503) before any
    of its images is decoded; explanations beyond ``max_explanations`` get 503 at once instead of
    queueing on the explainer's single thread, and the bound frees as they finish."""
    script = """
import asyncio, base64, io, json, tempfile, time
from PIL import Image
import handler.kserve_predictor as kp
from handler.batching import Batcher

def png(seed):
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed, 0, 0)).save(out, "PNG")
    return {"data": base64.b64encode(out.getvalue()).decode()}

decoded, decode = [], kp.decoded_tensors
kp.decoded_tensors = lambda request, opened: (decoded.append(len(opened)), decode(request, opened))[1]
model = kp.CIFAR100Predictor("cifar100", tempfile.mkdtemp(), max_waiting=1, max_explanations=2)
model.max_images, model.model_version = 64, "t"

def answers(images, delay_s):
    time.sleep(delay_s)
    return [{"index": 0, "prediction": "x"}] * len(images)

def heatmaps(images, targets, sizes):
    time.sleep(0.2)
    return ["map"] * len(images)

model._heatmaps = heatmaps

async def main():
    model.batcher = Batcher(lambda images: answers(images, 0.3), 6, 0.0, 1)
    one = {"instances": [png(0)]}
    busy = asyncio.ensure_future(model.predict(one))
    await asyncio.sleep(0.05)  # in its forward pass
    waiting = asyncio.ensure_future(model.predict(one))
    await asyncio.sleep(0.05)  # the one waiting slot taken
    decoded.clear()
    try:
        await model.predict({"instances": [png(i) for i in range(8)]})
        full = None
    except kp.RequestRefused as err:
        full = [err.status, err.message, sum(decoded)]
    await asyncio.gather(busy, waiting)

    model.batcher = Batcher(lambda images: answers(images, 0.0), 6, 0.0, 1)
    async def explained(i):
        await asyncio.sleep(0.02 * i)  # each finds the forward pass free
        try:
            return (await model.explain({"instances": [png(i)] * 4}))["predictions"][0]["heatmap"]
        except kp.RequestRefused as err:
            return [err.status, err.message]
    burst = await asyncio.gather(*(explained(i) for i in range(6)))
    later = await explained(0)
    print(json.dumps({"full": full, "burst": burst, "later": later, "under_way": len(model._explaining)}))

asyncio.run(main())
"""
    out = in_child(script)
    status, message, images_decoded = out["full"]
    assert (status, images_decoded) == (503, 0) and "1 requests already wait" in message, out
    answered = [r for r in out["burst"] if r == "map"]
    refused = [r for r in out["burst"] if r != "map"]
    assert len(answered) == 2 and len(refused) == 4, out
    assert all(r[0] == 503 and "busy: 2 explanations already wait" in r[1] for r in refused), out
    assert out["later"] == "map" and out["under_way"] == 0, out


def test_a_client_past_its_share_of_explanations_gives_way_and_the_explainer_takes_clients_in_turns(in_child):
    """In-process, Grad-CAM a 0.3 s sleep: client a has 4 explanations under way (all 4 places: one on the thread,
    three waiting for it); b's one takes the place of a's newest not yet on the thread (a's share: 4 // 2 clients
    = 2, a holds 4), which gets 503 "... gave its place", and runs next on the thread, before a's others; a third
    client's, with places free, stops nobody and runs before a's last. One address's 24 explanations of 64 images
    had every other client's refused (58 of 58), and the thread took them in order of arrival."""
    script = """
import asyncio, base64, io, json, tempfile, time
from PIL import Image
import handler.kserve_predictor as kp
from handler.batching import Batcher
from serving.clients import CALLER

def png(seed):
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed, 0, 0)).save(out, "PNG")
    return {"data": base64.b64encode(out.getvalue()).decode()}

model = kp.CIFAR100Predictor("cifar100", tempfile.mkdtemp(), max_waiting=8, max_explanations=4,
                             client_explanations=2)
model.max_images, model.model_version = 64, "t"
ran = []

def heatmaps(images, targets, sizes):
    ran.append(len(images))
    time.sleep(0.3)
    return ["map"] * len(images)

model._heatmaps = heatmaps

async def explained(client, images, after_s):
    CALLER.set(client)  # (this task's own)
    await asyncio.sleep(after_s)
    try:
        return (await model.explain({"instances": [png(i) for i in range(images)]}))["predictions"][0]["heatmap"]
    except kp.RequestRefused as err:
        return [err.status, err.message]

async def main():
    model.batcher = Batcher(lambda images: [{"index": 0, "prediction": "x"}] * len(images), 6, 0.0, 8)
    a = [asyncio.ensure_future(explained("a", 4, 0.02 * i)) for i in range(4)]
    b = await explained("b", 1, 0.15)
    c = await explained("c", 2, 0)  # a's second on the thread, its third waiting: places free
    return {"a": await asyncio.gather(*a), "b": b, "c": c, "ran": ran, "left": len(model._explaining)}

print(json.dumps(asyncio.run(main())))
"""
    out = in_child(script)
    assert out["b"] == "map" and out["c"] == "map" and out["left"] == 0, out
    assert out["a"][:3] == ["map"] * 3 and out["a"][3][0] == 503, out
    assert "more than 2 of them are this client's (its share): its newest gave its place" in out["a"][3][1], out
    assert out["ran"] == [4, 1, 4, 2, 4], out  # b's next after a's first, c's before a's last: clients in turns


def test_large_images_are_decoded_one_per_cpu_at_most_shared_out_by_client(in_child, bundle):
    """In-process on the real bundle (loaded as the server loads it, eager engine): 8 requests of one client at
    once, each a 1 MP PNG (decoded in a thread, not on the loop), with the decode slowed by 0.2 s to overlap them,
    and one of another client once every thread decodes the first's. At most one decode per CPU the predictor uses (torch's threads) runs at
    once: asyncio's default pool ran 6 on 2 CPUs, and 6 x 16 MP decodes took a 2 GiB pod past its limit
    (benchmarks/RESULTS.md session 47). The other client's decode starts on the first thread freed, not after
    the first client's queue (serving/fair_pool.py; its client as the REST checks or the gRPC bound set it)."""
    script = """
import asyncio, base64, io, json, threading, time
import torch
from PIL import Image
import handler.kserve_predictor as kp
from serving.clients import CALLER

def body(width):
    out = io.BytesIO()
    Image.radial_gradient("L").resize((width, 1000)).convert("RGB").save(out, "PNG")
    return {"instances": [{"data": base64.b64encode(out.getvalue()).decode()}]}

now, most, started, lock, decode = [0], [0], [], threading.Lock(), kp.decoded_tensors

def slowed(request, opened):
    with lock:
        now[0] += 1
        most[0] = max(most[0], now[0])
        started.append("other" if opened[0].width == 1001 else "first")
    try:
        time.sleep(0.2)
        return decode(request, opened)
    finally:
        with lock:
            now[0] -= 1

kp.decoded_tensors = slowed
model = kp.CIFAR100Predictor("cifar100", %r, engine_setting="eager-fp32")
model.load()

bodies = {1000: body(1000), 1001: body(1001)}

async def client(name, width, once_all_busy=False):
    CALLER.set(name)  # (this task's own)
    while once_all_busy and now[0] < torch.get_num_threads():  # sent while every thread decodes the first's
        await asyncio.sleep(0.005)
    return len((await model.predict(bodies[width]))["predictions"])

async def main():
    answered = await asyncio.gather(*(client("203.0.113.7", 1000) for _ in range(8)),
                                    client("198.51.100.2", 1001, once_all_busy=True))
    print(json.dumps({"most": most[0], "threads": torch.get_num_threads(), "answered": sum(answered),
                      "started": started, "clients_left": model._decoder.clients}))

asyncio.run(main())
""" % str(bundle)
    out = in_child(script)
    assert out["answered"] == 9 and out["clients_left"] == 0, out
    assert out["most"] == out["threads"], out
    # Next after those already running (one more on a loaded machine, where a thread may free before it is
    # queued); first come, first served started it after all 8 of the first client's.
    assert out["started"].index("other") <= out["threads"] + 1, out


def test_the_rest_checks_name_the_requests_client_for_the_work_behind_them(in_child):
    """RequestChecks, in-process: the app behind it sees CALLER as the socket's peer (its client key: an IPv6
    address's /64), or, from a trusted proxy, the client its X-Forwarded-For names; an untrusted peer's header
    is ignored."""
    script = """
import asyncio, json
from handler.kserve_predictor import RequestChecks
from serving.clients import CALLER, ForwardedClient, proxy_networks

seen = []

async def app(scope, receive, send):
    seen.append(CALLER.get())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

async def send(message):
    pass

async def ask(checks, peer, forwarded=None):
    headers = [(b"content-length", b"2")] + ([(b"x-forwarded-for", forwarded.encode())] if forwarded else [])
    queue = asyncio.Queue()
    queue.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
    await checks({"type": "http", "method": "POST", "path": "/x", "client": (peer, 1), "headers": headers},
                 queue.get, send)

async def main():
    plain = RequestChecks(app, max_bytes=100)
    behind = RequestChecks(app, max_bytes=100, clients=ForwardedClient(proxy_networks(["10.0.0.0/8"])))
    await ask(plain, "203.0.113.7")
    await ask(plain, "2001:db8::1")
    await ask(plain, "203.0.113.7", "198.51.100.2")
    await ask(behind, "10.1.2.3", "198.51.100.2")
    await ask(behind, "203.0.113.7", "198.51.100.2")

asyncio.run(main())
print(json.dumps(seen))
"""
    assert in_child(script) == ["203.0.113.7", "2001:db8::/64", "203.0.113.7", "198.51.100.2", "203.0.113.7"]


def test_a_not_finite_answer_fails_only_the_request_it_belongs_to(in_child):
    """In-process, the real _forward on a stand-in engine whose second row of a batch is NaN: of two
    one-image requests sharing that forward pass, the first is answered and the second fails as before
    (a plain ValueError naming NOT_FINITE: KServe's 500 "ValueError : ...", gRPC INTERNAL); every request
    of the batch failed."""
    script = """
import asyncio, base64, io, json, tempfile
import torch
from PIL import Image
import handler.kserve_predictor as kp
from handler.answers import NOT_FINITE
from handler.batching import Batcher
from handler.calibration import Calibration

def png(seed):
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed, 0, 0)).save(out, "PNG")
    return {"instances": [{"data": base64.b64encode(out.getvalue()).decode()}]}

class Engine:
    name, batches = "stand-in", []

    def answer(self, images, flip_tta):
        self.batches.append(len(images))
        logits = torch.arange(5.0).repeat(len(images), 1)
        logits[1:] = float("nan")
        return logits, len(images), 0

model = kp.CIFAR100Predictor("cifar100", tempfile.mkdtemp())
model.max_images, model.model_version, model.topk, model.flip_tta = 64, "t", 3, False
model.labels, model.calibration, model.device = [f"c{i}" for i in range(5)], Calibration(), torch.device("cpu")
model.network_engine = Engine()
model.batcher = Batcher(model._forward, 6, 0.3)

async def one(n):
    await asyncio.sleep(0.05 * n)  # in this order, within the batch's delay
    try:
        return (await model.predict(png(n)))["predictions"][0]["label"]
    except Exception as err:
        return [type(err).__name__, str(err)]

async def main():
    print(json.dumps({"answers": await asyncio.gather(one(0), one(1)), "batches": Engine.batches,
                      "not_finite": NOT_FINITE}))

asyncio.run(main())
"""
    out = in_child(script)
    assert out["batches"] == [2], out  # one shared forward pass
    assert out["answers"] == ["c4", ["ValueError", out["not_finite"]]], out


# ---- the Open Inference Protocol over gRPC (KServe's generated stubs; a real channel) ----
@pytest.fixture(scope="module")
def grpc_stub(kserve_predictor):
    import grpc

    import kserve_types  # noqa: F401 - registers the kserve package bare: its generated gRPC modules import alone
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    with grpc.insecure_channel(kserve_predictor.grpc_target,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)


def pb():
    from kserve.protocol.grpc import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


def grpc_request(images: list[bytes], raw: bool = False, request_id: str = "", datatype: str = "BYTES"):
    """A ModelInferRequest of one BYTES tensor: each image's bytes in ``contents``, or, ``raw``, in
    ``raw_input_contents`` (4-byte little-endian length + bytes per element, as tritonclient sends)."""
    tensor = pb().ModelInferRequest.InferInputTensor(name="image", datatype=datatype, shape=[len(images)])
    request = pb().ModelInferRequest(model_name="cifar100", id=request_id, inputs=[tensor])
    if raw:
        request.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in images))
    else:
        request.inputs[0].contents.bytes_contents.extend(images)
    return request


def grpc_answer_body(response) -> dict:
    """A ModelInferResponse as the v2 JSON answer's shape (for v2_answers), from contents or raw outputs."""
    import numpy as np

    kinds = {"BYTES": ("bytes_contents", None), "INT64": ("int64_contents", np.int64),
             "FP32": ("fp32_contents", np.float32), "BOOL": ("bool_contents", np.bool_)}
    outputs = []
    for n, output in enumerate(response.outputs):
        field, dtype = kinds[output.datatype]
        if response.raw_output_contents:
            raw = response.raw_output_contents[n]
            if dtype is None:  # BYTES: 4-byte length + bytes per element
                data, at = [], 0
                while at < len(raw):
                    size = int.from_bytes(raw[at:at + 4], "little")
                    data.append(raw[at + 4:at + 4 + size])
                    at += 4 + size
            else:
                data = np.frombuffer(raw, dtype=dtype).tolist()
        else:
            data = list(getattr(output.contents, field))
        if dtype is None:
            data = [item.decode() for item in data]
        elif output.datatype == "FP32":
            data = [round(float(x), 6) for x in data]
        outputs.append({"name": output.name, "datatype": output.datatype, "shape": list(output.shape), "data": data})
    return {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": outputs}


@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw_input_contents"])
def test_grpc_answers_match_the_in_process_network(kserve_predictor, grpc_stub, reference, cifar100_test_split, raw):
    images = cifar100_test_split[0][200:206]
    expected = reference.probs_of_uint8(images)
    payloads = [encode(cifar_pil(images, i)) for i in range(len(images))]
    response = grpc_stub.ModelInfer(grpc_request(payloads, raw=raw, request_id="grpc-1"), timeout=60)
    assert bool(response.raw_output_contents) is raw  # raw in, raw out (the protocol's rule)
    body = grpc_answer_body(response)
    assert (body["id"], body["model_name"], body["model_version"]) == (
        "grpc-1", "cifar100", weights_version(weights_under_test()))
    assert response.parameters["engine"].string_param == reference.engine.name
    answers = v2_answers(body)
    assert len(answers) == len(images)
    for answer, probs in zip(answers, expected):
        assert_same_answer(answer, probs)


def test_grpc_refusals_carry_the_handlers_message_and_the_server_goes_on(kserve_predictor, grpc_stub, cifar100_test_split):
    import grpc

    good = encode(cifar_pil(cifar100_test_split[0], 0))
    refusals = [
        (grpc_request([b"not an image at all"]), grpc.StatusCode.INVALID_ARGUMENT, "not an image"),
        (grpc_request([b""]), grpc.StatusCode.INVALID_ARGUMENT, "empty image"),
        (grpc_request([decompression_bomb_png()]), grpc.StatusCode.INVALID_ARGUMENT, "decompression bomb"),
        (grpc_request([good] * 65), grpc.StatusCode.INVALID_ARGUMENT, "above the limit"),
        (grpc_request([good], datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "the bytes themselves over gRPC"),
    ]
    many_parameters = grpc_request([good])
    for n in range(65):  # MAX_GRPC_PARAMETERS + 1
        many_parameters.parameters[f"p{n}"].string_param = "x"
    refusals.append((many_parameters, grpc.StatusCode.INVALID_ARGUMENT, "parameters map of more than 64"))
    raw_short = grpc_request([good], raw=True)
    raw_short.raw_input_contents[0] = raw_short.raw_input_contents[0][:-10] + (10 ** 6).to_bytes(4, "little")
    refusals.append((raw_short, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"))
    limit = int(read_properties(kserve_predictor.bundle / "config" / "config.properties")["max_request_size"])
    # The message limit is max_request_size, as on REST (gRPC's own default would be 8 MiB).
    refusals.append((grpc_request([b"\0" * (limit - (1 << 20))]), grpc.StatusCode.INVALID_ARGUMENT, "not an image"))
    refusals.append((grpc_request([b"\0" * (limit + 1)]), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"))
    for request, code, words in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            grpc_stub.ModelInfer(request, timeout=60)
        assert refused.value.code() == code, (words, refused.value.code(), refused.value.details())
        assert words.lower() in refused.value.details().lower(), (words, refused.value.details())
    # Bytes that are no ModelInferRequest: grpc's own parse answered UNKNOWN "Unexpected <class ...DecodeError>".
    garbage = grpc.insecure_channel(kserve_predictor.grpc_target)
    with pytest.raises(grpc.RpcError) as refused:
        garbage.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff not protobuf", timeout=60)
    garbage.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert refused.value.details().startswith("the request message is not a ModelInfer request"), refused.value.details()
    answer = grpc_stub.ModelInfer(grpc_request([good]), timeout=60)
    assert [o.name for o in answer.outputs][:1] == ["label"]
    assert len(answer.id) == 32  # none sent (gRPC's ""): a new one, as for a REST request without an id
    tagged = grpc_stub.ModelInfer(grpc_request([good]), metadata=[("x-request-id", "edge-7")], timeout=60)
    assert tagged.id == "edge-7"  # the caller's request id, from the call's metadata


def _connections_reset(predictor, reason: str) -> int:
    """GrpcConnectionsReset_total{Reason=reason} on the predictor's /metrics."""
    text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
    return int(float(re.search(rf'^GrpcConnectionsReset_total\{{Reason="{reason}"\}} (\S+)$', text, re.M)[1]))


def _reset_once_sent(predictor, source: str, frames: bytes) -> None:
    """The HTTP/2 preface, an empty SETTINGS and ``frames`` sent to the gRPC port from ``source``: the connection is
    reset (or closed) within 10 s."""
    from grpc_raw import PREFACE

    sock = socket.create_connection(("127.0.0.1", predictor.grpc_port), timeout=10, source_address=(source, 0))
    try:
        sock.sendall(PREFACE + frames)
        deadline = time.monotonic() + 10
        while connection_state(sock) == "open" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connection_state(sock) in ("reset", "closed")
    except ConnectionResetError:  # (reset while it was still sending)
        pass
    finally:
        sock.close()


def _call_head() -> bytes:
    """A ModelInfer call's header block (HPACK literals)."""
    from grpc_raw import literal

    return b"".join(literal(name, value) for name, value in (
        (":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")))


def test_a_client_opening_streams_by_the_thousand_has_its_grpc_connection_reset(kserve_predictor, grpc_stub,
                                                                                 cifar100_test_split):
    """HTTP/2 calls opened and reset at once ("rapid reset"), or ended at once, 10,000-51,000 a second from one
    connection, had every other client's calls answered CANCELLED. Past --max_client_streams (1000) new streams in a
    second, the relay resets the connection (handler/grpc_relay.py PerSecond; counted as
    GrpcConnectionsReset_total{Reason="streams"}, logged); another client's call is answered."""
    from grpc_raw import reset_calls

    before = _connections_reset(kserve_predictor, "streams")
    calls = reset_calls(_call_head(), range(1, 2 * 1001, 2))  # 1,001 calls, each reset at once (CANCEL)
    _reset_once_sent(kserve_predictor, "127.0.0.7", calls)
    assert _connections_reset(kserve_predictor, "streams") == before + 1
    wait_for_log(kserve_predictor, "reset a gRPC connection from 127.0.0.7: its client opened more than 1000 streams")
    answer = grpc_stub.ModelInfer(grpc_request([encode(cifar_pil(cifar100_test_split[0], 0))]), timeout=30)
    assert [output.name for output in answer.outputs], answer


def test_addresses_together_past_max_streams_have_the_heaviest_reset_and_a_light_one_answered(
        kserve_predictor, grpc_stub, cifar100_test_split):
    """4 addresses opening ~900 calls a second each, each under --max_client_streams, took another client's ModelInfer
    calls from ~10 ms to 247-724 ms p50, some CANCELLED. Past --max_streams (1000) new streams a second from all
    addresses together, the connection of an address past its fair share (the bound over the addresses that opened
    streams in the last second) is reset (GrpcConnectionsReset_total{Reason="all_streams"}, logged); an address that
    opens a few meanwhile is not, and a real call is answered."""
    from grpc_raw import PREFACE, reset_calls

    before = _connections_reset(kserve_predictor, "all_streams")
    head = _call_head()
    heavy = [f"127.0.0.{n}" for n in (21, 22, 23)]
    sockets = {source: socket.create_connection(("127.0.0.1", kserve_predictor.grpc_port), timeout=10,
                                                source_address=(source, 0)) for source in (*heavy, "127.0.0.24")}
    for sock in sockets.values():
        sock.sendall(PREFACE)
    time.sleep(2.1)  # (seconds of its own: the last one's streams count too)
    try:
        for round_ in range(18):  # in turns, 50 streams each (900 each, under its own 1000; 2,700 in all)
            time.sleep(0.01)  # (read in turns, not one address's all at once)
            for source in heavy:
                try:
                    sockets[source].sendall(reset_calls(head, range(1 + 100 * round_, 101 + 100 * round_, 2)))
                except OSError:  # (reset)
                    pass
            if round_ == 6:  # a light address's 5 streams meanwhile
                sockets["127.0.0.24"].sendall(reset_calls(head, range(1, 11, 2)))
        answer = grpc_stub.ModelInfer(grpc_request([encode(cifar_pil(cifar100_test_split[0], 0))]), timeout=30)
        assert [output.name for output in answer.outputs], answer
        deadline = time.monotonic() + 5
        while any(connection_state(sockets[source]) == "open" for source in heavy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(connection_state(sockets[source]) in ("reset", "closed") for source in heavy)
        assert connection_state(sockets["127.0.0.24"]) == "open"
    finally:
        for sock in sockets.values():
            sock.close()
    assert _connections_reset(kserve_predictor, "all_streams") == before + 3
    wait_for_log(kserve_predictor, "reset a gRPC connection from 127.0.0.2")  # (one of them: the log throttled)
    wait_for_log(kserve_predictor, "fair share of the 1000 streams all clients may open in a second")


def test_an_hpack_bomb_resets_its_grpc_connection_and_a_compressed_message_is_refused(kserve_predictor, grpc_stub,
                                                                                      cifar100_test_split):
    """HPACK lets one byte name a 4 KB entry of the connection's header table: calls of 8,000 such in an 8 KB block
    took the predictor from 0.8 to 3.4-4.3 GB in 8 s, every gRPC call failing meanwhile. The relay resets the
    connection whose header block holds more than MAX_HEADER_FIELDS fields (GrpcConnectionsReset_total
    {Reason="headers"}, logged); another client's call is answered. A message compressed (grpc-encoding gzip: 11 KB
    that inflated to 11 MB cost what 11 MB does) is answered UNIMPLEMENTED, the same call uncompressed answered."""
    import grpc
    from grpc_raw import HEADERS, frame
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    from handler.grpc_relay import MAX_HEADER_FIELDS

    before = _connections_reset(kserve_predictor, "headers")
    _connections_reset(kserve_predictor, "frames")  # (exported from the start too)
    # a literal of a new name, indexed (the table's entry 62), of 4,000 bytes
    entry = b"\x40\x01x\x7f" + bytes([(4000 - 127) & 0x7F | 0x80, (4000 - 127) >> 7]) + b"v" * 4000
    bomb = _call_head() + entry + b"\xbe" * 8000  # index 62: the entry, 8,000 times (32 MB of headers)
    _reset_once_sent(kserve_predictor, "127.0.0.8", frame(HEADERS, 4, 1, bomb))
    assert _connections_reset(kserve_predictor, "headers") == before + 1
    wait_for_log(kserve_predictor, f"reset a gRPC connection from 127.0.0.8: a header block of more than "
                                   f"{MAX_HEADER_FIELDS} fields")
    request = grpc_request([encode(cifar_pil(cifar100_test_split[0], 0))])
    # another client's calls, with 120 metadata entries, each named once (95 were reset by a plain count of 100)
    metadata = [(f"x-{i}", "v" * 8) for i in range(120)]  # (~5 KB: under grpc's own 8 KiB)
    for _ in range(2):  # (the second names the entries grpc put in the table)
        assert [output.name for output in grpc_stub.ModelInfer(request, metadata=metadata, timeout=30).outputs]
    with grpc.insecure_channel(kserve_predictor.grpc_target, compression=grpc.Compression.Gzip) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value
    assert "gzip" in refused.value.details(), refused.value.details()


def test_model_metadata_names_the_image_input_and_the_answers_outputs(kserve_predictor, grpc_stub, client):
    from serving.settings import V2_OUTPUTS

    rest = client.get(f"{kserve_predictor.url}/v2/models/cifar100")
    assert rest.status_code == 200, rest.text
    assert rest.json()["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in rest.json()["outputs"]} == V2_OUTPUTS
    metadata = grpc_stub.ModelMetadata(pb().ModelMetadataRequest(name="cifar100"), timeout=30)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "BYTES", [-1])]
    assert {t.name: t.datatype for t in metadata.outputs} == V2_OUTPUTS
    assert grpc_stub.ServerLive(pb().ServerLiveRequest(), timeout=30).live
    assert grpc_stub.ModelReady(pb().ModelReadyRequest(name="cifar100"), timeout=30).ready


def test_a_crawling_body_gets_408_after_the_grace_and_others_are_answered_meanwhile(kserve_predictor, client,
                                                                                     cifar100_test_split):
    """serving/pace.py's rule (the adapter's defaults): after MIN_RATE_GRACE_S, a body must average
    MIN_UPLOAD_RATE; one that sent 100 bytes of 100,000 and stalls is refused (408, closed), and does
    not hold up anyone else's answer."""
    import socket
    import time

    from serving.settings import MIN_RATE_GRACE_S

    host, port = kserve_predictor.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(b"POST /v2/models/cifar100/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: crawl-1\r\nContent-Length: 100000\r\n\r\n" + b"{" * 100)
        started = time.monotonic()
        answered = client.post(infer_url(kserve_predictor),
                               json=v2_body([encode(cifar_pil(cifar100_test_split[0], 3))]))
        assert answered.status_code == 200, answered.text
        assert time.monotonic() - started < MIN_RATE_GRACE_S  # not behind the crawling one
        reply = b""
        while chunk := slow.recv(65536):  # the server closes the connection after its answer
            reply += chunk
        waited = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert "too slowly" in json.loads(body)["error"]
    assert MIN_RATE_GRACE_S - 0.5 <= waited < MIN_RATE_GRACE_S + 5, waited
    # The refusal's log line names the request (KServe's ingress gives each one an X-Request-ID).
    wait_for_log(kserve_predictor, "408: the body of POST '/v2/models/cifar100/infer' (request 'crawl-1')")


def wait_for_log(predictor, words: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while words not in predictor.log.read_text():
        assert time.monotonic() < deadline, (words, predictor.log.read_text()[-3000:])
        time.sleep(0.1)


@pytest.mark.integration  # starts its own server process
def test_the_predictor_log_rotates_at_its_size_keeping_every_line_in_kserves_format(bundle, tmp_path):
    """logs/predictor.log was the process's stdout and stderr: every access line and refusal, without end. Now every
    logger's lines (KServe's, uvicorn's, the handler's) go to one rotating file (--log_file, KServePredictor's
    predictor.log) in KServe's formats, nothing to stdout or stderr; --log_backups old files, predictor.log.1, .2."""
    max_bytes, requests = 20000, 600  # ~110 B an access line: 3 rotations, the oldest file dropped
    predictor = KServePredictor(tmp_path, bundle, extra_args=[f"--log_max_bytes={max_bytes}", "--log_backups=2"])
    predictor.start()
    try:
        started = predictor.log.read_text()  # KServe's, uvicorn's and the handler's own lines
        assert " handler.kserve_predictor INFO [kserve_predictor.py:load()" in started, started[-3000:]
        assert " kserve INFO [model_server.py:register_model()" in started
        assert " uvicorn.error INFO:     Uvicorn running on" in started
        with httpx.Client(timeout=30) as client:
            for i in range(requests):
                assert client.get(f"{predictor.url}/rotated-{i:04d}").status_code == 404
        wait_for_log(predictor, f'"GET /rotated-{requests - 1:04d} HTTP/1.1" 404')  # the newest, in predictor.log
    finally:
        predictor.stop()
    files = [predictor.log.with_name(f"predictor.log.{n}") for n in (2, 1)] + [predictor.log]
    assert all(f.is_file() for f in files) and not predictor.log.with_name("predictor.log.3").exists()
    longest = max(len(line) + 1 for f in files for line in f.read_bytes().splitlines())
    assert all(f.stat().st_size < max_bytes + longest for f in files), [f.stat().st_size for f in files]
    # The newest access lines, in order, none lost at a rotation (one handler for every logger); KServe's format.
    seen = [int(n) for n in re.findall(r' uvicorn\.access INFO: +127\.0\.0\.1:\d+ \d+ - "GET /rotated-(\d{4}) HTTP/1\.1" 404',
                                       "".join(f.read_text() for f in files))]
    assert len(seen) > 2 * max_bytes // longest and seen == list(range(requests - len(seen), requests)), seen[:5]
    assert " kserve INFO [server.py:stop()" in predictor.log.read_text()  # its stop, after them
    output = stderr_file(predictor.log).read_text()
    assert "uvicorn" not in output and "kserve" not in output and "rotated-" not in output, output[-2000:]


def test_a_failed_start_shows_its_own_output_from_the_stderr_log_begun_afresh(tmp_path):
    """What the predictor prints outside logging (a traceback before it serves) goes to predictor.stderr.log,
    emptied at each start, and a failed start's error shows it."""
    from serving.process import ServiceStartError

    predictor = KServePredictor(tmp_path / "run", tmp_path / "no-bundle")
    for _ in range(2):
        with pytest.raises(ServiceStartError) as err:
            predictor.start(timeout=120)
        assert f"{stderr_file(predictor.log)}:" in str(err.value), str(err.value)
        assert "no model-store/cifar100.mar" in str(err.value), str(err.value)
    assert stderr_file(predictor.log).read_text().count("Traceback") == 1  # the last start's only


@pytest.fixture(scope="module")
def bounded_predictor(bundle, tmp_path_factory):
    """A predictor of its own that lets one request wait for a forward pass (--max_waiting_requests=1)."""
    predictor = KServePredictor(tmp_path_factory.mktemp("kserve-bounded"), bundle,
                                extra_args=["--max_waiting_requests=1"]).start()
    yield predictor
    predictor.stop()


@pytest.mark.integration  # starts its own server process
def test_a_flood_beyond_the_waiting_bound_gets_503_at_once_and_the_rest_are_answered(bounded_predictor, client,
                                                                                     cifar100_test_split):
    """``--max_waiting_requests`` (default: TorchServe's job_queue_size) bounds the requests waiting for a
    forward pass: one more is refused at once with 503 (gRPC: UNAVAILABLE), the ones let in are answered,
    and the server serves on, instead of queueing without end behind a flood."""
    import grpc

    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    import kserve_types  # noqa: F401 - registers KServe's gRPC types

    predictor = bounded_predictor
    six = [encode(cifar_pil(cifar100_test_split[0], i)) for i in range(6)]  # each request a whole batch
    url = infer_url(predictor)
    channel = grpc.insecure_channel(predictor.grpc_target)
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)

    def rest(i):
        r = client.post(url, json=v2_body(six), headers={"X-Request-ID": f"flood-{i}"})
        return r.status_code, r.json().get("error", "")

    def over_grpc(_):
        try:
            stub.ModelInfer(grpc_request(six), timeout=60)
            return 200, ""
        except grpc.RpcError as err:
            return err.code().name, err.details()

    with ThreadPoolExecutor(16) as pool:  # a burst over REST, then one over gRPC
        answers = list(pool.map(rest, range(16))) + list(pool.map(over_grpc, range(8)))
    channel.close()
    refused = [a for a in answers if a[0] in (503, "UNAVAILABLE")]
    assert {503, "UNAVAILABLE"} <= {status for status, _ in refused}, answers
    assert refused and all("busy" in why and "1 requests already wait" in why for _, why in refused), answers
    assert all(a[0] in (200, 503, "UNAVAILABLE") for a in answers), answers
    assert sum(a[0] == 200 for a in answers) >= 2, answers
    assert bound_metrics(predictor).get("max_waiting_requests") == len(refused)  # counted at /metrics, by setting
    r = client.post(url, json=v2_body(six[:1]))
    assert r.status_code == 200 and predictor.process.poll() is None, r.text
    wait_for_log(predictor, "503 to request 'flood-")  # the refusal's log line names a refused request


@pytest.mark.integration  # starts its own server process
def test_one_clients_flood_leaves_other_clients_a_place_to_wait_for_the_forward_pass(bundle, tmp_path, client,
                                                                                  cifar100_test_split):
    """One client's flood took every place to wait for a forward pass (--max_waiting_requests), and everyone else got
    503 while it lasted (the hostile probe of make serve-kserve: 49 of 53 REST requests of another client). Now a
    client keeps its share of them (--max_client_share) when all are taken: another client's request takes the place
    of the flood's newest, which gets 503 at once."""
    predictor = KServePredictor(tmp_path, bundle, extra_args=["--max_waiting_requests=2"]).start()
    six = [encode(cifar_pil(cifar100_test_split[0], i)) for i in range(6)]
    url = infer_url(predictor)
    stop, flood_answers = [], []

    def flood(_):
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as own:
            while not stop:
                r = own.post(url, json=v2_body(six))
                flood_answers.append((r.status_code, r.json().get("error", "")))
    try:
        with ThreadPoolExecutor(8) as pool:
            floods = [pool.submit(flood, n) for n in range(8)]
            time.sleep(2)  # the flood under way, its places full
            others = [client.post(url, json=v2_body(six[:1])).status_code for _ in range(20)]
            stop.append(True)
            for f in floods:
                f.result(timeout=120)
        gave_way = [why for status, why in flood_answers if status == 503 and "gave its place" in why]
        assert others == [200] * 20, others
        assert gave_way and all(status in (200, 503) for status, _ in flood_answers), flood_answers[:20]
        assert bound_metrics(predictor).get("max_client_share") == len(gave_way)
        assert predictor.process.poll() is None
    finally:
        stop.append(True)
        predictor.stop()


def bound_metrics(predictor: KServePredictor) -> dict[str, int]:
    """The body bound's figures at the predictor's /metrics: bytes held by protocol, gRPC calls waiting, and
    the requests refused by each bound's setting."""
    text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
    figures = {f"held {protocol}": int(float(value))
               for protocol, value in re.findall(r'^RequestBodyBytesHeld\{Protocol="(\w+)"\} (\S+)$', text, re.M)}
    figures["waiting"] = int(float(re.search(r"^GrpcCallsWaiting (\S+)$", text, re.M).group(1)))
    figures.update({bound: int(float(value))
                    for bound, value in re.findall(r'^RequestsRefused_total\{Bound="(\w+)"\} (\S+)$', text, re.M)})
    return figures


@pytest.mark.integration  # starts its own server process
def test_grpc_calls_wait_their_turn_for_the_message_bound_and_a_stalled_sender_loses_its_own(bundle, tmp_path, client,
                                                                                          cifar100_test_split):
    """A gRPC message shows no progress until it is whole, so each call reserves the largest message
    (max_request_size) out of --max_body_bytes_held before its message is read (handler/held_bodies.py):
    under 64 clients x 2 messages of 11 MiB the server peaked at 3.1 GB before. Here the bound is one largest
    message: a sender that stalls holds it, the next call waits its turn, one more than --max_waiting_requests
    is refused at once (UNAVAILABLE), REST has a bound of its own and is answered meanwhile, and the stalled
    call gets DEADLINE_EXCEEDED at --body_timeout_s, when the waiting call is read and answered. Health and
    metadata calls have a bound of their own (--max_grpc_health_calls, here one call): answered at once while
    ModelInfer's is full (they queued behind its stalled calls, then were refused), and a stalled probe makes
    the next probe wait, not ModelInfer."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    import kserve_types  # noqa: F401 - registers KServe's gRPC types
    from grpc_raw import seconds_until_stream_ends, stalled_call

    largest = int(read_properties(bundle / "config" / "config.properties")["max_request_size"])
    predictor = KServePredictor(tmp_path, bundle, extra_args=[
        f"--max_body_bytes_held={largest}", "--body_timeout_s=4", "--max_waiting_requests=1",
        "--max_grpc_health_calls=1"]).start()
    good = encode(cifar_pil(cifar100_test_split[0], 0))
    channel = grpc.insecure_channel(predictor.grpc_target)
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)

    def over_grpc(request_id):
        started = time.monotonic()
        try:
            stub.ModelInfer(grpc_request([good]), metadata=[("x-request-id", request_id)], timeout=30)
            return "OK", "", time.monotonic() - started
        except grpc.RpcError as err:
            return err.code().name, err.details(), time.monotonic() - started
    try:
        assert over_grpc("alone")[0] == "OK"  # a call alone is answered: the bound is reached by nothing yet
        stalled = stalled_call("127.0.0.1", predictor.grpc_port, "/inference.GRPCInferenceService/ModelInfer",
                               message_bytes=100_000, sent_bytes=1_000)
        time.sleep(1.5)  # the stalled call holds the whole bound
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(over_grpc, "waiting")
            time.sleep(0.5)
            refused = over_grpc("one-more")
            rest = client.post(infer_url(predictor), json=v2_body([good]))
            probes_started = time.monotonic()
            probes = [stub.ServerLive(pb().ServerLiveRequest(), timeout=3).live,
                      stub.ServerReady(pb().ServerReadyRequest(), timeout=3).ready,
                      stub.ModelReady(pb().ModelReadyRequest(name="cifar100"), timeout=3).ready,
                      stub.ModelMetadata(pb().ModelMetadataRequest(name="cifar100"), timeout=3).name == "cifar100"]
            probes_took = time.monotonic() - probes_started
            during = bound_metrics(predictor)
            ended = seconds_until_stream_ends(stalled, timeout=10)
            waited = waiting.result(timeout=30)
        stalled.close()
        assert refused[0] == "UNAVAILABLE" and "busy" in refused[1] and "--max_body_bytes_held" in refused[1], refused
        assert refused[2] < 2, refused  # at once, not after a wait
        assert rest.status_code == 200, rest.text
        assert all(probes) and probes_took < 2, (probes, probes_took)
        assert ended is not None and ended < 4, ended  # its 4 s from its start: 1.5 + 0.5 + the REST calls before
        assert waited[0] == "OK" and waited[2] > 1, waited  # answered once the stalled call let go of the bound
        assert over_grpc("after")[0] == "OK" and predictor.process.poll() is None
        # At /metrics: what the bound held while the stalled call had it, and what it refused, by setting.
        assert during["held grpc"] == largest and during["held rest"] == 0 and during["waiting"] == 1, during
        assert bound_metrics(predictor) == {"held grpc": 0, "held rest": 0, "waiting": 0, "max_body_bytes_held": 1,
                                            "body_timeout_s": 1}
        wait_for_log(predictor, "DEADLINE_EXCEEDED to /inference.GRPCInferenceService/ModelInfer")
        wait_for_log(predictor, "UNAVAILABLE to /inference.GRPCInferenceService/ModelInfer (request 'one-more')")
        # A probe that stalls holds the health calls' one reservation: the next probe waits its turn, ModelInfer not.
        stalled_probe = stalled_call("127.0.0.1", predictor.grpc_port, "/inference.GRPCInferenceService/ServerLive",
                                     message_bytes=100_000, sent_bytes=1_000)
        time.sleep(0.5)
        with ThreadPoolExecutor(1) as pool:
            probe_started = time.monotonic()
            probe = pool.submit(lambda: stub.ServerLive(pb().ServerLiveRequest(), timeout=30).live)
            inferred = over_grpc("beside a stalled probe")
            probe_waited = (probe.result(timeout=30), time.monotonic() - probe_started)
        stalled_probe.close()
        assert inferred[0] == "OK" and inferred[2] < 2, inferred
        assert probe_waited[0] and 2 < probe_waited[1] < 10, probe_waited  # the stalled one's 4 s deadline
        wait_for_log(predictor, "DEADLINE_EXCEEDED to /inference.GRPCInferenceService/ServerLive")
    finally:
        channel.close()
        predictor.stop()


@pytest.mark.integration  # starts its own server process
def test_one_clients_stalled_grpc_calls_take_only_its_share_of_the_bound_and_other_clients_are_answered(
        bundle, tmp_path, cifar100_test_split):
    """A stalled gRPC sender holds its reservation until --body_timeout_s: eight of them from one client held the
    whole default bound, and every other client waited, then got UNAVAILABLE. Now one client holds at most its
    --max_client_share (half) of the reservations, and when the waiting places are full another client's call
    takes the place of the newest call of a client past its share of them. Here: two reservations, two waiting
    places, 127.0.0.1 a trusted proxy. A client at 127.0.0.2 stalls three calls (one holds a turn, two wait,
    passed over); a call forwarded for another client takes the other reservation at once. A slow client at
    127.0.0.3 then holds that one; a call from 127.0.0.2 naming another client (not a trusted proxy: ignored) finds
    the places full and is refused, a call forwarded for a new client takes the staller's newest place instead, and
    gets the turn 127.0.0.3 frees, before the staller's older waiting call."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    import kserve_types  # noqa: F401 - registers KServe's gRPC types
    from grpc_raw import seconds_until_stream_ends, send_rest, stalled_call

    largest = int(read_properties(bundle / "config" / "config.properties")["max_request_size"])
    predictor = KServePredictor(tmp_path, bundle, extra_args=[
        f"--max_body_bytes_held={2 * largest}", "--body_timeout_s=6", "--max_waiting_requests=2",
        "--trusted_proxies=127.0.0.1"]).start()
    good = encode(cifar_pil(cifar100_test_split[0], 0))
    channel = grpc.insecure_channel(predictor.grpc_target)
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    method, staller, slow = "/inference.GRPCInferenceService/ModelInfer", "127.0.0.2", "127.0.0.3"

    def over_grpc(request_id, forwarded_for=None):
        metadata = [("x-request-id", request_id)] + ([("x-forwarded-for", forwarded_for)] if forwarded_for else [])
        started = time.monotonic()
        try:
            stub.ModelInfer(grpc_request([good]), metadata=metadata, timeout=30)
            return "OK", "", time.monotonic() - started
        except grpc.RpcError as err:
            return err.code().name, err.details(), time.monotonic() - started

    def stall(source, message_bytes=100_000, metadata=()):
        sock = stalled_call("127.0.0.1", predictor.grpc_port, method, message_bytes=message_bytes, sent_bytes=1_000,
                            source=source, metadata=metadata)
        time.sleep(0.3)  # in the order of their starts
        return sock
    try:
        stalled = [stall(staller), stall(staller)]
        held_one = bound_metrics(predictor)
        other = over_grpc("another client", forwarded_for="203.0.113.7, 127.0.0.1")  # the proxy's own entry skipped
        slow_call = stall(slow, message_bytes=2_000)  # the other reservation, for a while
        with ThreadPoolExecutor(2) as pool:
            newest = pool.submit(over_grpc, "the staller's newest", staller)  # forwarded for it: its share
            time.sleep(0.5)  # the waiting places are full now
            spoofed = stall(staller, metadata=(("x-forwarded-for", "198.51.100.1"),))
            spoofed_ended = seconds_until_stream_ends(spoofed, timeout=3)
            newcomer = pool.submit(over_grpc, "a new client", "192.0.2.9")
            given_up = newest.result(timeout=5)
            full = bound_metrics(predictor)
            send_rest(slow_call, b"\0" * 1_000)  # its message whole (no ModelInfer request): its turn ends
            came = newcomer.result(timeout=30)
        ended = [seconds_until_stream_ends(sock, timeout=10) for sock in stalled]
        for sock in (*stalled, slow_call, spoofed):
            sock.close()
        assert held_one["held grpc"] == largest and held_one["waiting"] == 1, held_one  # the second one, passed over
        assert other[0] == "OK" and other[2] < 2, other  # the other reservation at once, not behind the staller's
        assert spoofed_ended is not None and spoofed_ended < 2, spoofed_ended  # full: refused, its header ignored
        # Its place went to the newcomer, with the reason.
        assert given_up[0] == "UNAVAILABLE" and f"from your address ({staller})" in given_up[1], given_up
        assert "--max_client_share" in given_up[1] and given_up[2] < 3, given_up
        assert full["held grpc"] == 2 * largest and full["waiting"] == 2, full
        assert full.get("max_client_share") == 1 and full.get("max_body_bytes_held") == 1, full
        assert came[0] == "OK" and came[2] < 4, came  # the freed turn was its, before the staller's waiting call
        assert all(end is not None for end in ended), ended  # at their deadline
        assert over_grpc("its share free again", forwarded_for=staller)[0] == "OK"
        figures = bound_metrics(predictor)
        assert (figures["held grpc"], figures["waiting"]) == (0, 0), figures
    finally:
        channel.close()
        predictor.stop()


@pytest.mark.integration  # starts its own server process
def test_two_clients_stalled_grpc_calls_at_half_each_give_a_third_client_a_reservation(bundle, tmp_path,
                                                                                       cifar100_test_split):
    """Two addresses stalling gRPC calls at their share (half the reservations each) held every reservation, and
    another client's call waited 29 s (--body_timeout_s) for one (session 52's hostile probe). Now a newcomer within
    its fair share (an equal part among the clients holding or waiting) takes the newest reservation of the client
    holding the most, past that part: that call is refused at once (UNAVAILABLE, Bound=max_client_share) and the
    newcomer is answered. Four reservations; 127.0.0.2 and 127.0.0.3 stall two calls each, then 127.0.0.1 calls."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    import kserve_types  # noqa: F401 - registers KServe's gRPC types
    from grpc_raw import seconds_until_stream_ends, stalled_call

    largest = int(read_properties(bundle / "config" / "config.properties")["max_request_size"])
    predictor = KServePredictor(tmp_path, bundle, extra_args=[
        f"--max_body_bytes_held={4 * largest}", "--body_timeout_s=20"]).start()
    channel = grpc.insecure_channel(predictor.grpc_target)
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    method = "/inference.GRPCInferenceService/ModelInfer"
    stalled = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"):
            stalled.append(stalled_call("127.0.0.1", predictor.grpc_port, method, message_bytes=100_000,
                                        sent_bytes=1_000, source=source))
            time.sleep(0.3)  # in the order of their starts
        full = bound_metrics(predictor)
        started = time.monotonic()
        answer = stub.ModelInfer(grpc_request([encode(cifar_pil(cifar100_test_split[0], 0))]), timeout=30)
        answered = time.monotonic() - started
        ended = [seconds_until_stream_ends(sock, timeout=0.5) for sock in stalled]
        after = bound_metrics(predictor)
        assert (full["held grpc"], full["waiting"]) == (4 * largest, 0), full  # each at its share of two
        assert answer.outputs and answered < 4, answered  # not the 20 s a stalled reservation holds
        # 127.0.0.2, the first of those holding the most, gave its newest (the third stall); the rest stall on.
        assert [end is not None for end in ended] == [False, False, True, False], ended
        assert after.get("max_client_share") == 1 and after["held grpc"] == 3 * largest, after
        wait_for_log(predictor, "its reservation went to another client's call")
    finally:
        for sock in stalled:
            sock.close()
        channel.close()
        predictor.stop()


@pytest.mark.integration  # starts its own server process
def test_stalled_grpc_calls_one_per_address_give_their_reservations_to_another_client_past_the_grace(
        bundle, tmp_path, cifar100_test_split):
    """Eight addresses stalling one gRPC call each were each within their fair share and held every reservation: another
    client's call waited 28 s (--body_timeout_s). Now a reservation whose message has not come within
    --grpc_message_grace_s goes to a waiting call of a client holding fewer, the oldest first: that call is refused
    (UNAVAILABLE, Bound=grpc_message_grace_s) and the newcomer answered after about the grace. Four reservations,
    127.0.0.2-5 stall one call each, then 127.0.0.1 calls; 127.0.0.2 stalls another in the reservation that frees,
    and 127.0.0.1's next call takes the next oldest, past the grace already: at once."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    import kserve_types  # noqa: F401 - registers KServe's gRPC types
    from grpc_raw import seconds_until_stream_ends, stalled_call

    largest = int(read_properties(bundle / "config" / "config.properties")["max_request_size"])
    predictor = KServePredictor(tmp_path, bundle, extra_args=[
        f"--max_body_bytes_held={4 * largest}", "--body_timeout_s=20", "--grpc_message_grace_s=1.5"]).start()
    channel = grpc.insecure_channel(predictor.grpc_target)
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = grpc_request([encode(cifar_pil(cifar100_test_split[0], 0))])
    stalled = []

    def answered_after() -> float:
        started = time.monotonic()
        assert stub.ModelInfer(request, timeout=30).outputs
        return time.monotonic() - started

    def stall(source: str) -> None:
        stalled.append(stalled_call("127.0.0.1", predictor.grpc_port, "/inference.GRPCInferenceService/ModelInfer",
                                    message_bytes=100_000, sent_bytes=1_000, source=source))
        time.sleep(0.3)  # in the order of their starts: 0.3 s apart
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            stall(source)
        full = bound_metrics(predictor)
        first = answered_after()
        stall("127.0.0.2")  # the reservation the first call freed
        second = answered_after()
        ended = [seconds_until_stream_ends(sock, timeout=0.5) for sock in stalled]
        after = bound_metrics(predictor)
        assert (full["held grpc"], full["waiting"]) == (4 * largest, 0), full  # one each: within their shares
        # The grace less the 1.2 s since the first stall began (at once, on a loaded machine); not the 20 s they held.
        assert first < 3, first
        assert second < 1, second
        # 127.0.0.2's first and 127.0.0.3's, the two oldest, gave way; 127.0.0.2's second stalls on.
        assert [end is not None for end in ended] == [True, True, False, False, False], ended
        assert after.get("grpc_message_grace_s") == 2 and after["held grpc"] == 3 * largest, after
        assert "max_client_share" not in after, after  # no one was past its share
        wait_for_log(predictor, "had not come within 1.5 s (--grpc_message_grace_s)")
    finally:
        for sock in stalled:
            sock.close()
        channel.close()
        predictor.stop()


def connection_state(sock: socket.socket | None) -> str:
    """"open" (nothing to read, or bytes the server sent), "closed" (FIN) or "reset", without waiting. None: a
    connection reset before connect() returned (connect_or_reset)."""
    if sock is None:
        return "reset"
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65536) == b"":
                return "closed"
    except BlockingIOError:
        return "open"
    except OSError:
        return "reset"


def went_idle(states: list) -> bool:
    """A gRPC channel's connectivity states (channel.subscribe): it was connected, then the server closed it."""
    import grpc

    ready = [n for n, state in enumerate(states) if state == grpc.ChannelConnectivity.READY]
    return bool(ready) and grpc.ChannelConnectivity.IDLE in states[ready[0]:]


def seconds_until_closed(sock: socket.socket | None, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        if connection_state(sock) != "open":
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def closed_at(sock: socket.socket | None, timeout: float) -> float | None:
    """When (time.monotonic()) ``sock`` was seen closed or reset, watched for ``timeout`` s; None: still open."""
    return None if seconds_until_closed(sock, timeout) is None else time.monotonic()


@pytest.mark.integration  # starts its own server process
def test_connections_that_send_nothing_are_capped_and_closed_on_both_ports(bundle, tmp_path, client,
                                                                          cifar100_test_split):
    """KServe's REST server kept a connection that sends nothing for ever: 19,990 of them from one client took all
    20,000 file descriptors, and no client was answered while they stayed. Now REST has the adapter's edge
    (adapter/protocol.py): --max_client_connections from one address (one more reset at once, another address
    answered), --max_open_connections in all, a silent connection closed at --header_timeout_s as a head that
    trickles is (408), a connection idle between requests at the keep-alive time. gRPC has grpc core's:
    --max_open_connections (one more closed at once), the HTTP/2 preface within --header_timeout_s, a connection
    with no call closed (GOAWAY) at --header_timeout_s too, and a channel's next call after that close reconnects.

    Silent connections were kept for the keep-alive time on both ports (65 s; 59 s over gRPC): 4-5 addresses x 128
    silent REST sockets, or 515 gRPC connections that sent the preface and SETTINGS, reset every other client (and
    the liveness probe) that long; now --header_timeout_s."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from grpc_raw import PREFACE

    import kserve_types  # noqa: F401 - registers KServe's gRPC types

    header_s, keepalive_s = 2, 6
    predictor = KServePredictor(tmp_path, bundle, extra_args=[
        "--max_open_connections=6", "--max_client_connections=3", f"--header_timeout_s={header_s}",
        f"--timeout-keep-alive={keepalive_s}"]).start()
    good = encode(cifar_pil(cifar100_test_split[0], 0))

    def connect(port, source="127.0.0.2"):
        return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))

    def connect_or_reset(port, source="127.0.0.2"):
        """A connection the server may refuse at once: None when its reset came before connect() returned. A socket
        with a timeout connects non-blocking (EINPROGRESS, then poll and SO_ERROR): on a loaded machine the server
        accepted and reset the fourth from one address in that gap, and create_connection raised
        ConnectionResetError (22 of 600 tries beside two CPU hogs, none of 300 without)."""
        try:
            return connect(port, source)
        except ConnectionResetError:
            return None
    watcher = ThreadPoolExecutor(1)
    try:
        silent, opened = [connect_or_reset(predictor.port) for _ in range(4)], time.monotonic()
        kept = connect(predictor.port, "127.0.0.3")  # one request, then idle between requests
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        kept_answer = kept.recv(65536)
        kept_answered = time.monotonic()
        time.sleep(0.5)
        rest_states = [connection_state(sock) for sock in silent]
        silent_closed = [time.monotonic() + seconds_until_closed(sock, 10) - opened for sock in silent[:3]]
        answered = client.post(infer_url(predictor), json=v2_body([good]))  # from 127.0.0.1: another client
        trickling = connect(predictor.port, "127.0.0.3")
        trickling.sendall(b"POST /v2/models/cifar100/infer HTTP/1.1\r\nHost: x\r\n")  # and no more
        time.sleep(max(0.0, kept_answered + header_s + 1 - time.monotonic()))
        kept_state = connection_state(kept)  # past the head's deadline: still open
        # Its close (at the keep-alive time) watched from a thread while the rest goes on: other ports and clients.
        kept_closing = watcher.submit(closed_at, kept, 10)
        trickled = trickling.recv(65536).decode("latin-1")  # its 408, at the head's deadline
        # gRPC: six silent connections fill its count, a seventh is closed at once; unfinished handshakes go.
        grpc_silent = [connect_or_reset(predictor.grpc_port, f"127.0.0.{4 + n}") for n in range(7)]
        time.sleep(0.5)
        grpc_states = [connection_state(sock) for sock in grpc_silent]
        grpc_closed = [seconds_until_closed(sock, 10) for sock in grpc_silent[:6]]
        # Six that finish the handshake and make no call fill the count too: other clients are refused until
        # they are closed (GOAWAY, then closed), at --header_timeout_s, no longer the keep-alive time.
        idle = [connect(predictor.grpc_port, f"127.0.0.{4 + n}") for n in range(6)]
        for sock in idle:
            sock.sendall(PREFACE)
        idle_opened = time.monotonic()
        time.sleep(0.5)
        with grpc.insecure_channel(predictor.grpc_target) as locked_out:
            try:
                grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(locked_out).ServerLive(
                    pb().ServerLiveRequest(), timeout=1)
                refused = None
            except grpc.RpcError as err:
                refused = err.code()
        idle_closed = [time.monotonic() + seconds_until_closed(sock, 15) - idle_opened for sock in idle]
        # A well-behaved client: its channel's next call after the idle close reconnects and succeeds.
        states = []
        with grpc.insecure_channel(predictor.grpc_target) as channel:
            channel.subscribe(states.append)
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(grpc_request([good]), timeout=30)
            last_call = time.monotonic()
            # grpc core checks for idleness each period and starts another one when a call came in the last: a
            # connection that made calls is closed one to two periods after its last.
            while time.monotonic() < last_call + 2 * header_s + 5 and not went_idle(states):
                time.sleep(0.05)
            idle_after, states_idle = time.monotonic() - last_call, list(states)
            again = stub.ModelInfer(grpc_request([good]), timeout=30)
        kept_closed = kept_closing.result(timeout=15)
        for sock in (*silent, kept, trickling, *grpc_silent, *idle):
            if sock is not None:
                sock.close()
        assert rest_states == ["open", "open", "open", "reset"], rest_states
        assert all(header_s - 0.2 < closed < header_s + 1.5 for closed in silent_closed), silent_closed
        assert kept_answer.startswith(b"HTTP/1.1 200"), kept_answer
        assert kept_state == "open" and kept_closed is not None, (kept_state, kept_closed)
        assert keepalive_s - 0.5 < kept_closed - kept_answered < keepalive_s + 2, kept_closed - kept_answered
        assert answered.status_code == 200, answered.text
        assert trickled.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in trickled, trickled
        assert grpc_states[:6] == ["open"] * 6 and grpc_states[6] != "open", grpc_states
        assert all(closed is not None and closed < 3 for closed in grpc_closed), grpc_closed
        assert refused == grpc.StatusCode.UNAVAILABLE, refused
        assert all(1.5 < closed < header_s + 1.5 for closed in idle_closed), idle_closed
        assert went_idle(states_idle) and idle_after < 2 * header_s + 3, (states_idle, idle_after)  # closed
        assert [output.name for output in again.outputs], again
        assert predictor.process.poll() is None
        text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
        refused_http = {reason: int(float(value)) for reason, value in
                        re.findall(r'^HttpRefused_total\{Reason="(\w+)"\} (\S+)$', text, re.M)}
        assert refused_http["client_connections"] == 1 and refused_http["timeout"] == 1, refused_http
        assert refused_http["connections"] == 0 and refused_http["bad_http"] == 0, refused_http
        wait_for_log(predictor, "reset a connection from 127.0.0.2: it has 3 open (MAX_CLIENT_CONNECTIONS)")
    finally:
        watcher.shutdown()
        predictor.stop()


@pytest.mark.integration  # starts its own server process
def test_one_address_holds_at_most_its_own_grpc_connections_and_other_clients_calls_are_answered(
        bundle, tmp_path, cifar100_test_split):
    """grpc core counts connections only in all: one address that opened --max_open_connections connections and
    sent the HTTP/2 preface (no call) held every gRPC connection until grpc closed them as idle
    (--header_timeout_s), every other client's call UNAVAILABLE meanwhile. Now the gRPC port is a relay
    (handler/grpc_relay.py) counting them as the REST port does: past --max_client_connections from one address,
    reset at once; another client's call answered; the relayed ones still closed with grpc's idle close. Then two
    addresses fill all 8 with 4 each (their own cap): once quiet for --min_rate_grace_s (checked every half of it),
    one of them gives way to another client's call (with no gRPC connection taken as idle, four addresses at 128 had
    filled the 512)."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from grpc_raw import PREFACE

    import kserve_types  # noqa: F401 - registers KServe's gRPC types

    header_s = 3
    predictor = KServePredictor(tmp_path, bundle, extra_args=[
        "--max_open_connections=8", "--max_client_connections=4", f"--header_timeout_s={header_s}",
        "--min_rate_grace_s=0.6"]).start()
    good = encode(cifar_pil(cifar100_test_split[0], 0))

    def idle_connection(source="127.0.0.2"):
        """A connection from ``source`` with the preface sent, or None when it was reset before that."""
        try:
            sock = socket.create_connection(("127.0.0.1", predictor.grpc_port), timeout=5,
                                            source_address=(source, 0))
            sock.sendall(PREFACE)
            return sock
        except OSError:
            return None
    flood = []
    try:
        flood, opened = [idle_connection() for _ in range(10)], time.monotonic()
        time.sleep(0.5)
        states = [connection_state(sock) for sock in flood]
        with grpc.insecure_channel(predictor.grpc_target) as channel:  # from 127.0.0.1: another client
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            answer = stub.ModelInfer(grpc_request([good]), timeout=max(1.0, opened + header_s - 0.5 - time.monotonic()))
        still = [connection_state(sock) for sock in flood[:4]]
        closed = [seconds_until_closed(sock, 10) for sock in flood[:4]]
        assert states == ["open"] * 4 + ["reset"] * 6, states
        assert [output.name for output in answer.outputs], answer
        assert still == ["open"] * 4, still  # the call came while they were open
        # grpc's close of a connection with no call reaches the client through the relay
        assert all(seconds is not None for seconds in closed), closed
        text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
        reset = {reason: int(float(value)) for reason, value in
                 re.findall(r'^GrpcConnectionsReset_total\{Reason="(\w+)"\} (\S+)$', text, re.M)}
        assert reset == {"client_connections": 6, "connections": 0, "streams": 0, "all_streams": 0, "frames": 0,
                         "headers": 0}, reset
        wait_for_log(predictor, "reset a connection from 127.0.0.2: it has 4 open (MAX_CLIENT_CONNECTIONS)")

        for sock in filter(None, flood):
            sock.close()
        flood = [idle_connection(source) for source in ["127.0.0.3"] * 4 + ["127.0.0.4"] * 4]
        opened = time.monotonic()
        time.sleep(0.1)
        assert [connection_state(sock) for sock in flood] == ["open"] * 8
        time.sleep(1.2)  # quiet past the grace at a check, before grpc's idle close
        with grpc.insecure_channel(predictor.grpc_target) as channel:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            answer = stub.ModelInfer(grpc_request([good]), timeout=max(1.0, opened + header_s - 0.3 - time.monotonic()))
        assert [output.name for output in answer.outputs], answer
        states = [connection_state(sock) for sock in flood]
        assert sorted(states) == ["closed"] + ["open"] * 7, states  # one quiet connection of the two gave way
        wait_for_log(predictor, "closed an idle connection of 127.0.0.")
        assert predictor.process.poll() is None
    finally:
        for sock in flood:
            if sock is not None:
                sock.close()
        predictor.stop()


@pytest.mark.integration  # starts its own server process
def test_clients_that_leave_before_their_answer_cost_no_forward_pass_nor_the_waiting_slot(bounded_predictor, client,
                                                                                        cifar100_test_split):
    """uvicorn lets a handler run on for a client gone: before RequestChecks watched the connection, ten
    clients that sent 64 images and left at once had 640 images decoded and run for nobody, and held the
    waiting slot, so that a live request right after was refused. Over the plain v2 route, KServe's own
    v2 route (a body with ``parameters``) and v1; their cancellation logs no error."""
    import socket

    sixty_four = [encode(cifar_pil(cifar100_test_split[0], i)) for i in range(64)]
    bodies = [("/v2/models/cifar100/infer", v2_body(sixty_four)),
              ("/v2/models/cifar100/infer", {**v2_body(sixty_four), "parameters": {}}),
              ("/v1/models/cifar100:predict", v1_body(sixty_four))]
    requests = [f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(body)}\r\n\r\n".encode() + body
                for path, body in ((path, json.dumps(body).encode()) for path, body in bodies)]
    host, port = bounded_predictor.url.removeprefix("http://").split(":")
    before = counters(bounded_predictor)
    for i in range(12):  # each sends its whole request and leaves without reading an answer
        with socket.create_connection((host, int(port)), timeout=30) as gone:
            gone.sendall(requests[i % 3])
    time.sleep(0.2)
    r = client.post(infer_url(bounded_predictor), json=v2_body(sixty_four[:1]))
    assert r.status_code == 200, r.text
    time.sleep(1)  # a request let run on would be through its forward pass by now
    ran = counters(bounded_predictor)["EngineImages_total"] - before.get("EngineImages_total", 0)
    assert ran < 2 * 64, f"{ran:g} images run for 12 clients gone and one live request"
    assert "Exception in ASGI application" not in bounded_predictor.log.read_text()


def test_the_model_repository_extension_is_refused_and_the_model_stays_loaded(kserve_predictor, grpc_stub, client,
                                                                               cifar100_test_split):
    """KServe's model repository extension let any client unload the model for good (its load then failed),
    over REST or gRPC, while the pod stayed up: refused on both (501, UNIMPLEMENTED), not advertised in the
    server metadata, and the model answers on."""
    import grpc

    good = encode(cifar_pil(cifar100_test_split[0], 0))
    for verb in ("unload", "load"):
        r = client.post(f"{kserve_predictor.url}/v2/repository/models/cifar100/{verb}")
        assert r.status_code == 501 and "model repository extension is not served" in r.json()["error"], r.text
    for method, request in (("RepositoryModelUnload", pb().RepositoryModelUnloadRequest(model_name="cifar100")),
                            ("RepositoryModelLoad", pb().RepositoryModelLoadRequest(model_name="cifar100"))):
        with pytest.raises(grpc.RpcError) as refused:
            getattr(grpc_stub, method)(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, (method, refused.value.details())
        assert "model repository extension is not served" in refused.value.details()
    assert client.get(f"{kserve_predictor.url}/v2/models/cifar100/ready").status_code == 200
    assert client.post(infer_url(kserve_predictor), json=v2_body([good])).status_code == 200
    assert grpc_stub.ModelReady(pb().ModelReadyRequest(name="cifar100"), timeout=30).ready
    assert grpc_stub.ModelInfer(grpc_request([good]), timeout=60).outputs
    assert client.get(f"{kserve_predictor.url}/v2").json()["extensions"] == []
    assert list(grpc_stub.ServerMetadata(pb().ServerMetadataRequest(), timeout=30).extensions) == []


# A health probe sent while a request of many tiny parts is refused waits at most this (seconds; the host's 2 cores
# are shared with other tests). Before the requests below were refused on counts they held it 2-20 s.
PROBE_DELAY_LIMIT_S = 0.5


def probe_delay_during(probe, call) -> tuple[object, float]:
    """``call()``'s result, and the longest a ``probe()`` repeated meanwhile took."""
    import threading

    delays, done = [], threading.Event()

    def probing():
        while not done.is_set():
            started = time.monotonic()
            probe()
            delays.append(time.monotonic() - started)
            time.sleep(0.02)

    prober = threading.Thread(target=probing)
    prober.start()
    time.sleep(0.1)
    try:
        result = call()
    finally:
        done.set()
        prober.join()
    return result, max(delays)


def test_a_request_of_many_tiny_parts_is_refused_on_counts_without_holding_up_the_others(kserve_predictor,
                                                                                         grpc_stub, client):
    """Under the 16 MiB limit, a request of 100,000 one-element inputs (or a tensor of a million elements) had
    every element turned into Python objects on the server's one event loop before the 64-image limit refused
    it: every REST and gRPC client, health probes included, waited seconds. Now it is refused on plain counts
    (gRPC: before KServe's conversion; REST: the body's commas, before it is parsed), and a probe meanwhile is
    answered at once."""
    import grpc

    tiny_inputs = pb().ModelInferRequest(model_name="cifar100")
    for _ in range(100_000):
        tiny_inputs.inputs.add(datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    many_elements = grpc_request([b"x"] * 1_000_000)
    raw_elements = grpc_request([b"x"] * 800_000, raw=True)
    bare_inputs = pb().ModelInferRequest(model_name="cifar100", inputs=[{} for _ in range(100_000)])
    live_url = f"{kserve_predictor.url}/v2/health/live"

    def rest_probe():
        assert client.get(live_url).status_code == 200

    channel = grpc.insecure_channel(kserve_predictor.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)])
    # Sent serialized: the test's own serializing would hold its probe thread (the GIL), not the server.
    model_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                      response_deserializer=pb().ModelInferResponse.FromString)
    for request, words in ((tiny_inputs, "100000 inputs in one request"), (bare_inputs, "100000 inputs"),
                           (many_elements, "1000000 images in one request"), (raw_elements, "more than 64 images")):
        message = request.SerializeToString()

        def refused():
            with pytest.raises(grpc.RpcError) as err:
                model_infer(message, timeout=120)
            return err.value

        err, delay = probe_delay_during(rest_probe, refused)
        assert delay < PROBE_DELAY_LIMIT_S, (words, delay, err.details())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()
        assert "above the limit of 64" in err.details()
    channel.close()

    def grpc_probe():
        assert grpc_stub.ServerLive(pb().ServerLiveRequest(), timeout=120).live

    tiny = {"inputs": [{"name": "", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}] * 100_000}
    bodies = [json.dumps(body) for body in (
        tiny, {**tiny, "parameters": {}},  # the plain route and KServe's
        {"inputs": [{"name": "image", "shape": [1_000_000], "datatype": "BYTES", "data": [""] * 1_000_000}]})]
    # Python's JSON parser reads UTF-8 after a byte order mark and UTF-16/32 too: counted as well.
    for data in (*(body.encode() for body in bodies), codecs.BOM_UTF8 + bodies[0].encode(),
                 json.dumps({"inputs": tiny["inputs"][:20_000], "parameters": {}}).encode("utf-16")):
        r, delay = probe_delay_during(grpc_probe, lambda: client.post(
            infer_url(kserve_predictor), content=data, headers={"Content-Type": "application/json"}))
        assert delay < PROBE_DELAY_LIMIT_S, (delay, r.text[:300])
        assert r.status_code == 413 and "commas (values), above the limit" in r.json()["error"], r.text[:300]
    assert client.post(infer_url(kserve_predictor), json=v2_body([decompression_bomb_png()])).status_code == 413
    assert kserve_predictor.process.poll() is None


def test_an_output_asked_twice_is_refused_not_answered_twice(kserve_predictor, grpc_stub, client, cifar100_test_split):
    """Each copy of a repeated output was answered: 30,000 copies made a 0.96 MB request a 107 MB answer (REST)
    and held the event loop 15 s before gRPC refused to send it."""
    import grpc

    good = encode(cifar_pil(cifar100_test_split[0], 0))
    r = client.post(infer_url(kserve_predictor), json={**v2_body([good]), "outputs": [{"name": "name"}] * 3})
    assert r.status_code == 400 and "['name'] asked more than once" in r.json()["error"], r.text
    for copies, words in ((2, "['topk_name'] asked more than once"), (30_000, "30000 outputs asked")):
        request = grpc_request([good])
        for _ in range(copies):
            request.outputs.add(name="topk_name")
        with pytest.raises(grpc.RpcError) as refused:
            grpc_stub.ModelInfer(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details(), (
            refused.value.details())
    chosen = grpc_request([good])
    chosen.outputs.add(name="topk_name")
    chosen.outputs.add(name="label")
    assert [o.name for o in grpc_stub.ModelInfer(chosen, timeout=60).outputs] == ["topk_name", "label"]


def test_an_answer_echoes_no_long_id_nor_a_refused_body(kserve_predictor, grpc_stub, client, cifar100_test_split):
    """A v2 answer echoes the request's id, and FastAPI's 422 echoed the body it refused (each error's "input"): an
    11 MB id sent on 100 connections that read nothing held the predictor 0.9 GB up in unsent answers. An id is at
    most REQUEST_ID_MAX_LENGTH characters (400 past it, on every route and over gRPC), a caller's X-Request-ID too
    (else a new id), and a validation error is a short {"error": ...}."""
    import grpc

    from serving.settings import REQUEST_ID_MAX_LENGTH

    good = encode(cifar_pil(cifar100_test_split[0], 0))
    url = infer_url(kserve_predictor)
    longest, over = "i" * REQUEST_ID_MAX_LENGTH, "i" * (REQUEST_ID_MAX_LENGTH + 1)
    kept = client.post(url, json=v2_body([good], request_id=longest))
    assert kept.status_code == 200 and kept.json()["id"] == longest, kept.text
    huge = "A" * (1 << 20)
    # the plain route, and KServe's (a body with parameters goes there)
    for body in (v2_body([good], request_id=over), v2_body([good], request_id=huge),
                 {**v2_body([good], request_id=huge), "parameters": {"x": 1}}):
        r = client.post(url, json=body)
        assert r.status_code == 400 and f"more than {REQUEST_ID_MAX_LENGTH}" in r.json()["error"], r.text[:300]
        assert len(r.content) < 1000
    with pytest.raises(grpc.RpcError) as refused:
        grpc_stub.ModelInfer(grpc_request([good], request_id=huge), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()[:300]
    assert f"more than {REQUEST_ID_MAX_LENGTH}" in refused.value.details() and len(refused.value.details()) < 1000
    # no id in the body: the caller's X-Request-ID when within the limit, else a new one
    tagged = client.post(url, json=v2_body([good]), headers={"X-Request-ID": over})
    assert tagged.status_code == 200 and re.fullmatch("[0-9a-f]{32}", tagged.json()["id"]), tagged.text
    # FastAPI's validation error: the reason and where, not the body
    wrong = client.post(url, json={"id": 5, "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                         "data": [huge]}]})
    assert wrong.status_code == 422 and "detail" not in wrong.json(), wrong.text[:300]
    assert wrong.json()["error"].startswith("not an inference request: ") and ".id)" in wrong.json()["error"]
    assert len(wrong.content) < 1000
    # Nor a datatype, an output's name or a Content-Type the 400 names: an 11 MB output name came back whole, and
    # 128 such answers unread held the predictor 1.4 GB up. Cut as a tensor's name is, on /infer and :explain.
    image = v2_body([good])["inputs"][0]
    for route in (url, f"{kserve_predictor.url}/v1/models/cifar100:explain"):
        for body, words in (({"inputs": [{**image, "datatype": huge}]}, "datatype 'AAAA"),
                            ({"inputs": [image], "outputs": [{"name": huge}] * 6}, "'...] and 2 more; this model")):
            r = client.post(route, json=body)
            assert r.status_code == 400 and words in r.json()["error"], r.text[:300]
            assert len(r.content) < 1000, r.text[:300]
    typed = client.post(url, content=b"{}", headers={"Content-Type": "text/" + "x" * 8000})
    assert typed.status_code == 400 and "(not 'text/xxx" in typed.json()["error"] and len(typed.content) < 1000
    request = grpc_request([good], datatype=huge)
    with pytest.raises(grpc.RpcError) as refused:
        grpc_stub.ModelInfer(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(refused.value.details()) < 1000
    assert client.post(url, json=v2_body([good])).status_code == 200


def test_a_body_that_cannot_be_read_as_sent_is_refused_and_a_long_target_is_logged_cut(kserve_predictor):
    """The REST port's edge is the adapter's (adapter/protocol.py): a Content-Encoding got FastAPI's 400 {"detail"},
    a Transfer-Encoding of gzip, chunked or an HTTP/1.0 POST without Content-Length KServe's 422 "Field required";
    now 415, 501, 411 {"error": ...}. And an access line carried a request's whole target: 16 KiB a 404."""
    from adapter.edge import PATH_LOGGED
    from test_adapter_edge import coded_requests, raw_request

    body = json.dumps(v2_body([b"not an image"])).encode()
    for expected, request in coded_requests(b"/v2/models/cifar100/infer", b"application/json", body).items():
        answer = raw_request(kserve_predictor.url, request)
        head, _, text = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + expected[:3].encode()), (expected, answer[:300])
        assert "not supported" in json.loads(text)["error"] or "Content-Length" in json.loads(text)["error"]
    long_path = "/x" + "A" * 15000
    assert httpx.get(kserve_predictor.url + long_path, timeout=30).status_code == 404
    deadline = time.monotonic() + 10
    while not (lines := [line for line in kserve_predictor.log.read_text(errors="replace").splitlines()
                         if "GET /xAAAA" in line]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lines and all(len(line) < PATH_LOGGED + 200 and "(15002 characters)" in line for line in lines), (
        [line[:300] for line in lines])


def test_a_version_or_model_not_served_is_not_found_and_logs_no_traceback(kserve_predictor, grpc_stub,
                                                                          cifar100_test_split):
    """gRPC: a model_version other than the served one was answered by the served one (ModelReady said ready);
    a wrong model name or a lowercase datatype got KServe's refusal with a traceback in the log for each."""
    import grpc

    good = encode(cifar_pil(cifar100_test_split[0], 0))
    served = weights_version(weights_under_test())
    pinned, wrong_version, wrong_model = grpc_request([good]), grpc_request([good]), grpc_request([good])
    pinned.model_version, wrong_version.model_version, wrong_model.model_name = served, "9", "cifar10"
    assert grpc_stub.ModelInfer(pinned, timeout=60).model_version == served
    def tracebacks() -> int:  # in the log and in what the process printed outside it
        logs = (kserve_predictor.log, stderr_file(kserve_predictor.log))
        return sum(path.read_text().count("Traceback") for path in logs)
    log_before = tracebacks()
    refusals = [
        ("ModelInfer", wrong_version, grpc.StatusCode.NOT_FOUND,
         f"no version '9': this server serves version '{served}'"),
        ("ModelReady", pb().ModelReadyRequest(name="cifar100", version="9"), grpc.StatusCode.NOT_FOUND, "no version"),
        ("ModelMetadata", pb().ModelMetadataRequest(name="cifar100", version="9"), grpc.StatusCode.NOT_FOUND,
         "no version"),
        ("ModelInfer", wrong_model, grpc.StatusCode.NOT_FOUND, "cifar10 does not exist"),
        ("ModelReady", pb().ModelReadyRequest(name="cifar10"), grpc.StatusCode.NOT_FOUND, "cifar10 does not exist"),
        ("ModelInfer", grpc_request([good], datatype="bytes"), grpc.StatusCode.INVALID_ARGUMENT,
         "datatype 'bytes' is not supported"),
    ]
    for method, request, code, words in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            getattr(grpc_stub, method)(request, timeout=60)
        assert refused.value.code() == code and words in refused.value.details(), (method, refused.value.details())
    with pytest.raises(grpc.RpcError) as refused:  # a long version is cut in the answer, as over REST
        grpc_stub.ModelReady(pb().ModelReadyRequest(name="cifar100", version="v" * 4000), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and len(refused.value.details()) < 300
    assert grpc_stub.ModelReady(pb().ModelReadyRequest(name="cifar100", version=served), timeout=30).ready
    assert tracebacks() == log_before



def test_the_served_versions_rest_routes_answer_as_the_routes_without_it_and_another_version_is_not_found(
        kserve_predictor, client, cifar100_test_split):
    """REST: KServe answered /v2/models/cifar100/versions/<version>[/ready|/infer] 501 "Model versioning not
    supported yet" whatever the version, where gRPC took the served one."""
    served = weights_version(weights_under_test())
    base = f"{kserve_predictor.url}/v2/models/cifar100"
    body = v2_body([encode(cifar_pil(cifar100_test_split[0], 0))])
    for route in (f"/versions/{served}", f"/versions/{served}/ready"):
        versioned, plain = client.get(base + route), client.get(base + route.replace(f"/versions/{served}", ""))
        assert versioned.status_code == plain.status_code == 200 and versioned.json() == plain.json(), versioned.text
    answered, plain = client.post(f"{base}/versions/{served}/infer", json=body), client.post(f"{base}/infer", json=body)
    assert answered.status_code == 200 and answered.json()["model_version"] == served, answered.text
    assert v2_answers(answered.json()) == v2_answers(plain.json())
    for method, route in (("GET", "/versions/9"), ("GET", "/versions/9/ready"), ("POST", "/versions/9/infer")):
        refused = client.request(method, base + route, json=body if method == "POST" else None)
        assert refused.status_code == 404, (route, refused.text)
        assert refused.json() == {"error": f"model cifar100 has no version '9': this server serves version "
                                           f"'{served}' (or leave the version out)"}, refused.text
    long_version = client.get(f"{base}/versions/{'v' * 4000}/ready")
    assert long_version.status_code == 404 and len(long_version.text) < 300, long_version.text
    other_model = client.get(f"{kserve_predictor.url}/v2/models/cifar10/versions/{served}/ready")
    assert other_model.status_code == 404 and "cifar10" in other_model.text, other_model.text  # KServe's, not 501
    # The access line names the route as it was sent.
    assert f"/v2/models/cifar100/versions/{served}/infer" in kserve_predictor.log.read_text()
