"""The /classify/ adapter as a real uvicorn process in front of the session's real TorchServe.

Checks the seed's contract on real CIFAR-100 test images (against TorchServe's own answer), every
error status, the upload limit acting while the body streams in, key rotation and renewal, and
TorchServe stopped and restarted under a running adapter. TorchServe's failures that a real one gives
only by chance (a worker dying mid-batch, an expired key, a reset, a wedged model) against a stand-in
server, as tests/test_adapter_oip.py does for an Open Inference Protocol server.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from PIL import Image

from adapter.config import Settings
from adapter.errors import ClassifyError
from adapter.metrics import Metrics
from adapter.request_context import CURRENT
from adapter.run import running_adapter
from adapter.torchserve import TorchServeClient
from model.classes import display_name
from ctrl_c import sigint_as_in_a_terminal, stopped_by
from test_adapter_oip import errors_by_kind, stand_in_server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIMIT = 10 * 1024 * 1024  # the adapter's default MAX_UPLOAD_BYTES


def encode(image_chw, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def adapter(torchserve, tmp_path_factory):
    """The adapter with its default settings (10 MB limit, no CORS origin), pointed at the session's TorchServe."""
    log = tmp_path_factory.mktemp("adapter") / "adapter.log"
    with running_adapter(torchserve.adapter_env(), log) as proc:
        yield proc


@pytest.fixture(scope="module")
def images(cifar100_test_split):
    """Eight real CIFAR-100 test images as PNG files' bytes, with their true labels."""
    data, labels = cifar100_test_split
    picks = [0, 1, 2, 3, 500, 1234, 5000, 9999]
    return [(encode(data[i]), int(labels[i])) for i in picks]


def classify(base: str, content: bytes, filename: str = "photo.png", content_type: str = "image/png",
             field: str = "image", timeout: float = 60.0) -> httpx.Response:
    return httpx.post(f"{base}/classify/", files={field: (filename, content, content_type)}, timeout=timeout)


