"""adapter/oip.py against a real HTTP server (aiohttp.web) playing an Open Inference Protocol server
that answers with each failure a KServe deployment can give: the statuses /classify/ passes on
must be the ones it gives in front of TorchServe (adapter/torchserve.py)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time

import pytest
from aiohttp import web

from adapter.config import Settings
from adapter.errors import ClassifyError
from adapter.model_server import MESSAGE_KEPT, PROBE_IMAGE
from adapter.oip import OIPClient
from serving.process import free_port
from test_adapter_edge import samples

GOOD = {"id": "x", "model_name": "cifar100", "model_version": "w3-test", "outputs": [
    {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["aquarium_fish"]},
    {"name": "name", "datatype": "BYTES", "shape": [1], "data": ["Aquarium fish"]},
    {"name": "index", "datatype": "INT64", "shape": [1], "data": [1]},
    {"name": "probability", "datatype": "FP32", "shape": [1], "data": [0.9]},
    {"name": "unsure", "datatype": "BOOL", "shape": [1], "data": [False]},
    {"name": "topk_label", "datatype": "BYTES", "shape": [1, 2], "data": ["aquarium_fish", "flatfish"]},
    {"name": "topk_name", "datatype": "BYTES", "shape": [1, 2], "data": ["Aquarium fish", "Flatfish"]},
    {"name": "topk_index", "datatype": "INT64", "shape": [1, 2], "data": [1, 32]},
    {"name": "topk_probability", "datatype": "FP32", "shape": [1, 2], "data": [0.9, 0.05]}]}


SEEN_HEADERS: list[dict] = []  # every request's headers, as the fake server received them


@contextlib.asynccontextmanager
async def stand_in_server(route, app: web.Application | None = None):
    """A real aiohttp.web server on a free loopback port, in the running event loop, answering every
    method and path with ``route`` (request -> response); yields its base URL."""
    app = app if app is not None else web.Application()
    app.router.add_route("*", "/{tail:.*}", route)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def call_server(reply, settings_kwargs=None, method="predict", metrics=None):
    """Run the fake server (reply: request -> web.Response) and one client call against it; ``method``:
    "predict", "status", or a coroutine function of the client."""
    seen = []

    async def infer(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("Host"), await request.text()))
        SEEN_HEADERS.append(dict(request.headers))
        return await reply(request)

    calls = {"predict": lambda client: client.predict(b"PNGDATA"), "status": lambda client: client.model_status()}
    async with stand_in_server(infer) as url:
        client = OIPClient(Settings(oip_url=url, **(settings_kwargs or {})), metrics)
        try:
            return await calls.get(method, method)(client), seen
        finally:
            await client.aclose()


def json_reply(status: int, body) -> callable:
    """An answer of ``status`` with ``body`` as JSON (a str: sent as it is, "" an empty body)."""
    async def reply(request):
        return web.Response(status=status, text=body if isinstance(body, str) else json.dumps(body),
                            content_type="application/json")
    return reply


def errors_by_kind(metrics) -> dict[str, float]:
    """adapter_model_server_errors_total's kinds that counted something (each is there from the start, at 0)."""
    return {s.labels["kind"]: s.value for s in metrics.model_server_errors.collect()[0].samples
            if s.name.endswith("_total") and s.value}


