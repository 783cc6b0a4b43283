"""The /classify/ adapter as a real uvicorn process in front of the session's real TorchServe.

Checks the seed's contract on real CIFAR-100 test images (against TorchServe's own answer), every
error status, the upload limit acting while the body streams in, key rotation and renewal, and
TorchServe stopped and restarted under a running adapter.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from adapter.run import running_adapter
from model.classes import display_name

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
    ({"content": b'{"image": "x"}', "headers": {"content-type": "application/json"}}, "multipart/form-data"),
    ({"data": {"image": "just text"}}, "multipart/form-data"),  # a urlencoded form
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, ""),
], ids=["no-image-field", "empty-file", "json-body", "urlencoded", "malformed-multipart"])
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
    """A refused image in the same TorchServe batch must not fail the good ones beside it."""
    expected = {content: direct_prediction(torchserve_ready, content)["prediction"] for content, _ in images}

    async def run():
        async with httpx.AsyncClient(base_url=adapter.base_url, timeout=60) as client:
            good = [client.post("/classify/", files={"image": ("p.png", c, "image/png")}) for c in expected]
            bad = [client.post("/classify/", files={"image": ("t.txt", b"not an image %d" % i, "text/plain")})
                   for i in range(8)]
            return await asyncio.gather(*good, *bad)

    answers = asyncio.run(run())
    for content, r in zip(expected, answers[:8]):
        assert r.status_code == 200 and r.json()["prediction"] == expected[content]
    assert all(r.status_code == 400 and "error" in r.json() for r in answers[8:])


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
    assert json.loads(body) == {"error": "The image is too large: the limit is 10.0 MB."}


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
    r = classify(tight_adapter.base_url, os.urandom(20001))
    assert r.status_code == 413 and r.json() == {"error": "The image is too large: the limit is 20 KB."}


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
    assert torchserve_ready.key_file.load().inference != old
    r = classify(adapter.base_url, content)
    assert r.status_code == 200, r.text


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