def direct_prediction(ts, content: bytes) -> dict:
    r = httpx.post(ts.predictions_url, content=content, headers=ts.key_file.header("inference"), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_adapter_imports_no_torch():
    code = "import sys, adapter.app, adapter.run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_display_rule_matches_the_model_package():
    from adapter import app

    # One rule for the whole project: the adapter uses model.classes' function itself.
    assert app.display_name is display_name
    assert display_name("aquarium_fish") == "Aquarium fish" and display_name("maple_tree") == "Maple tree"


def test_contract_on_real_test_images(adapter, torchserve_ready, images):
    for content, _label in images:
        expected = direct_prediction(torchserve_ready, content)
        r = classify(adapter.base_url, content)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        # Byte for byte the seed's answer starts {"prediction":"Aquarium fish" (FastAPI's compact JSON).
        head = b'{"prediction":' + json.dumps(expected["prediction"], separators=(",", ":")).encode()
        assert r.content.startswith(head), r.content[:80]
        answer = r.json()
        assert answer["prediction"] == expected["prediction"] == display_name(expected["label"])
        assert answer["label"] == expected["label"] and answer["index"] == expected["index"]
        assert answer["top5"] == [{"name": t["name"], "label": t["label"], "index": t["index"],
                                   "probability": t["probability"]} for t in expected["topk"]]
        assert len(answer["top5"]) == 5
        assert answer["model_version"] == expected["model_version"]
        assert answer["time_ms"] > 0


def test_jpeg_and_no_trailing_slash(adapter, torchserve_ready, cifar100_test_split):
    data, _ = cifar100_test_split
    jpeg = encode(data[42], "JPEG")
    expected = direct_prediction(torchserve_ready, jpeg)
    # The seed's router redirected /classify to /classify/; here both answer directly.
    r = httpx.post(f"{adapter.base_url}/classify", files={"image": ("p.jpg", jpeg, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["prediction"] == expected["prediction"]


@pytest.mark.parametrize("request_kwargs, words", [
    ({"files": {"photo": ("a.png", b"x", "image/png")}}, "field named 'image'"),  # wrong field name
    ({"files": {"image": ("a.png", b"", "image/png")}}, "empty"),
    # The seed answered for the last of them silently; which one the caller meant is theirs to say.
    ({"files": [("image", ("a.png", b"x", "image/png")), ("image", ("b.png", b"y", "image/png"))]},
     "more than one field named 'image'"),
    ({"content": b'{"image": "x"}', "headers": {"content-type": "application/json"}}, "multipart/form-data"),
    ({"data": {"image": "just text"}}, "multipart/form-data"),  # a urlencoded form
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, ""),
], ids=["no-image-field", "empty-file", "two-image-fields", "json-body", "urlencoded", "malformed-multipart"])
def test_bad_requests_are_400_in_seed_shape(adapter, request_kwargs, words):
    r = httpx.post(f"{adapter.base_url}/classify/", timeout=30, **request_kwargs)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"]


def test_not_an_image_passes_on_torchserves_refusal(adapter, torchserve_ready):
    r = classify(adapter.base_url, b"this is a text file, not a picture\n", "notes.txt", "text/plain")
    assert r.status_code == 400, r.text
    body = r.json()
    assert list(body) == ["error"] and "image" in body["error"].lower()
    # The same refusal straight from TorchServe's handler: the adapter passes its message on.
    direct = httpx.post(torchserve_ready.predictions_url, content=b"this is a text file, not a picture\n",
                        headers=torchserve_ready.key_file.header("inference"), timeout=30)
    assert direct.status_code == 400 and direct.json()["error"] == body["error"]


def test_unknown_route_and_wrong_method_in_seed_shape(adapter):
    r = httpx.get(f"{adapter.base_url}/nothing-here", timeout=10)
    assert r.status_code == 404 and list(r.json()) == ["error"]
    r = httpx.get(f"{adapter.base_url}/classify/", timeout=10)
    assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["allow"] == "POST"
    r = httpx.delete(f"{adapter.base_url}/health", timeout=10)
    assert r.status_code == 405 and list(r.json()) == ["error"]


def test_bad_and_good_requests_at_once_each_get_their_own_answer(adapter, torchserve_ready, images):
    """A refused image in the same TorchServe batch must not fail the good ones beside it. The bad ones are
    PNGs cut short: their headers pass the adapter (which refuses what is no image at all itself), their
    pixels fail in the handler."""
    expected = {content: direct_prediction(torchserve_ready, content)["prediction"] for content, _ in images}

    async def run():
        async with httpx.AsyncClient(base_url=adapter.base_url, timeout=60) as client:
            good = [client.post("/classify/", files={"image": ("p.png", c, "image/png")}) for c in expected]
            bad = [client.post("/classify/", files={"image": ("t.png", c[:len(c) // 2], "image/png")})
                   for c, _ in images]
            return await asyncio.gather(*good, *bad)

    answers = asyncio.run(run())
    for content, r in zip(expected, answers[:8]):
        assert r.status_code == 200 and r.json()["prediction"] == expected[content]
    assert all(r.status_code == 400 and "truncated" in r.json()["error"] for r in answers[8:]), answers[8].text


def test_health_ok(adapter, torchserve_ready):
    r = httpx.get(f"{adapter.base_url}/health", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["workers_ready"] >= 1
    # The forward pass the answers come from (handler/engine.py), as the handler names it.
    from handler.engine import ENGINES

    assert r.json()["engine"] in ENGINES, r.text


def test_cors_allows_no_origin_by_default(adapter):
    # The page is served from the adapter's own origin; other origins get no CORS grant.
    r = httpx.options(f"{adapter.base_url}/classify/", timeout=10, headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "access-control-allow-origin" not in r.headers


def test_page_served_at_root(adapter):
    r = httpx.get(f"{adapter.base_url}/", timeout=10)
    assert r.status_code == 200 and 'id="drop-zone"' in r.text
    assert httpx.get(f"{adapter.base_url}/app.js", timeout=10).status_code == 200


def test_page_files_are_revalidated_and_carry_security_headers(adapter):
    """Every file of the page: Cache-Control no-cache (without it, an upgrade's app.js went unseen
    for days, the browser guessing it fresh from its age), a CSP that keeps the page's fetches on
    this server and forbids framing, nosniff. index.html is marked as the adapter's own page."""
    from adapter.page import ADAPTER_PAGE_MARK

    for path in ("/", "/index.html", "/app.js", "/styles.css", "/examples/test-00015.png"):
        r = httpx.get(f"{adapter.base_url}{path}", timeout=10)
        assert r.status_code == 200, path
        assert r.headers["cache-control"] == "no-cache", path
        csp = [part.strip() for part in r.headers["content-security-policy"].split(";")]
        assert {"connect-src 'self'", "frame-ancestors 'none'", "script-src 'self'", "default-src 'none'"} <= set(csp)
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", path
    page = httpx.get(f"{adapter.base_url}/", timeout=10)
    on_disk = (REPO / "frontend" / "index.html").read_bytes()
    assert page.content == on_disk.replace(b"</head>", ADAPTER_PAGE_MARK + b"</head>", 1)
    assert int(page.headers["content-length"]) == len(page.content)
    # Revalidation: the same ETag answers 304 with no body, and the headers still there.
    again = httpx.get(f"{adapter.base_url}/", headers={"If-None-Match": page.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and again.content == b"" and again.headers["cache-control"] == "no-cache"
    head = httpx.head(f"{adapter.base_url}/", timeout=10)
    assert head.status_code == 200 and head.headers["etag"] == page.headers["etag"] and head.content == b""
    # The API's answers are not the page's: no page headers on them.
    assert "content-security-policy" not in httpx.get(f"{adapter.base_url}/settings", timeout=10).headers


# --- the upload limit acts while the body streams in ----------------------------------------------

def _request_head(port: int, extra: str) -> bytes:
    boundary = "b0undary"
    return (f"POST /classify/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{extra}\r\n").encode()


def _read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


def test_413_on_declared_length_before_any_body_byte(adapter):
    port = int(adapter.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # Announce 1 GB and send none of it: the answer must come anyway, from the header alone.
        sock.sendall(_request_head(port, f"Content-Length: {1 << 30}\r\n"))
        status, body = _read_response(sock)
    assert status == 413
    assert json.loads(body) == {"error": "The image is too large: the limit is 10 MiB."}


def test_413_while_a_chunked_upload_is_still_streaming(adapter):
    """No Content-Length: the adapter counts and answers 413 long before the client has finished."""
    port = int(adapter.base_url.rsplit(":", 1)[1])
    planned = 100 * 1024 * 1024
    chunk = b"\0" * (256 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_request_head(port, "Transfer-Encoding: chunked\r\n"))
        part_head = (b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                     b"Content-Type: image/png\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n" % (len(part_head), part_head))
        answered = False
        while sent < planned:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                answered = True
                break
            if writable:
                try:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except (BrokenPipeError, ConnectionResetError):
                    answered = True
                    break
                sent += len(chunk)
        assert answered, "the adapter read 100 MB without refusing it"
        status, body = _read_response(sock)
    assert status == 413 and "too large" in json.loads(body)["error"]
    # Refused near the 10 MB limit (plus what the socket buffers hold), not after everything.
    assert DEFAULT_LIMIT < sent < planned / 2, sent


def test_adapter_still_serves_after_refusals(adapter, torchserve_ready, images):
    content, _ = images[0]
    r = classify(adapter.base_url, content)
    assert r.status_code == 200 and r.json()["prediction"] == direct_prediction(torchserve_ready, content)["prediction"]


# --- a second adapter with tight settings: small limit, tiny timeout, one allowed origin ----------

@pytest.fixture(scope="module")
def tight_adapter(torchserve, tmp_path_factory):
    env = {**torchserve.adapter_env(), "MAX_UPLOAD_BYTES": "20000", "TS_PREDICT_TIMEOUT_S": "0.001",
           "CORS_ALLOW_ORIGINS": "https://page.example, https://other.example"}
    with running_adapter(env, tmp_path_factory.mktemp("tight") / "adapter.log") as proc:
        yield proc


def test_configured_limit_gives_413_for_a_multipart_upload(tight_adapter):
    """MAX_UPLOAD_BYTES is the image's own size, whatever the form around it adds (FORM_OVERHEAD_BYTES): a file of
    exactly 20000 bytes is read whole (then refused as no image, 400), one of 20001 is too large."""
    at_the_limit = classify(tight_adapter.base_url, b"\0" * 20000)  # (random bytes may start as a PPM or BMP)
    assert at_the_limit.status_code == 400 and "not an image" in at_the_limit.json()["error"], at_the_limit.text
    r = classify(tight_adapter.base_url, os.urandom(20001))
    assert r.status_code == 413 and r.json() == {"error": "The image is too large: the limit is 19.5 KiB."}


def test_torchserve_too_slow_gives_504(tight_adapter, torchserve_ready, images):
    # 1 ms is less than any real forward pass takes: TorchServe is "too slow" for this adapter.
    r = classify(tight_adapter.base_url, images[0][0])
    assert r.status_code == 504, r.text
    assert "longer than" in r.json()["error"]


def test_configured_cors_origins(tight_adapter):
    def preflight(origin):
        return httpx.options(f"{tight_adapter.base_url}/classify/", timeout=10, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert preflight("https://page.example").headers["access-control-allow-origin"] == "https://page.example"
    refused = preflight("https://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


# --- keys rotate and expire ----------------------------------------------------------------------

def test_rotated_inference_key_is_picked_up(adapter, torchserve_ready, images):
    content, _ = images[1]
    assert classify(adapter.base_url, content).status_code == 200
    old = torchserve_ready.key_file.load().inference
    torchserve_ready.key_file.renew(torchserve_ready.management_url, "inference")
    new = torchserve_ready.key_file.load().inference
    assert new != old
    r = classify(adapter.base_url, content)
    assert r.status_code == 200, r.text
    # Read from the rewritten file: an adapter that kept the old key would have been refused and renewed the
    # key itself (a fallback that answers too), writing yet another one.
    assert torchserve_ready.key_file.load().inference == new


def test_refused_key_with_unchanged_file_is_renewed(adapter, torchserve_ready, images):
    """An expired key looks like this: the file is unchanged, TorchServe refuses the key in it."""
    content, _ = images[2]
    path = Path(torchserve_ready.key_file.path)
    assert classify(adapter.base_url, content).status_code == 200  # the adapter now holds the current key
    stale_text, stale_stat = path.read_bytes(), path.stat()
    stale_key = json.loads(stale_text)["inference"]["key"]
    torchserve_ready.key_file.renew(torchserve_ready.management_url, "inference")
    # Put the old file back, modification time included: the adapter sees no change, TorchServe
    # refuses the key in it, so only a renewal with the API key can get it an answer.
    path.write_bytes(stale_text)
    os.utime(path, ns=(stale_stat.st_atime_ns, stale_stat.st_mtime_ns))
    r = classify(adapter.base_url, content)
    assert r.status_code == 200, r.text
    assert json.loads(path.read_bytes())["inference"]["key"] != stale_key  # renewed, file rewritten


# --- TorchServe goes away and comes back; the adapter process stays --------------------------------

def test_torchserve_stopped_then_restarted(adapter, torchserve_ready, images):
    content, _ = images[3]
    pid = adapter.process.pid
    expected = direct_prediction(torchserve_ready, content)["prediction"]
    torchserve_ready.stop()
    try:
        r = classify(adapter.base_url, content)
        assert r.status_code == 503, r.text
        assert "not reachable" in r.json()["error"]
        health = httpx.get(f"{adapter.base_url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
    finally:
        torchserve_ready.start()
        torchserve_ready.wait_ready(240)
    r = classify(adapter.base_url, content)
    assert r.status_code == 200, r.text
    assert r.json()["prediction"] == expected
    assert httpx.get(f"{adapter.base_url}/health", timeout=10).status_code == 200
    assert adapter.process.poll() is None and adapter.process.pid == pid


# --- TorchServe's failures that a real TorchServe gives only by chance: a stand-in ------------------
# adapter/torchserve.py's TorchServeClient against a real HTTP server (aiohttp.web on a real port, in
# the test's own event loop) that answers as TorchServe 0.12 does when a worker dies (507), a key is
# refused (400 InvalidKeyException), a connection resets, or the model hangs: the pattern of
# tests/test_adapter_oip.py. The statuses and bodies are TorchServe's own.

ANSWER = {"prediction": "Aquarium fish", "label": "aquarium_fish", "index": 1, "probability": 0.9,
          "topk": [], "model_version": "w3-test", "engine": "eager-fp32"}
WORKER_DIED = {"code": 507, "type": "InternalServerException", "message": "Worker died."}
INVALID_KEY = {"code": 400, "type": "InvalidKeyException",
               "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}
CLOSING = web.AppKey("closing", asyncio.Event)  # set when the test is done: ends every hang()
READY = [{"modelName": "cifar100", "modelVersion": "w3-test", "workers": [{"id": "9000", "status": "READY"}]}]


class StandIn:
    """A TorchServe stand-in for both APIs on one real port: `predict(request, n)` answers the n-th
    prediction (from 1), `manage(request, n)` the n-th management call (default: READY). Records
    (method, path, headers) of every request."""

    def __init__(self, predict=None, manage=None):
        self.seen: list[tuple[str, str, dict]] = []
        self._predict, self._manage = predict, manage

    def predictions(self) -> list[dict]:
        return [headers for method, path, headers in self.seen if path.startswith("/predictions/")]

    async def _route(self, request):
        self.seen.append((request.method, request.path, dict(request.headers)))
        if request.path.startswith("/predictions/"):
            return await self._predict(request, len(self.predictions()))
        n = len(self.seen) - len(self.predictions())
        if self._manage is not None:
            return await self._manage(request, n)
        return web.json_response(READY)

    async def __aenter__(self):
        app = web.Application()
        app[CLOSING] = self.closing = asyncio.Event()
        self._server = stand_in_server(self._route, app)
        self.url = await self._server.__aenter__()
        return self

    async def __aexit__(self, *exc):
        self.closing.set()
        await self._server.__aexit__(*exc)

    def client(self, tmp_path, metrics=None, **settings):
        settings = {"key_file": str(tmp_path / "no-key-file.json"), **settings}
        return TorchServeClient(Settings(inference_url=self.url, management_url=self.url, **settings), metrics)


def json_answer(status: int, body):
    return web.json_response(body, status=status)


async def reset_connection(request):
    """The connection closes under the request, as when TorchServe's Netty drops it mid-answer."""
    request.transport.close()
    return web.Response()


async def hang(request) -> None:
    """A model that never answers (its workers stopped), until the test is over."""
    await request.app[CLOSING].wait()


def run_client(stand_in: StandIn, tmp_path, calls, metrics=None, **settings):
    """Start the stand-in, run `calls(client)` (a coroutine function), close both; its result."""
    async def run():
        async with stand_in:
            client = stand_in.client(tmp_path, metrics, **settings)
            try:
                return await calls(client)
            finally:
                await client.aclose()
    return asyncio.run(run())


@pytest.mark.parametrize("first", [507, 500, "reset"])
def test_a_prediction_whose_worker_died_is_sent_once_more_with_its_request_id(tmp_path, first):
    async def predict(request, n):
        if n == 1:
            if first == "reset":
                return await reset_connection(request)
            return json_answer(first, {**WORKER_DIED, "code": first})
        return json_answer(200, ANSWER)

    async def one_request(client):
        token = CURRENT.set({"request_id": "client-id-9", "model_version": None})
        try:
            return await client.predict(b"PNG")
        finally:
            CURRENT.reset(token)

    metrics = Metrics()
    stand_in = StandIn(predict)
    answer = run_client(stand_in, tmp_path, one_request, metrics)
    assert answer["label"] == "aquarium_fish"
    assert [headers.get("X-Request-ID") for headers in stand_in.predictions()] == ["client-id-9"] * 2
    assert metrics.retries.collect()[0].samples[0].value == 1


# TorchServe 0.12's 503 when its job queue is full, or no worker is up (the same words for both).
QUEUE_FULL = {"code": 503, "type": "ServiceUnavailableException",
              "message": 'Model "cifar100" has no worker to serve inference request. Please use scale workers API to add workers.'}


@pytest.mark.parametrize("status, expected", [(507, 502), (503, 503), (500, 502), (400, 400), (504, 502)])
def test_a_prediction_is_sent_at_most_twice_and_a_refusal_only_once(tmp_path, status, expected):
    async def predict(request, n):
        return json_answer(status, {507: WORKER_DIED, 503: QUEUE_FULL}.get(status, {"code": status, "message": "no"}))

    stand_in = StandIn(predict)
    with pytest.raises(ClassifyError) as err:
        run_client(stand_in, tmp_path, lambda client: client.predict(b"PNG"))
    assert err.value.status_code == expected
    # 507: the worker died -> once more. 503 (the queue full: sent again at once, it doubled the load when
    # TorchServe could least take it), 500 of another kind, 400 (the image) and 504 (TorchServe's own
    # timeout: the worker did not die, it is slow) are not sent again.
    assert len(stand_in.predictions()) == (2 if status == 507 else 1)
    if status == 503:  # a later try may pass, and the page waits for it; the words are the user's, not TorchServe's
        assert err.value.message == "The model server is busy or has no worker ready; try again shortly."
        assert err.value.headers == {"Retry-After": "1"} and err.value.relayed


def test_a_prediction_given_up_on_keeps_its_pooled_connection_while_the_model_server_holds_it(tmp_path):
    """TS_MAX_CONNECTIONS bounds what TorchServe holds from the adapter (its queue overflowed into 503s when the
    adapter let more through): a prediction the adapter stopped waiting for (504) is still queued there, so its
    connection's slot stays taken for TorchServe's responseTimeout. TS_MAX_CONNECTIONS=1: the second prediction,
    sent after the first's 504, finds no slot (503 busy) though the stand-in would answer it at once."""
    async def predict(request, n):
        await asyncio.sleep(1.5 if n == 1 else 0)
        return json_answer(200, ANSWER)

    async def one_after_another(client):
        results = []
        for _ in range(2):
            try:
                results.append(await client.predict(b"PNG"))
            except ClassifyError as err:
                results.append(err.status_code)
        return results

    stand_in = StandIn(predict)
    results = run_client(stand_in, tmp_path, one_after_another, max_connections=1, predict_timeout_s=0.5,
                         response_timeout_s=30.0)
    assert results == [504, 503], results
    assert len(stand_in.predictions()) == 1


MODEL_NOT_FOUND = {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: cifar100"}


@pytest.mark.parametrize("status, body, kind", [(503, QUEUE_FULL, "unavailable"), (404, MODEL_NOT_FOUND, "no_model")])
def test_the_model_servers_own_503_and_404_are_counted_by_kind(tmp_path, status, body, kind):
    """TorchServe's 503 (its queue full, no worker) and 404 (the model not registered, or unloaded) were in no
    adapter_model_server_errors_total kind: an outage of the model there showed on no alert. Each has its own
    kind now, among those README lists (adapter/metrics.py's MODEL_SERVER_ERROR_KINDS)."""
    async def predict(request, n):
        return json_answer(status, body)

    metrics = Metrics()
    with pytest.raises(ClassifyError) as err:
        run_client(StandIn(predict), tmp_path, lambda client: client.predict(b"PNG"), metrics)
    assert err.value.status_code == 503
    kinds = errors_by_kind(metrics)
    assert kinds == {kind: 1}
    from adapter.metrics import MODEL_SERVER_ERROR_KINDS

    assert kind in MODEL_SERVER_ERROR_KINDS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = readme.split("`adapter_model_server_errors_total{kind}`", 1)[1].split(")", 1)[0]
    assert all(f"`{name}`" in listed for name in MODEL_SERVER_ERROR_KINDS), listed


def test_the_retry_shares_the_predictions_deadline(tmp_path):
    """TS_PREDICT_TIMEOUT_S bounds a prediction and its one retry together (adapter/config.py)."""
    async def predict(request, n):
        if n == 1:
            await asyncio.sleep(1.6)  # the stand-in is slow, then its worker dies
            return json_answer(507, WORKER_DIED)
        await hang(request)  # the retry gets no answer
        return json_answer(200, ANSWER)

    async def timed(client):
        started = time.monotonic()
        try:
            await client.predict(b"PNG")
        except ClassifyError as err:
            return err, time.monotonic() - started

    err, took = run_client(StandIn(predict), tmp_path, timed, predict_timeout_s=2.0)
    assert err.status_code == 504 and "longer than 2 s" in err.message
    assert took < 3.0, took  # 2 s, not 1.6 s + another 2 s for the retry


def write_keys(path: Path, inference: str) -> None:
    path.write_text(json.dumps({"management": {"key": "m-key"}, "inference": {"key": inference},
                                "API": {"key": "api-key"}}))


def test_many_refused_keys_renew_once_and_each_request_is_answered(tmp_path):
    """The key file holds an expired key: TorchServe refuses it (400 InvalidKeyException); the first
    refused request renews it with the API key (PUT /token, which rewrites the file), the others
    read the renewed key from the file: one renewal for all, every request answered."""
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, "expired")
    valid = {"key": "fresh-1"}
    renewals = []

    async def predict(request, n):
        if request.headers.get("Authorization") != f"Bearer {valid['key']}":
            return json_answer(400, INVALID_KEY)
        return json_answer(200, ANSWER)

    async def manage(request, n):
        if request.method == "PUT" and request.path == "/token":
            assert request.headers["Authorization"] == "Bearer api-key" and request.query["type"] == "inference"
            renewals.append(request.query["type"])
            valid["key"] = f"fresh-{len(renewals)}"
            write_keys(key_file, valid["key"])
            return json_answer(200, {"message": "Token renewed"})
        return json_answer(200, READY)

    async def many(client):
        return await asyncio.gather(*(client.predict(b"PNG") for _ in range(8)))

    answers = run_client(StandIn(predict, manage), tmp_path, many, key_file=str(key_file))
    assert [a["label"] for a in answers] == ["aquarium_fish"] * 8
    assert renewals == ["inference"]


def test_a_renewed_key_is_read_even_if_the_files_time_and_size_did_not_change(tmp_path):
    """KeyFile re-reads the file when its modification time or size changes; a renewal rewrites it
    within the filesystem's timestamp granularity (coarse on some: 1-2 s) with a key as long as the
    old one, so after a renewal the file is read again regardless."""
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, "expired")
    stamp = key_file.stat()

    async def predict(request, n):
        if request.headers.get("Authorization") != "Bearer renewed":
            return json_answer(400, INVALID_KEY)
        return json_answer(200, ANSWER)

    async def manage(request, n):
        write_keys(key_file, "renewed")  # as long as "expired": same size
        os.utime(key_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # and, on a coarse clock, same time
        return json_answer(200, {"message": "Token renewed"})

    answer = run_client(StandIn(predict, manage), tmp_path, lambda client: client.predict(b"PNG"),
                        key_file=str(key_file))
    assert answer["label"] == "aquarium_fish"


def test_a_key_still_refused_after_renewal_is_503_naming_no_key(tmp_path):
    key_file = tmp_path / "key_file.json"
    write_keys(key_file, "expired")

    async def predict(request, n):
        return json_answer(400, INVALID_KEY)  # TS_KEY_FILE is not the running TorchServe's

    async def manage(request, n):
        write_keys(key_file, f"other-{n}")
        return json_answer(200, {"message": "Token renewed"})

    stand_in = StandIn(predict, manage)
    metrics = Metrics()
    with pytest.raises(ClassifyError) as err:
        run_client(stand_in, tmp_path, lambda client: client.predict(b"PNG"), metrics, key_file=str(key_file))
    assert err.value.status_code == 503 and "key" in err.value.message
    assert "expired" not in err.value.message and "other-" not in err.value.message
    assert len(stand_in.predictions()) == 2  # the refused key, then the renewed one; no more
    assert errors_by_kind(metrics) == {"key_refused": 1}  # (was in no kind: an alert on the errors saw nothing)


def test_health_callers_share_one_probe_and_one_leaving_does_not_cancel_it(tmp_path):
    """HEALTH_MAX_SILENCE_S passed: /health asks the model itself, once for all its callers at that
    moment; a caller that gives up (its client disconnected) leaves the probe to the others."""
    arrived, go = asyncio.Event(), asyncio.Event()
    status_calls, all_in = [], asyncio.Event()

    async def predict(request, n):
        arrived.set()
        await go.wait()
        return json_answer(200, ANSWER)

    async def manage(request, n):
        status_calls.append(n)
        if len(status_calls) == 5:
            all_in.set()
        await all_in.wait()  # the five /health calls see READY together, then want the probe
        return json_answer(200, READY)

    async def calls(client):
        callers = [asyncio.ensure_future(client.health()) for _ in range(5)]
        await arrived.wait()
        callers[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await callers[0]
        go.set()
        return await asyncio.gather(*callers[1:])

    stand_in = StandIn(predict, manage)
    statuses = run_client(stand_in, tmp_path, calls, health_max_silence_s=0.0)
    assert len(stand_in.predictions()) == 1
    assert all(s["workers_ready"] == 1 and s["engine"] == "eager-fp32" for s in statuses), statuses


@pytest.mark.parametrize("prediction, words", [(500, "failed (500)"), ("hang", "got no answer within 0.5 s")])
def test_health_is_503_when_the_model_does_not_answer_its_probe(tmp_path, prediction, words):
    async def predict(request, n):
        if prediction == "hang":
            await hang(request)
        return json_answer(500, {"code": 500, "message": "boom"})

    with pytest.raises(ClassifyError) as err:
        run_client(StandIn(predict), tmp_path, lambda client: client.health(), health_timeout_s=0.5)
    assert err.value.status_code == 503 and "not answering" in err.value.message and words in err.value.message


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_an_answer_whose_probability_is_not_a_number_is_a_502_bad_answer_and_fails_healths_probe(tmp_path, number):
    """Weights that overflow answered 200 {"probability": NaN, ...}: Python's json read it, and the adapter's
    own answer then failed to encode: a 500 "Internal error in the adapter" for every request while /health
    said ok. Now such an answer is a bad answer from the model server (502, counted so), and /health's
    probe fails on it."""
    text = json.dumps(ANSWER).replace('"probability": 0.9', f'"probability": {number}')
    assert number in text

    async def predict(request, n):
        return web.Response(status=200, text=text, content_type="application/json")

    metrics = Metrics()
    with pytest.raises(ClassifyError) as err:
        run_client(StandIn(predict), tmp_path, lambda client: client.predict(b"PNG"), metrics)
    assert err.value.status_code == 502 and "not JSON" in err.value.message
    kinds = errors_by_kind(metrics)
    assert kinds == {"bad_answer": 1}
    with pytest.raises(ClassifyError) as err:
        run_client(StandIn(predict), tmp_path, lambda client: client.health(), health_max_silence_s=0.0)
    assert err.value.status_code == 503 and "not answering" in err.value.message and "not JSON" in err.value.message


def test_answers_without_a_prediction_are_no_proof_for_health(tmp_path):
    """Every answer 200 JSON with no prediction (a changed handler): each /classify/ was a 502, yet each counted as
    the model answering, so /health stayed 200 for as long as they came. Now only a usable answer counts, and
    /health's probe judges its own answer by the same rule."""
    async def predict(request, n):
        return json_answer(200, {key: value for key, value in ANSWER.items() if key not in ("label", "prediction")})

    async def classify_then_health(client):
        with pytest.raises(ClassifyError) as bad:
            await client.predict(b"PNG")
        assert bad.value.status_code == 502 and "no prediction" in bad.value.message
        return await client.health()

    stand_in = StandIn(predict)
    with pytest.raises(ClassifyError) as err:
        run_client(stand_in, tmp_path, classify_then_health, health_max_silence_s=30.0)
    assert err.value.status_code == 503 and "not answering" in err.value.message, err.value.message
    assert "bad answer: The model server's answer has no prediction" in err.value.message, err.value.message
    assert len(stand_in.predictions()) == 2  # the request's, then the probe's


def test_a_taken_metrics_port_is_named_with_its_setting(tmp_path):
    """METRICS_PORT already in use: `adapter.run start` said nothing clear (the adapter's log had a bare
    OSError traceback naming neither the port nor the setting). Now start refuses at once, as for a taken
    ADAPTER_PORT, and `serve` alone exits saying which setting."""
    from serving.process import ServiceStartError, free_ports

    dead, adapter_port = free_ports(2)
    env = {**os.environ, "TS_INFERENCE_URL": f"http://127.0.0.1:{dead}", "TS_MANAGEMENT_URL": f"http://127.0.0.1:{dead}",
           "ADAPTER_LOG_DIR": str(tmp_path / "logs"), "ADAPTER_PORT": str(adapter_port)}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env["METRICS_PORT"] = str(port)
        done = subprocess.run([sys.executable, "-m", "adapter.run", "start"], env=env, capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert f"Port {port} on 127.0.0.1 is already in use" in done.stderr and "METRICS_PORT" in done.stderr, done.stderr
        assert not (tmp_path / "logs" / "adapter.pid").exists()
        with pytest.raises(ServiceStartError) as err:
            with running_adapter({key: env[key] for key in ("TS_INFERENCE_URL", "TS_MANAGEMENT_URL", "METRICS_PORT")},
                                 tmp_path / "serve.log"):
                pass
    assert f"cannot serve the metrics on 127.0.0.1:{port} (METRICS_PORT, METRICS_HOST)" in str(err.value), str(err.value)


def test_a_start_refused_for_a_bad_setting_shows_its_reason_not_the_last_runs_log(tmp_path):
    """`MAX_UPLOAD_BYTES=nan make serve-adapter`: the reason came last, under 15 of the previous run's access lines
    from logs/adapter.log (appended to run after run). Now this start's own output comes first, and no line the
    log had before it."""
    from serving.process import free_port

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "adapter.log").write_text("".join(f'{{"previous run": {i}}}\n' for i in range(40)))
    env = {**os.environ, "ADAPTER_LOG_DIR": str(logs), "ADAPTER_PORT": str(free_port()), "MAX_UPLOAD_BYTES": "nan"}
    done = subprocess.run([sys.executable, "-m", "adapter.run", "start"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 1 and "exited while starting (code 2)" in done.stderr, done.stderr
    assert "previous run" not in done.stderr, done.stderr
    reason = done.stderr.split("\n", 2)[1]  # the line under the stderr log's name
    assert "bad setting" in reason and "MAX_UPLOAD_BYTES" in reason, done.stderr


def test_ctrl_c_stops_the_foreground_adapter_quietly_with_130(tmp_path):
    """`python -m adapter.run serve` stopped with Ctrl-C shut down cleanly, then printed a KeyboardInterrupt
    traceback. Now it exits 130 (128 + SIGINT, as the other commands do) without one."""
    import signal

    from serving.process import free_ports, popen_exited, stop_popen, wait_until_ready

    dead, port = free_ports(2)
    env = {**os.environ, "TS_INFERENCE_URL": f"http://127.0.0.1:{dead}", "TS_MANAGEMENT_URL": f"http://127.0.0.1:{dead}",
           "ADAPTER_LOG_DIR": str(tmp_path / "logs")}
    command = [sys.executable, "-m", "adapter.run", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigint_as_in_a_terminal)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code in (200, 503)
            except httpx.HTTPError:
                return False
        wait_until_ready(up, 60, "The adapter", exited=popen_exited(server))
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
        assert server.returncode in stopped_by(signal.SIGINT) and "Traceback" not in err, (server.returncode, err)
    finally:
        stop_popen(server)


def test_ctrl_c_while_the_adapter_starts_stops_what_the_start_began(tmp_path):
    """`python -m adapter.run start` (make serve) interrupted while it waits for the adapter to come up printed a
    traceback and left the adapter running, its pid file written: the start now stops it, as TorchServe's does."""
    import signal

    import psutil

    from serving.process import free_ports, stop_popen

    dead, port = free_ports(2)
    logs = tmp_path / "logs"
    env = {**os.environ, "TS_INFERENCE_URL": f"http://127.0.0.1:{dead}", "TS_MANAGEMENT_URL": f"http://127.0.0.1:{dead}",
           "ADAPTER_LOG_DIR": str(logs), "ADAPTER_PORT": str(port)}
    start = subprocess.Popen([sys.executable, "-m", "adapter.run", "start"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline, spawned = time.monotonic() + 30, ""
        while not spawned.strip().isdigit() and start.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
            with contextlib.suppress(OSError):
                spawned = (logs / "adapter.pid").read_text()  # written before the wait for it to come up
        spawned = int(spawned)
        start.send_signal(signal.SIGINT)
        out, err = start.communicate(timeout=30)
    finally:
        stop_popen(start)
    assert start.returncode in stopped_by(signal.SIGINT) and "Traceback" not in err, (start.returncode, out, err)
    assert "interrupted while the adapter started" in err
    assert not psutil.pid_exists(spawned) or psutil.Process(spawned).status() == psutil.STATUS_ZOMBIE
    assert not (logs / "adapter.pid").exists()


def test_health_does_not_probe_after_a_recent_answer(tmp_path):
    async def predict(request, n):
        return json_answer(200, ANSWER)

    async def calls(client):
        await client.predict(b"PNG")
        return await client.health()

    stand_in = StandIn(predict)
    status = run_client(stand_in, tmp_path, calls, health_max_silence_s=60.0)
    assert status["workers_ready"] == 1 and status["last_answer_s_ago"] < 60
    assert len(stand_in.predictions()) == 1  # the client's own; no probe


class CountingTorchServe:
    """A TorchServe stand-in in threads of its own, reachable by an adapter process: its management API answers
    READY after ``hold_s`` (a check in flight meanwhile) and records each call; a prediction (/health's probe)
    answers ANSWER. HTTP/1.0, a connection per call: once stop()ped, nothing answers at its address."""

    def __init__(self, hold_s: float):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status_calls: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                stand_in.status_calls.append(self.path)
                time.sleep(hold_s)
                self._json(READY)

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._json(ANSWER)

            def _json(self, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_concurrent_health_calls_share_one_status_check_and_a_stopped_torchserve_shows_within_the_reuse(tmp_path):
    """A flood of GET /health from a few connections asked TorchServe's management API once per call (1.25 ms of
    the adapter's CPU and 1.9 ms of Java's each): a lone /classify/ took twice as long (review). Now the calls
    at the same moment share one check, reused for HEALTH_CACHE_S; TorchServe stopped shows within that time."""
    reuse_s, callers = 0.5, 16
    stand_in = CountingTorchServe(hold_s=0.3)
    env = {"TS_INFERENCE_URL": stand_in.url, "TS_MANAGEMENT_URL": stand_in.url, "TS_KEY_FILE": str(tmp_path / "none"),
           "HEALTH_CACHE_S": str(reuse_s)}
    try:
        with running_adapter(env, tmp_path / "adapter.log") as adapter:
            time.sleep(reuse_s)  # the start's own /health checks are not reused any more

            async def at_once():
                async with httpx.AsyncClient(base_url=adapter.base_url, timeout=30) as client:
                    return await asyncio.gather(*(client.get("/health") for _ in range(callers)))

            before = len(stand_in.status_calls)
            answers = asyncio.run(at_once())
            assert [r.status_code for r in answers] == [200] * callers, answers[0].text
            assert len(stand_in.status_calls) - before == 1, stand_in.status_calls
            stand_in.stop()
            stopped = time.monotonic()
            while (health := httpx.get(f"{adapter.base_url}/health", timeout=30)).status_code == 200:
                assert time.monotonic() - stopped < reuse_s + 1.0, "TorchServe stopped, /health still 200"
                time.sleep(0.05)
            assert health.status_code == 503 and "not reachable" in health.json()["error"], health.text
    finally:
        stand_in.stop()


def test_a_health_check_that_ended_is_reused_for_health_cache_s_its_failure_too_then_asked_again():
    """SharedCheck: the outcome of a check that ended (ok, or the 503) answers the calls within HEALTH_CACHE_S of its
    end without a new check; after that the next call checks again. HEALTH_CACHE_S=0: every call checks."""
    from adapter.health import SharedCheck

    calls = []

    async def check():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise ClassifyError(503, "The model server is not reachable.")
        return {"check": len(calls)}

    async def scenario():
        shared = SharedCheck(check, reuse_s=0.5)
        first, again = await shared(), await shared()  # the second call comes after the first check ended
        assert first == again == {"check": 1} and len(calls) == 1, calls
        await asyncio.sleep(0.6)
        for _ in range(2):  # the reuse over: checked again, and its failure reused as well
            with pytest.raises(ClassifyError):
                await shared()
        assert len(calls) == 2, calls
        await asyncio.sleep(0.6)
        assert await shared() == {"check": 3}
        uncached = SharedCheck(check, reuse_s=0.0)
        assert [await uncached(), await uncached()] == [{"check": 4}, {"check": 5}]

    asyncio.run(scenario())


def test_an_address_where_nobody_answers_the_connect_is_503_not_reachable_and_not_resent(tmp_path):
    """TS_CONNECT_TIMEOUT_S: a TCP connect left unanswered (a listener whose backlog is full drops
    the SYN, as a host that is gone does) is "not reachable" (503) at once, not "too slow" (504)
    after TS_PREDICT_TIMEOUT_S, and not sent again (nothing died under it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue (never accepted): later connects get no answer
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    metrics = Metrics()

    async def predict():
        url = f"http://127.0.0.1:{port}"
        client = TorchServeClient(Settings(inference_url=url, management_url=url, connect_timeout_s=0.3,
                                           predict_timeout_s=5.0, key_file=str(tmp_path / "none.json")), metrics)
        started = time.monotonic()
        try:
            await client.predict(b"PNG")
        except ClassifyError as err:
            return err, time.monotonic() - started
        finally:
            await client.aclose()

    try:
        err, took = asyncio.run(predict())
    finally:
        for s in (listener, *fillers):
            s.close()
    assert err.status_code == 503 and "not reachable" in err.message and f"{port}" not in err.message
    assert took < 3.0, took
    assert metrics.retries.collect()[0].samples[0].value == 0
    kinds = errors_by_kind(metrics)
    assert kinds == {"unreachable": 1}


@pytest.mark.parametrize("status, body, words", [
    (200, [{"modelVersion": "w3-test", "workers": [{"status": "UNLOADING"}, {"status": "FAILED"}]}],
     "no worker ready yet (2 starting or failed)"),
    (404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: cifar100"}, "not registered"),
    (500, {"code": 500, "message": "management API broke"}, "status check failed: management API broke"),
    (200, {"not": "a list"}, "unreadable"),
])
def test_health_is_503_unless_a_worker_is_ready(tmp_path, status, body, words):
    async def manage(request, n):
        return json_answer(status, body)

    with pytest.raises(ClassifyError) as err:
        run_client(StandIn(manage=manage), tmp_path, lambda client: client.health())
    assert err.value.status_code == 503 and words in err.value.message, err.value.message


def test_no_pooled_connection_free_within_the_deadline_is_503_busy(tmp_path):
    """TS_MAX_CONNECTIONS=1, TorchServe answering in 0.7 s, three predictions at once, a 1 s deadline:
    the first is answered, the second gets the connection at 0.7 s and is too slow (504), the third
    is still waiting for a connection at 1 s: 503 "busy" (try again), as the module's table says,
    counted as busy."""
    from adapter.metrics import Metrics

    async def predict(request, n):
        await asyncio.sleep(0.7)
        return json_answer(200, ANSWER)

    async def three(client):
        return await asyncio.gather(*(client.predict(b"PNG") for _ in range(3)), return_exceptions=True)

    metrics = Metrics()
    results = run_client(StandIn(predict), tmp_path, three, metrics, max_connections=1, predict_timeout_s=1.0)
    assert isinstance(results[0], dict), results
    assert [(r.status_code, "busy" in r.message) for r in results[1:]] == [(504, False), (503, True)], results
    assert results[2].headers == {"Retry-After": "1"}  # slow, not down: a later try may pass
    kinds = errors_by_kind(metrics)
    assert kinds == {"timeout": 1, "busy": 1}


def test_the_adapters_answer_keeps_unsure_and_the_first_top_k_in_order():
    # classify_answer's own test (only a browser and a real TorchServe reached it): the handler's
    # "unsure" is passed on, and of a longer top-k the first TOP_K, in the handler's order.
    from adapter.app import TOP_K, classify_answer

    topk = [{"label": f"class_{i}", "name": f"Class {i}", "index": i, "probability": round(0.5 / (i + 1), 6)}
            for i in range(TOP_K + 2)]
    answer = {"prediction": "Class 0", "label": "class_0", "index": 0, "probability": 0.5, "topk": topk,
              "unsure": True, "model_version": "w3-test"}
    shaped = classify_answer(answer, time.perf_counter())
    assert list(shaped)[0] == "prediction" and shaped["unsure"] is True
    assert shaped["top5"] == topk[:TOP_K]
    assert classify_answer({**answer, "unsure": False}, time.perf_counter())["unsure"] is False
    # An answer with labels only (no display names: a handler older than them) gets them by the seed's rule.
    bare = classify_answer({"label": "aquarium_fish", "index": 1, "probability": 0.9,
                            "topk": [{"label": "aquarium_fish", "index": 1, "probability": 0.9},
                                     {"label": "sweet_pepper", "index": 83, "probability": 0.1}]}, time.perf_counter())
    assert bare["prediction"] == "Aquarium fish"
    assert [item["name"] for item in bare["top5"]] == ["Aquarium fish", "Sweet pepper"]


@pytest.mark.parametrize("server", ["torchserve", "oip"])
def test_a_refused_connect_is_503_not_reachable_and_not_resent(tmp_path, server):
    """A connect refused (nothing listens: the model server stopped or restarting) was sent once more, with a
    "retrying a prediction once" warning and adapter_model_server_retries_total counting it as if a worker had
    died or a connection dropped mid-answer: a refusal is answered 503 at once, and nothing is counted."""
    from adapter.oip import OIPClient
    from serving.process import free_port

    port = free_port()  # nothing listens there
    metrics = Metrics()
    url = f"http://127.0.0.1:{port}"

    async def predict():
        settings = Settings(inference_url=url, management_url=url, oip_url=url if server == "oip" else None,
                            key_file=str(tmp_path / "none.json"))
        client = (OIPClient if server == "oip" else TorchServeClient)(settings, metrics)
        try:
            await client.predict(b"PNG")
        except ClassifyError as err:
            return err
        finally:
            await client.aclose()

    err = asyncio.run(predict())
    assert err.status_code == 503 and "not reachable" in err.message
    assert metrics.retries.collect()[0].samples[0].value == 0