def test_a_v2_answer_becomes_the_handlers_answer_and_the_request_is_v2():
    reply = json_reply(200, {**GOOD, "parameters": {"engine": "openvino-int8"}})  # the forward pass that answered
    answer, seen = asyncio.run(call_server(reply, {"oip_host_header": "cifar100.default.example.com"}))
    assert answer == {"prediction": "Aquarium fish", "label": "aquarium_fish", "index": 1, "probability": 0.9,
                      "unsure": False, "model_version": "w3-test", "engine": "openvino-int8",
                      "topk": [{"label": "aquarium_fish", "name": "Aquarium fish", "index": 1, "probability": 0.9},
                               {"label": "flatfish", "name": "Flatfish", "index": 32, "probability": 0.05}]}
    path, host, body = seen[0]
    assert path == "/v2/models/cifar100/infer" and host == "cifar100.default.example.com"
    [tensor] = json.loads(body)["inputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [1]
    assert base64.b64decode(tensor["data"][0]) == b"PNGDATA"


@pytest.mark.parametrize("status, body, expected_status, words", [
    (400, {"error": "inputs[0] ('image') data[0]: not an image"}, 400, "not an image"),
    (413, {"error": "image is 9000x9000 pixels"}, 413, "9000x9000"),
    (413, "", 413, "larger than the model server accepts"),  # TorchServe's own size refusal: no body
    (415, {"error": "image/x-foo is not a supported image type"}, 415, "not a supported image type"),
    (429, {"error": "too many requests"}, 429, "too many requests"),
    (404, {"error": "Model with name cifar100 does not exist."}, 503, "not loaded"),
    (503, {"error": "no worker"}, 503, "busy or has no worker ready"),
    (500, {"error": "boom"}, 502, "failed (500)"),
    (200, {"predictions": [{"label": "x"}]}, 502, "not an Open Inference Protocol answer"),
    (200, {**GOOD, "outputs": GOOD["outputs"][:2]}, 502, "lacks the outputs"),
])
def test_failures_get_the_same_statuses_as_in_front_of_torchserve(status, body, expected_status, words):
    with pytest.raises(ClassifyError) as err:
        asyncio.run(call_server(json_reply(status, body)))
    assert err.value.status_code == expected_status and words in err.value.message


@pytest.mark.parametrize("body", [{"error": "x" * 200_000}, "x" * 200_000])
def test_a_model_servers_huge_error_message_is_cut_before_it_is_passed_on_or_logged(body, caplog):
    """A 200 KB {"error": ...} made a 200 KB answer and log line (plain text was cut to 300 characters)."""
    for status in (400, 500):
        with pytest.raises(ClassifyError) as err:
            asyncio.run(call_server(json_reply(status, body)))
        assert len(err.value.message) <= MESSAGE_KEPT + 100, (status, len(err.value.message))
    assert caplog.records and all(len(r.getMessage()) <= MESSAGE_KEPT + 100 for r in caplog.records)


EXPLAINED = {"prediction": "Aquarium fish", "label": "aquarium_fish", "index": 1, "probability": 0.9, "unsure": False,
             "topk": [], "model_version": "w3-test", "heatmap": "data:image/png;base64,iVBORw0KGgo="}


def test_an_explanation_asks_kserves_v1_explain_route_and_needs_a_heatmap():
    explain = lambda client: client.predict(b"PNGDATA", explain=True)  # noqa: E731
    answer, seen = asyncio.run(call_server(json_reply(200, {"predictions": [EXPLAINED]}), method=explain))
    assert answer == EXPLAINED
    path, _, body = seen[0]
    assert path == "/v1/models/cifar100:explain"
    assert base64.b64decode(json.loads(body)["instances"][0]["data"]) == b"PNGDATA"


@pytest.mark.parametrize("status, body, expected_status, words", [
    (200, {"predictions": [{**EXPLAINED, "heatmap": None}]}, 502, "no prediction and heatmap"),
    (200, {"outputs": []}, 502, "no prediction and heatmap"),
    (501, {"error": "explain is not implemented"}, 501, "no explanations"),  # KServe's Model without explain()
    (404, {"detail": "Not Found"}, 501, "no explanations"),                 # a server without the route
    (404, {"error": "Model with name cifar100 does not exist."}, 503, "not loaded"),
    (400, {"error": "instances[0].data: not an image"}, 400, "not an image"),
])
def test_explanation_failures(status, body, expected_status, words):
    with pytest.raises(ClassifyError) as err:
        asyncio.run(call_server(json_reply(status, body), method=lambda client: client.predict(b"x", explain=True)))
    assert err.value.status_code == expected_status and words in err.value.message, err.value.message


def test_slow_server_is_504_and_absent_server_is_503():
    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(text="{}")
    with pytest.raises(ClassifyError) as err:
        asyncio.run(call_server(slow, {"predict_timeout_s": 0.5}))
    assert err.value.status_code == 504

    async def absent():
        client = OIPClient(Settings(oip_url=f"http://127.0.0.1:{free_port()}"))
        try:
            await client.predict(b"x")
        finally:
            await client.aclose()
    with pytest.raises(ClassifyError) as err:
        asyncio.run(absent())
    assert err.value.status_code == 503 and "not reachable" in err.value.message


def test_health_asks_the_models_ready_endpoint():
    status, seen = asyncio.run(call_server(json_reply(200, {"name": "cifar100", "ready": True}), method="status"))
    assert seen[0][0] == "/v2/models/cifar100/ready" and status["model"] == "cifar100"
    with pytest.raises(ClassifyError) as err:
        asyncio.run(call_server(json_reply(503, {"error": "not ready"}), method="status"))
    assert err.value.status_code == 503


# KServe's wrapper (TorchServe's kserve_wrapper on kserve 0.13's model server) answers like this: a
# stand-in, because the wrapper needs kserve 0.13, which conflicts with this project's packages
# (kserve 0.21's type modules; the wrapper fails to import under 0.21). The bodies are the ones
# measured behind the real wrapper (README, KServe): kserve's HTTPStatusError text inside its 500.
INTERNAL_URL = "http://127.0.0.1:8085/v2/models/cifar100/infer"


def wrapper_500(inner: str, code: str) -> dict:
    return {"error": f"HTTPStatusError : {inner}, '{code}' for url '{INTERNAL_URL}'"}


@pytest.mark.parametrize("status, body, expected_status, expected_message", [
    (500, wrapper_500("inputs[0] ('image') data[0]: not an image", "400 Bad Request"),
     400, "inputs[0] ('image') data[0]: not an image"),
    (500, wrapper_500("65 images in one request, above the limit of 64 (handler.max_images_per_request)",
                      "413 Request Entity Too Large"),
     413, "65 images in one request, above the limit of 64 (handler.max_images_per_request)"),
    (500, wrapper_500("{'code': 400, 'type': 'BadRequestException', 'message': 'Invalid input'}", "400 Bad Request"),
     400, "Invalid input"),
    (500, {"error": f", '400 Bad Request' for url '{INTERNAL_URL}'"}, 400, "The model server refused the request (400)."),
    (422, {"detail": [{"loc": ["body", "inputs", 0, "datatype"], "msg": "Field required", "type": "missing"}]},
     400, "The model server could not read the request: Field required (inputs.0.datatype)"),
    # KServe's predictor's own 422 (no "detail": FastAPI's echoed the body), its reason passed on
    (422, {"error": "not an inference request: Field required (inputs.0.datatype)"},
     400, "The model server could not read the request: not an inference request: Field required (inputs.0.datatype)"),
    (503, {"error": f"upstream connect error to {INTERNAL_URL}: connection refused"},
     503, "The model server is busy or has no worker ready; try again shortly."),
    (400, {"error": "could not fetch https://10.0.0.7:8443/v2/models/cifar100/infer?x=1 for this image"},
     400, "could not fetch (internal address) for this image"),
    (500, {"error": "KeyError : 'outputs'"}, 502, "The model server failed (500); the adapter's log has the details."),
    # A long wrapped message: the wrapper's tail is read whole, the message passed on cut (MESSAGE_KEPT)
    (500, wrapper_500("y" * 5000, "400 Bad Request"), 400, "y" * MESSAGE_KEPT),
    (500, {"error": f"HTTPStatusError : Server error '500 Internal Server Error' for url '{INTERNAL_URL}'"},
     502, "The model server failed (500); the adapter's log has the details."),
])
def test_a_client_error_wrapped_by_kserves_wrapper_is_that_4xx_without_internals(status, body, expected_status,
                                                                                 expected_message):
    with pytest.raises(ClassifyError) as err:
        asyncio.run(call_server(json_reply(status, body)))
    assert (err.value.status_code, err.value.message) == (expected_status, expected_message)
    for internal in ("127.0.0.1", "http://", "HTTPStatusError", "KeyError", "Exception"):
        assert internal not in err.value.message


def test_the_request_id_and_the_model_version_travel_with_the_request():
    from adapter.request_context import CURRENT

    async def one_request():
        context = {"request_id": "client-id-7", "model_version": None}
        token = CURRENT.set(context)
        try:
            await call_server(json_reply(200, GOOD))
        finally:
            CURRENT.reset(token)
        return context

    SEEN_HEADERS.clear()
    context = asyncio.run(one_request())
    assert SEEN_HEADERS[0]["X-Request-ID"] == "client-id-7"
    assert context["model_version"] == "w3-test"  # for the request's log line


def test_model_server_failures_are_counted_by_kind():
    from adapter.metrics import Metrics

    metrics = Metrics()

    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(text="{}")

    cases = [(json_reply(500, {"error": "boom"}), {}), (json_reply(200, {"predictions": []}), {}),
             (slow, {"predict_timeout_s": 0.5}),
             (json_reply(400, {"error": "not an image"}), {}),  # the image's fault: not counted
             (json_reply(503, {"error": "no worker"}), {}),  # the model server's own 503: unavailable
             (json_reply(404, {"error": "Model with name cifar100 does not exist."}), {})]  # no_model
    for reply, settings_kwargs in cases:
        with pytest.raises(ClassifyError):
            asyncio.run(call_server(reply, settings_kwargs, metrics=metrics))
    asyncio.run(call_server(json_reply(200, GOOD), metrics=metrics))
    kinds = errors_by_kind(metrics)
    assert kinds == {"error_answer": 1, "bad_answer": 1, "timeout": 1, "unavailable": 1, "no_model": 1}
    assert metrics.model_server_latency.collect()[0].samples  # every call timed
    count = next(s.value for s in metrics.model_server_latency.collect()[0].samples if s.name.endswith("_count"))
    assert count == 7


def test_a_connection_that_breaks_mid_request_is_sent_once_more_as_in_front_of_torchserve():
    """A pooled connection the server closed, or a pod going away: the prediction is sent again once (it is
    idempotent), counted as a retry; a second break is the client's 503."""
    from adapter.metrics import Metrics

    def breaking(times: int):
        calls = []

        async def reply(request):
            calls.append(request.path)
            if len(calls) <= times:
                request.transport.close()  # gone mid-request: no answer at all
                await asyncio.sleep(1)
            return await json_reply(200, GOOD)(request)
        return reply

    metrics = Metrics()
    answer, seen = asyncio.run(call_server(breaking(1), metrics=metrics))
    assert answer["prediction"] == "Aquarium fish" and len(seen) == 2
    assert metrics.retries.collect()[0].samples[0].value == 1
    with pytest.raises(ClassifyError) as info:
        asyncio.run(call_server(breaking(2)))
    assert info.value.status_code == 503


def test_no_pooled_connection_free_in_time_is_503_busy_not_a_timeout():
    """TS_MAX_CONNECTIONS=1 and a server that takes 1 s per answer, a 1.5 s deadline for the wait and the
    answer together (as in front of TorchServe): of three requests at once the first is answered, the
    second gets the connection at 1 s and is too slow (504), the third still waits for a connection
    at 1.5 s: 503 "busy" (try again), counted as busy, not 504 (slow) nor "not reachable". (0.5 s of slack
    each way: with 0.7 s and 1 s, a loaded CI host answered the first too late once.)"""
    from adapter.metrics import Metrics

    metrics = Metrics()

    async def slowish(request):
        await asyncio.sleep(1.0)
        return web.json_response(GOOD)

    def three_at_once(client):
        return asyncio.gather(*(client.predict(b"PNG") for _ in range(3)), return_exceptions=True)

    results, _ = asyncio.run(call_server(slowish, {"max_connections": 1, "predict_timeout_s": 1.5},
                                         three_at_once, metrics))
    assert isinstance(results[0], dict), results
    assert [(r.status_code, "busy" in r.message) for r in results[1:]] == [(504, False), (503, True)], results
    assert results[2].headers == {"Retry-After": "1"}  # slow, not down: a later try may pass
    kinds = errors_by_kind(metrics)
    assert kinds == {"timeout": 1, "busy": 1}


@pytest.mark.parametrize("hold", [None, 0.0])
def test_a_call_given_up_on_holds_its_pooled_connection_unless_the_model_server_stops_it(hold):
    """TS_MAX_CONNECTIONS=1, a first answer that never comes in time (504 at 0.5 s): the adapter closes that
    connection (a model server that stops a request whose client left, as this project's predictor does, sees
    it go). Held for the response timeout (30 s, as in front of TorchServe, which runs it on), the next call finds
    no connection: 503 busy, with the model server idle. MODEL_SERVER_HOLD_S=0 frees it at once: answered."""
    closed, calls = asyncio.Event(), []

    async def first_never_in_time(request):
        calls.append(request.path)
        if len(calls) > 1:
            return web.json_response(GOOD)
        for _ in range(50):  # the adapter's close, as the predictor's request watcher sees it
            await asyncio.sleep(0.1)
            if request.transport is None or request.transport.is_closing():
                closed.set()
                break
        return web.json_response(GOOD)

    async def two_calls(client):
        with pytest.raises(ClassifyError) as first:
            await client.predict(b"PNG")
        assert first.value.status_code == 504
        await asyncio.wait_for(closed.wait(), 3)
        try:
            return await client.predict(b"PNG")
        except ClassifyError as err:
            return err

    second, _ = asyncio.run(call_server(first_never_in_time, {"max_connections": 1, "predict_timeout_s": 0.5,
                                                              "response_timeout_s": 30, "model_server_hold": hold},
                                        two_calls))
    if hold is None:
        assert isinstance(second, ClassifyError) and second.status_code == 503 and "busy" in second.message, second
    else:
        assert isinstance(second, dict) and second["prediction"] == "Aquarium fish", second


class ReadinessServer:
    """A v2 server on a real port, in its own thread: /v2/models/cifar100/ready answers 200 while
    `ready`, else 503 (as KServe's model server does), and it records the Host header it gets."""

    def __init__(self):
        import threading

        self.ready = True
        self.answering = True  # its inference route: a good answer, else a 500 (ready but wedged)
        self.refusing: int | None = None  # else its inference route refuses every image with this 4xx
        self.infers = 0
        self.request_ids: list[str | None] = []  # each inference call's X-Request-ID
        self.hosts: list[str] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(30)

    async def _ready(self, request: web.Request) -> web.Response:
        self.hosts.append(request.headers.get("Host", ""))
        if self.ready:
            return web.json_response({"name": "cifar100", "ready": True})
        return web.json_response({"error": "Model with name cifar100 is not ready."}, status=503)

    async def _infer(self, request: web.Request) -> web.Response:
        self.hosts.append(request.headers.get("Host", ""))
        self.infers += 1
        self.request_ids.append(request.headers.get("X-Request-ID"))
        if self.refusing is not None:
            return web.json_response({"error": "the image holds too many pixels"}, status=self.refusing)
        if self.answering:
            return web.json_response({**GOOD, "parameters": {"engine": "openvino-int8"}})
        return web.json_response({"error": "boom"}, status=500)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v2/models/cifar100/ready", self._ready)
        app.router.add_post("/v2/models/cifar100/infer", self._infer)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_adapter_process_in_oip_mode_health_follows_readiness_and_sends_the_host_header(tmp_path):
    """The settings end to end (environment -> running adapter -> HTTP): OIP_URL, OIP_HOST_HEADER,
    HEALTH_CACHE_S=0, /health from the v2 readiness route, and /explain/ 501 from a server without KServe's explain route.
    The model server's refusals passed on (its 413, that 501) are no refusals of the adapter's in its metrics, and
    its call latencies are apart by call (/health's probe with the id of the /health request that sent it).
    (KServe's own model server in front of a real model: tests/test_kserve_predictor.py.)"""
    import httpx

    from adapter.run import running_adapter

    server = ReadinessServer()
    env = {"OIP_URL": f"http://127.0.0.1:{server.port}", "OIP_HOST_HEADER": "cifar100.default.example.com",
           "TS_KEY_FILE": str(tmp_path / "none.json")}
    try:
        # HEALTH_CACHE_S=0: each change below is read at once, not up to a second later.
        with running_adapter({**env, "HEALTH_MAX_SILENCE_S": "0.5", "HEALTH_CACHE_S": "0"},
                             tmp_path / "adapter.log") as adapter:
            health = httpx.get(f"{adapter.base_url}/health", timeout=30)
            assert health.status_code == 200, health.text
            # (the probe's id is that of the /health request that sent it: running_adapter's own, here)
            assert server.request_ids and all(re.fullmatch("[0-9a-f]{32}", id or "") for id in server.request_ids)
            assert server.hosts and set(server.hosts) == {"cifar100.default.example.com"}
            # Silent for too long: /health classifies a tiny image itself, and names the engine that answered.
            assert server.infers >= 1 and health.json()["engine"] == "openvino-int8", health.text
            # Ready, but its answers fail (a wedged server): 503, as in front of TorchServe.
            server.answering = False
            time.sleep(0.6)
            health = httpx.get(f"{adapter.base_url}/health", timeout=30)
            assert health.status_code == 503 and "not answering" in health.json()["error"], health.text
            server.answering = True
            server.ready = False
            health = httpx.get(f"{adapter.base_url}/health", timeout=30)
            assert health.status_code == 503 and "not ready" in health.json()["error"], health.text
            assert httpx.get(f"{adapter.base_url}/settings", timeout=30).json()["explain"] is True  # not yet asked
            explain = httpx.post(f"{adapter.base_url}/explain/", files={"image": ("a.png", PROBE_IMAGE, "image/png")},
                                 timeout=30)
            assert explain.status_code == 501 and "TorchServe" in explain.json()["error"], explain.text
            # The page reads it there and offers no "Why?" any more (tests/test_page_explain.py).
            assert httpx.get(f"{adapter.base_url}/settings", timeout=30).json()["explain"] is False
            server.refusing = 413
            refused = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("a.png", PROBE_IMAGE, "image/png")},
                                 timeout=30)
            assert refused.status_code == 413 and "too many pixels" in refused.json()["error"], refused.text
            values = samples(httpx.get(f"{adapter.base_url}/metrics", timeout=30).text)
            assert values[("adapter_requests_total", (("route", "/classify/"), ("status", "413")))] == 1
            assert values[("adapter_requests_total", (("route", "/explain/"), ("status", "501")))] == 1
            assert values[("adapter_refusals_total", (("reason", "too_large"),))] == 0
            assert values[("adapter_refusals_total", (("reason", "unsupported"),))] == 0
            calls = {call: values[("adapter_model_server_duration_seconds_count", (("call", call),))]
                     for call in ("prediction", "explanation", "probe")}
            assert calls == {"prediction": 1, "explanation": 1, "probe": server.infers - 1}, (calls, server.infers)
    finally:
        server.close()
