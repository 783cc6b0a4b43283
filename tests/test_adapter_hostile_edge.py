"""Hostile clients at the adapter's edge that need no model: a real adapter process (in front of no
TorchServe at all) over real sockets, with short deadlines through its settings.

    many tiny multipart parts   -> 400 at MAX_FORM_PARTS (the parser runs on the event loop)
    a header line that never ends -> 431 as soon as the head passes MAX_HEADER_BYTES
    blank lines only            -> closed at KEEPALIVE_TIMEOUT_S, like a silent connection
    WebSocket / CONNECT / Upgrade with a body -> 501 JSON; another Upgrade is ignored
    POST /explain (no slash)    -> the explanation route, as /classify
    answers never read          -> reset after SEND_TIMEOUT_S; no traceback in the log
    uploads queued to be shrunk -> 503 + Retry-After after SHRINK_WAIT_S
    near-matches of the boundary -> 400 on the delimiter count; a boundary over 70 characters -> 400
    a trailer line that never ends, a huge chunk extension -> 431 (its answer read: a lingering close)
    an upload in 64-byte chunks sent at once -> read whole; in 8-byte chunks (under 48 bytes on average) -> 431
    a client that half-closes after its request -> still gets its answer
    HEAD on every GET route    -> 200
    POST to a page's path       -> 405 at once, the connection closed (its body unread)
    refused uploads whose clients reset -> nothing of them kept (in-process, to count the connections)
    an upload past MAX_REQUESTS_IN_FLIGHT / MAX_CLIENT_REQUESTS_IN_FLIGHT -> 503 + Retry-After (RETRY_AFTER_S), {"error"}
    an image of exactly MAX_UPLOAD_BYTES -> read; one byte more -> 413 {"error"}
    two `image` fields -> 400; an empty image file -> 400 "empty"
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import random
import re
import socket
import struct
import threading
import time
import weakref

import httpx
import pytest
import uvicorn
from PIL import Image

from adapter import protocol
from adapter.app import create_app
from adapter.config import Settings
from adapter.protocol import HEAD_SLACK_BYTES
from adapter.run import running_adapter
from serving.process import free_port
from serving.settings import MAX_UPLOAD_BYTES
from test_adapter_edge import samples
from test_hostile import multipart_head

KEEPALIVE_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 6.0
SEND_TIMEOUT_S = 1.0
SHRINK_WAIT_S = 0.2
MAX_FORM_PARTS = 16
MAX_HEADER_BYTES = 16384  # the default
# How late a deadline may fire on a loaded 2-core machine.
LATE_S = 4.0


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    dead = f"http://127.0.0.1:{free_port()}"  # no model server: every path here is refused before it
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_TIMEOUT_S),
           "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
           "SHRINK_WORKERS": "1", "SHRINK_WAIT_S": str(SHRINK_WAIT_S),
           "MAX_PIPELINED_REQUESTS": "2000"}  # the send-timeout test pipelines 1,500 (the bound's own test: its default)
    with running_adapter(env, tmp_path_factory.mktemp("hostile-edge") / "adapter.log") as proc:
        proc.port = int(proc.base_url.rsplit(":", 1)[1])
        yield proc


def connect(port: int, timeout: float = 30.0, source: str | None = None) -> socket.socket:
    """A connection to the adapter, from ``source`` (a loopback address: another client's share) if given."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def exchange(port: int, data: bytes, source: str | None = None) -> bytes:
    with connect(port, source=source) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def status_and_json(response: bytes) -> tuple[int, dict, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body) if body else {}


def form_request(port: int, body: bytes, path: str = "/classify/") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def image_part(data: bytes, name: str = "image") -> bytes:
    return (f'--xx\r\nContent-Disposition: form-data; name="{name}"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"


TINY_PART = b"--xx\r\nA:b\r\n\r\nz\r\n"


def test_a_form_of_many_tiny_parts_is_refused_at_max_form_parts(edge):
    small = png((4, 4))
    # A form with a few fields beside the image (curl -F ... -F ...) is read: 503, the model server is absent.
    few = b"".join(image_part(b"v", name=f"field{i}") for i in range(3)) + image_part(small) + b"--xx--\r\n"
    status, _, answer = status_and_json(exchange(edge.port, form_request(edge.port, few)))
    assert status == 503, answer
    # One part more than the limit, the image last: refused at the part, before the image is reached.
    many = TINY_PART * MAX_FORM_PARTS + image_part(small) + b"--xx--\r\n"
    status, _, answer = status_and_json(exchange(edge.port, form_request(edge.port, many)))
    assert status == 400 and f"too many parts: the limit is {MAX_FORM_PARTS}" in answer["error"], answer
    # 10 MB of them (seconds of the event loop's CPU when parsed in full): refused at once.
    flood = TINY_PART * ((10 * 1024 * 1024 - 100) // len(TINY_PART))
    started = time.monotonic()
    status, _, answer = status_and_json(exchange(edge.port, form_request(edge.port, flood, "/explain/")))
    assert status == 400 and "too many parts" in answer["error"], answer
    assert time.monotonic() - started < 3.0


def test_near_matches_of_the_boundary_and_overlong_boundaries_are_refused_at_once(edge):
    # "\r\n--xxX" repeated: a whole delimiter, then a byte that starts no part. No part is ever begun,
    # but python-multipart spent ~0.8 s of the event loop's CPU per MB on them.
    flood = image_part(b"")[:-2] + b"\r\n--xxX" * ((10 * 1024 * 1024 - 200) // 7)
    started = time.monotonic()
    status, _, answer = status_and_json(exchange(edge.port, form_request(edge.port, flood)))
    assert status == 400 and "too many parts" in answer["error"], answer
    assert time.monotonic() - started < 3.0
    # A boundary of 71 characters (RFC 2046 allows 70; python-multipart failed with a 500 past 256).
    for length, expected in ((70, 503), (71, 400), (300, 400)):
        boundary = "b" * length
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n").encode() \
            + png((4, 4)) + f"\r\n--{boundary}--\r\n".encode()
        request = (f"POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}"
                   f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        status, _, answer = status_and_json(exchange(edge.port, request))
        assert status == expected, (length, answer)
        if expected == 400:
            assert f"boundary is {length} characters long" in answer["error"]


def access_lines(edge, request_id: str) -> list[dict]:
    """The adapter's access log lines (JSON) of one request id."""
    return [line for line in map(json.loads, (text for text in edge.log_file.read_text().splitlines()
                                              if text.startswith("{"))) if line.get("request_id") == request_id]


def test_trailers_and_chunk_lines_past_the_head_limit_get_431(edge):
    head = (b"POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = image_part(png((4, 4))) + b"--xx--\r\n"
    chunk = f"{len(part):x}\r\n".encode() + part + b"\r\n"
    # A trailer line that never ends, sent in pieces (httptools appended each piece to the value:
    # quadratic CPU on the event loop, every client's answers frozen until the body deadline).
    for i, ending in enumerate((b"0\r\nX-Trailer: ", b"5;ext=")):
        request_id = f"framing-{i}"
        with connect(edge.port, timeout=10) as sock:
            sock.sendall(head.replace(b"Host: x", f"Host: x\r\nX-Request-ID: {request_id}".encode()) + chunk + ending)
            try:
                for _ in range(MAX_HEADER_BYTES // 2048 + 2):
                    sock.sendall(b"a" * 2048)
                    time.sleep(0.02)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused while still sending
            status, headers, answer = status_and_json(read_until_closed(sock))
        assert status == 431 and "chunk lines or trailers are too large" in answer["error"], (ending, answer)
        # One record, the request's: its route and id (it was counted twice: "other" 431 under a new id, and 499).
        assert headers["x-request-id"] == request_id, headers
        deadline = time.monotonic() + LATE_S
        while not access_lines(edge, request_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        assert [(line["route"], line["status"]) for line in access_lines(edge, request_id)] == [("/classify/", 431)]
    # Small trailers are read as before: the upload reaches the model server (absent: 503).
    status, _, _ = status_and_json(exchange(edge.port, head + chunk + b"0\r\nX-Trailer: ok\r\n\r\n"))
    assert status == 503


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
                    for piece in (body[i:i + size] for i in range(0, len(body), size))) + b"0\r\n\r\n"


def test_an_upload_in_small_chunks_sent_at_once_is_read_whatever_the_reads(edge):
    """The framing limit is per gap between two pieces of body, not per socket read: 10 MB in 64-byte chunks
    (a chunk line per 64 bytes, 10s of KB of them in one read) was refused 431 and reset."""
    noise = Image.frombytes("RGB", (1800, 1800), random.Random(0).randbytes(1800 * 1800 * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    part = image_part(buf.getvalue()) + b"--xx--\r\n"
    assert 9_000_000 < len(part) < MAX_UPLOAD_BYTES
    head = ("POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    status, _, answer = status_and_json(exchange(edge.port, head + chunked(part, 64)))
    assert status == 503 and "not reachable" in answer["error"], answer  # read whole: on to the (absent) model server
    # 8-byte chunks (a parser callback per 8 bytes): under 48 bytes on average, 431.
    status, _, answer = status_and_json(exchange(edge.port, head + chunked(part[:300_000], 8)))
    assert status == 431 and "chunks must hold 48 bytes on average" in answer["error"], answer
    # Chunks whose framing looks like body (the chunk lines' bytes were found in the body to count them): counted.
    status, _, answer = status_and_json(exchange(edge.port, head + chunked(b"\r" * 100_000, 1)))
    assert status == 431 and "chunks must hold 48 bytes on average" in answer["error"], answer


def test_a_chunked_body_is_refused_413_once_its_count_passes_the_body_limit_not_before(edge):
    """No Content-Length: the body is counted as it arrives, and refused as soon as it passes MAX_UPLOAD_BYTES +
    FORM_OVERHEAD_BYTES, whatever its parts (here one field that is no image, which the parser skips and never
    holds): one byte more than the limit is 413; a body of exactly the limit is read whole (400: no image)."""
    from adapter.upload import upload_body_limit

    limit = upload_body_limit(MAX_UPLOAD_BYTES)
    head = ("POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()

    def body(size: int) -> bytes:
        part, end = b'--xx\r\nContent-Disposition: form-data; name="note"\r\n\r\n', b"\r\n--xx--\r\n"
        return part + b"n" * (size - len(part) - len(end)) + end

    status, _, answer = status_and_json(exchange(edge.port, head + chunked(body(limit + 1), 1 << 20)))
    assert status == 413 and "too large" in answer["error"], answer
    status, _, answer = status_and_json(exchange(edge.port, head + chunked(body(limit), 1 << 20)))
    assert status == 400 and "No image uploaded" in answer["error"], answer


@pytest.mark.parametrize("pause", [False, True], ids=["at-once", "after-the-head"])
def test_a_huge_chunk_extension_between_pieces_of_body_gets_431_and_its_answer_survives(edge, pause):
    """With body on both sides and more body after it, sent at once (the read that held the head was not counted)
    or after the head: 431 JSON, read by the client (a lingering close: closing at once with the body unread
    reset the connection and destroyed the answer)."""
    head = (b"POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            b"X-Request-ID: huge-extension\r\nTransfer-Encoding: chunked\r\n\r\n")
    extension = b"5;ext=" + b"a" * (MAX_HEADER_BYTES + HEAD_SLACK_BYTES + 1) + b"\r\n"
    data = head + b"d\r\n--xx\r\nA:b\r\n\r\n\r\n" + extension + b"zzzzz\r\n" + chunked(b"z" * 1_000_000, 4096)
    split = data.index(extension) if pause else 0
    with connect(edge.port, timeout=10) as sock:
        try:
            sock.sendall(data[:split])
            time.sleep(0.2 if pause else 0)
            sock.sendall(data[split:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while still sending
        status, headers, answer = status_and_json(read_until_closed(sock))
    assert status == 431 and "chunk lines or trailers are too large" in answer["error"], answer
    assert headers["x-request-id"] == "huge-extension", headers


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    form_request(0, image_part(png((4, 4))) + b"--xx--\r\n"),
], ids=["health", "classify"])
def test_a_client_that_half_closes_after_its_request_gets_its_answer(edge, request_bytes):
    # shutdown(SHUT_WR) after the request (nc -N, socat): the connection was closed at the FIN and the
    # answer, already computed, lost.
    with connect(edge.port, timeout=10) as sock:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        response = read_until_closed(sock)
    status, _, answer = status_and_json(response)
    assert status == 503 and "error" in answer, response[:300]  # the model server is absent
    assert time.monotonic() - started < LATE_S  # closed after the answer, not at KEEPALIVE_TIMEOUT_S


@pytest.mark.parametrize("path", ["/classes", "/health"])
def test_a_refusal_of_a_later_request_waits_for_the_earlier_answer(edge, path):
    # A request, then bytes that are no request in the same packet (an upload whose Content-Length fell
    # short leaves such bytes): the 400 and its close were written at once, destroying the earlier answer.
    response = exchange(edge.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + b"\x00junk\r\n\r\n")
    assert response.count(b"HTTP/1.1 ") == 2, response[:400]
    first, _, second = response.partition(b"HTTP/1.1 400")
    assert first.startswith(b"HTTP/1.1 200" if path == "/classes" else b"HTTP/1.1 503"), response[:400]
    assert b"not valid HTTP" in second


def test_a_post_to_a_path_that_takes_none_is_answered_at_once_and_closed_without_its_body(edge):
    """Refused before the POST's body was read (the page's files take GET and HEAD only: 405), the connection is
    closed (adapter/limits.py): neither waiting for the 10 MB the client promised nor reading them as its next
    request."""
    started = time.monotonic()
    response = exchange(edge.port, b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                                   b"Content-Length: 10000000\r\n\r\n" + b"x" * 1000)
    status, headers, body = status_and_json(response)
    assert (status, body) == (405, {"error": "Method POST is not allowed on /nope."}), response[:400]
    assert headers.get("allow") == "GET, HEAD", response[:400]
    assert headers.get("connection") == "close" and response.count(b"HTTP/1.1 ") == 1, response[:400]
    assert time.monotonic() - started < LATE_S  # closed after the answer, not when a body deadline fired


@pytest.mark.parametrize("path", ["/classes", "/settings", "/metrics", "/health", "/"])
def test_head_is_answered_on_every_get_route(edge, path):
    get = exchange(edge.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head = exchange(edge.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert head.split(b"\r\n", 1)[0] == get.split(b"\r\n", 1)[0], (head[:200], get[:200])
    assert head.endswith(b"\r\n\r\n")  # no body


def test_a_header_line_that_never_ends_gets_431_once_the_head_passes_the_limit(edge):
    # In pieces, the line never finished: httptools holds the value until the next header starts.
    with connect(edge.port) as sock:
        sock.sendall(b"GET /classes HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(MAX_HEADER_BYTES // 2048 + 2):
            sock.sendall(b"a" * 2048)
            time.sleep(0.05)
        started = time.monotonic()
        response = read_until_closed(sock)
    status, _, answer = status_and_json(response)
    assert status == 431 and "headers are too large" in answer["error"], response[:300]
    assert time.monotonic() - started < LATE_S  # not HEADER_TIMEOUT_S's 408
    # In one piece, 64 KB and no line end.
    with connect(edge.port) as sock:
        sock.sendall(b"GET /classes HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536)
        status, _, _ = status_and_json(read_until_closed(sock))
    assert status == 431
    # A head just under the limit is served, alone and behind another request in the same packet.
    near = b"GET /settings HTTP/1.1\r\nHost: x\r\nX-Near: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    response = exchange(edge.port, b"GET /settings HTTP/1.1\r\nHost: x\r\n\r\n" + near + b"Connection: close\r\n\r\n")
    assert response.count(b"HTTP/1.1 200 OK") == 2, response[:300]
    assert exchange(edge.port, near + b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
    # A complete head 200 bytes over the limit as counted (URL + each header's name and value + 4), its raw
    # bytes still under the raw check's slack (HEAD_SLACK_BYTES): the counted limit refuses it.
    over = b"X-Over: " + b"a" * (MAX_HEADER_BYTES + 200 - len("/settings") - len("Host" "x") - 8 - len("X-Over"))
    head = b"GET /settings HTTP/1.1\r\nHost: x\r\n" + over + b"\r\n\r\n"
    assert len(head) < MAX_HEADER_BYTES + HEAD_SLACK_BYTES
    status, _, answer = status_and_json(exchange(edge.port, head))
    assert status == 431 and "headers are too large" in answer["error"], answer


@pytest.mark.parametrize("after_a_request", [False, True], ids=["fresh", "kept-alive"])
def test_blank_lines_do_not_keep_a_connection_open(edge, after_a_request):
    with connect(edge.port, timeout=LATE_S) as sock:
        started = time.monotonic()
        if after_a_request:
            sock.sendall(b"GET /settings HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # A blank line every fifth of the timeout: a timer restarted by each byte would never fire.
        sock.settimeout(KEEPALIVE_TIMEOUT_S / 5)
        closed = False
        while time.monotonic() - started < KEEPALIVE_TIMEOUT_S + LATE_S:
            try:
                sock.sendall(b"\r\n")  # begins no request
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed, "a connection sending only blank lines is still open"
        assert time.monotonic() - started >= KEEPALIVE_TIMEOUT_S - 0.1


WEBSOCKET = (b"GET /classes HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("request_bytes, words", [
    (WEBSOCKET, "WebSocket is not supported"),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "CONNECT is not supported"),
    # httptools never reads the body of an upgrade request: it cannot be answered
    (b"POST /classify/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
     b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
     b"Content-Length: 6\r\n\r\n--xx--", "Upgrade: h2c"),
], ids=["websocket", "connect", "h2c-with-body"])
def test_protocol_switches_get_501_json_and_are_closed(edge, request_bytes, words):
    started = time.monotonic()
    status, headers, answer = status_and_json(exchange(edge.port, request_bytes))
    assert status == 501 and words in answer["error"] and set(answer) == {"error"}, answer
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert time.monotonic() - started < LATE_S


def test_another_upgrade_without_a_body_is_ignored_and_answered_in_http_1_1(edge):
    # curl --http2 on http:// asks for h2c; the request, and the one after it, are answered as HTTP/1.1.
    response = exchange(edge.port, b"GET /settings HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
                                   b"GET /settings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.count(b"HTTP/1.1 200 OK") == 2 and response.count(b"max_upload_bytes") == 2, response[:500]


def test_post_explain_without_the_slash_is_the_explanation_route(edge):
    request = b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    status, _, answer = status_and_json(exchange(edge.port, request))
    assert status == 400 and "multipart/form-data" in answer["error"], answer  # the route's, not a 405
    status, headers, answer = status_and_json(
        exchange(edge.port, b"GET /explain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 405 and headers["allow"] == "POST", (status, headers, answer)


def test_a_client_that_reads_none_of_its_answers_is_reset_after_send_timeout(edge):
    count = 1500  # ~7 MB of answers: more than the kernel's buffers hold
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", edge.port))
        sock.sendall(b"GET /classes HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        time.sleep(SEND_TIMEOUT_S + 2.0)  # reads nothing meanwhile
        answered, reset = 0, False
        try:
            while chunk := sock.recv(1 << 20):
                answered += chunk.count(b"HTTP/1.1 200 OK")
        except ConnectionResetError:
            reset = True
        except socket.timeout:
            pass
    assert reset or answered < count, f"all {count} answers waited for a client that read none"
    log = edge.log_file.read_text()
    assert "SEND_TIMEOUT_S" in log
    # Answers to a connection that is gone are dropped, not an error with a traceback.
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def test_uploads_waiting_to_be_shrunk_get_503_busy_after_shrink_wait(edge):
    # 16 MP each (a second or so to decode): with one shrinking thread, the later ones wait past SHRINK_WAIT_S.
    body = image_part(png((4000, 3999), "RGBA")) + b"--xx--\r\n"
    results = []

    def upload(i: int) -> None:
        with socket.socket() as sock:
            sock.settimeout(60)
            sock.bind((f"127.0.0.{2 + i % 4}", 0))  # several addresses: no client share is reached first
            sock.connect(("127.0.0.1", edge.port))
            sock.sendall(form_request(edge.port, body))
            results.append(status_and_json(read_until_closed(sock)))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    busy = [(status, headers, answer) for status, headers, answer in results if "busy shrinking" in answer["error"]]
    assert len(results) == 6 and busy, results
    assert all(status == 503 and headers.get("retry-after") == "1" for status, headers, _ in busy), busy
    counted = samples(httpx.get(f"{edge.base_url}/metrics", timeout=10).text)
    assert counted[("adapter_busy_refusals_total", (("cap", "shrink_wait"),))] == len(busy)  # by its cap


def test_a_refused_upload_whose_client_resets_leaves_nothing_behind(monkeypatch):
    """After an answer sent before the body (here 503: past its address's share of requests), the lingering
    close's timers and uvicorn's keep-alive timer held the whole connection (protocol, transport, request)
    until they fired, up to LINGER_MAX_S after its client reset it: ~100 MB while one address drew thousands
    of refusals a second. In-process (a real uvicorn on a real socket) to count what is left; the timers are
    set past the test's wait, so that only cancelling them frees the connections in time."""
    monkeypatch.setattr(protocol, "LINGER_CHECK_S", 60.0)
    monkeypatch.setattr(protocol, "LINGER_MAX_S", 60.0)

    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead, max_client_requests_in_flight=1, min_rate_grace_s=60,
                        body_timeout_s=60, keepalive_timeout_s=60)
    connections = weakref.WeakSet()

    def counted(protocol_class):
        class CountedProtocol(protocol_class):
            def connection_made(self, transport) -> None:
                connections.add(self)
                super().connection_made(transport)
        return CountedProtocol

    with in_process_adapter(settings, counted) as port:
        def connections_alive() -> int:
            gc.collect()
            return len(connections)

        def reset(sock: socket.socket) -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        holder = connect(port)  # the address's one request: its body never comes
        holder.sendall(multipart_head(port, 100_000) + b"--xx\r\n")
        time.sleep(0.5)
        for _ in range(20):
            sock = connect(port)
            sock.sendall(multipart_head(port, 100_000) + b"--xx\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 503"), "expected the early 503"
            reset(sock)
        reset(holder)
        started = time.monotonic()
        while connections_alive() and time.monotonic() - started < 10:
            time.sleep(0.1)
        assert connections_alive() == 0, f"connections' objects still held {time.monotonic() - started:.1f} s on"


def test_a_refused_body_still_arriving_is_dropped_for_at_most_linger_max_s(monkeypatch):
    """A body refused on its declared length (413) is read and dropped until it ends, for at most
    BODY_TIMEOUT_S and LINGER_MAX_S: a client pushing it at a good rate is cut at the shorter of the two."""
    monkeypatch.setattr(protocol, "LINGER_MAX_S", 2.0)
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead, body_timeout_s=60)
    with in_process_adapter(settings) as port, connect(port, timeout=LATE_S) as sock:
        sock.sendall(multipart_head(port, 100 * 1024 * 1024))
        assert sock.recv(65536).startswith(b"HTTP/1.1 413"), "expected the 413 on the declared length"
        # The answer is followed by a FIN (the server's half of the connection), the body still read: the
        # end of the linger is the reset that meets the next send.
        started, chunk = time.monotonic(), b"x" * (64 * 1024)  # 640 KB/s: far above MIN_UPLOAD_RATE
        closed = False
        while not closed and time.monotonic() - started < protocol.LINGER_MAX_S + LATE_S:
            try:
                sock.sendall(chunk)
                time.sleep(0.1)
            except OSError:  # reset
                closed = True
        took = time.monotonic() - started
    assert closed, f"a refused body was still taken {took:.1f} s on (LINGER_MAX_S {protocol.LINGER_MAX_S} s)"
    assert took >= protocol.LINGER_MAX_S - 0.5, f"cut after {took:.1f} s although it arrived at a good rate"


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline_an_idle_kept_alive_one_is_not():
    """A connection that had sent nothing since it opened was kept for the keep-alive time (65 s on KServe's
    predictor, which shares this edge), one that sent a single byte of a head was closed at HEADER_TIMEOUT_S: 4-5
    addresses of silent sockets held MAX_OPEN_CONNECTIONS for the whole keep-alive time, every other client (and a
    liveness probe) reset meanwhile. Now a silent connection is closed at HEADER_TIMEOUT_S (or the keep-alive time,
    if shorter), as a head that trickles is; a connection idle between requests keeps the keep-alive time."""
    dead = f"http://127.0.0.1:{free_port()}"
    header_s, keepalive_s = 1.0, 5.0
    settings = Settings(inference_url=dead, management_url=dead, header_timeout_s=header_s,
                        keepalive_timeout_s=keepalive_s)
    with in_process_adapter(settings) as port, connect(port, timeout=LATE_S) as silent, \
            connect(port, timeout=LATE_S) as kept:
        started = time.monotonic()
        kept.sendall(b"GET /settings HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        silent.settimeout(header_s + LATE_S)
        assert silent.recv(65536) == b"", "a silent connection was answered"
        silent_s = time.monotonic() - started
        time.sleep(max(0.0, answered + header_s + 1.0 - time.monotonic()))
        kept.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, nothing sent: idle between requests is not silent
            kept.recv(65536)
        kept.settimeout(keepalive_s + LATE_S)
        assert kept.recv(65536) == b""
        kept_s = time.monotonic() - answered
    assert header_s - 0.1 <= silent_s < header_s + LATE_S / 2, f"a silent connection closed after {silent_s:.1f} s"
    # (from the client's reading of its answer: the server armed its timer as it sent it, a little earlier)
    assert keepalive_s - 0.5 <= kept_s < keepalive_s + LATE_S, f"an idle kept-alive one closed after {kept_s:.1f} s"


@contextlib.contextmanager
def in_process_adapter(settings: Settings, wrap_protocol=lambda protocol_class: protocol_class):
    """The app and its protocol in a real uvicorn on a real loopback socket, in this process (to patch the
    protocol's constants or look at its objects); yields the port."""
    app = create_app(settings)
    http = wrap_protocol(protocol.protocol_class(settings, app.state.refused_before_app))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           timeout_keep_alive=settings.keepalive_timeout_s, http=http, ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process adapter did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_connection_pipelining_more_than_the_bound_gets_429_after_the_earlier_answers():
    """uvicorn queued every pipelined request a connection sent (each holding its cycle and scope until answered,
    each answer letting the next 256 KB of heads in): 150,000 tiny GETs took the adapter from 71 to 431 MB. At most
    MAX_PIPELINED_REQUESTS wait behind the one being answered; the next is answered 429 after them, and the
    connection closed."""
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead)
    bound = settings.max_pipelined_requests
    assert bound == 16  # the default README states
    with in_process_adapter(settings) as port:
        answers = exchange(port, b"GET /settings HTTP/1.1\r\nHost: x\r\n\r\n" * 100).split(b"HTTP/1.1 ")[1:]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert [a[:3] for a in answers] == [b"200"] * (1 + bound) + [b"429"], [a[:3] for a in answers]
    status, headers, answer = status_and_json(b"HTTP/1.1 " + answers[-1])
    assert "Too many pipelined requests: at most 16" in answer["error"] and headers["connection"] == "close", answer
    assert 'adapter_refusals_total{reason="pipelined"} 1.0' in metrics


def test_no_room_for_a_body_that_arrives_in_one_piece_is_503_with_retry_after():
    """A body refused for room when its last (here: only) piece arrives was answered 503 without Retry-After, so
    the page did not retry and adapter_refusals_total{reason="busy"} did not count it. X is admitted on its head;
    Y's healthy upload then takes the room X's 40 KB would need; X's body, one piece, finds none."""
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead, max_upload_bytes=100_000,
                        max_bytes_in_flight=200_000, max_client_bytes_in_flight=200_000)

    def upload(port: int, source: str, size: int) -> tuple[socket.socket, bytes]:
        sock = socket.socket()
        sock.bind((source, 0))  # two addresses: two clients' shares
        sock.settimeout(LATE_S)
        sock.connect(("127.0.0.1", port))
        body = image_part(b"\x89PNG" + b"x" * size) + b"--xx--\r\n"
        return sock, form_request(port, body)

    with in_process_adapter(settings) as port:
        x, x_request = upload(port, "127.0.0.2", 40_000)
        head, _, x_body = x_request.partition(b"\r\n\r\n")
        x.sendall(head + b"\r\n\r\n")
        time.sleep(0.3)
        y, y_request = upload(port, "127.0.0.3", 160_000)
        y_head, _, y_body = y_request.partition(b"\r\n\r\n")
        y.sendall(y_head + b"\r\n\r\n" + y_body[:65536])
        time.sleep(0.3)
        x.sendall(x_body)
        status, headers, answer = status_and_json(read_until_closed_or_answered(x))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        x.close(), y.close()
    assert status == 503 and "busy" in answer["error"], (status, answer)
    assert headers.get("retry-after") == "1", headers
    assert 'adapter_refusals_total{reason="busy"} 1.0' in metrics


def read_until_closed_or_answered(sock: socket.socket) -> bytes:
    """The bytes of one answer with a Content-Length (the connection may stay open after it)."""
    out = b""
    while b"\r\n\r\n" not in out:
        out += sock.recv(65536)
    head, _, body = out.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


# --- the admission caps, the upload's own limits and its form: fast, with no model server -----------------------

def requests_in_flight(port: int) -> float:
    """The adapter's count of requests with a body held now (the count MAX_REQUESTS_IN_FLIGHT decides on)."""
    return samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)[("adapter_requests_in_flight", ())]


@contextlib.contextmanager
def holding_a_place(port: int, source: str):
    """An upload from ``source`` admitted and held (its body never ends) until the block ends: one place among the
    requests in flight, in all and in that address's share. Its admission is waited for on the gauge, not a sleep."""
    before = requests_in_flight(port)
    with connect(port, source=source) as holder:
        holder.sendall(multipart_head(port, 100_000) + b"--xx\r\n")
        deadline = time.monotonic() + 10
        while requests_in_flight(port) < before + 1:
            assert time.monotonic() < deadline, "the holding upload was never admitted"
            time.sleep(0.02)
        yield


def sent_on(answer: tuple[int, dict, dict]) -> bool:
    """Whether an upload was read whole and sent on: with no model server, its 503 "not reachable"."""
    status, _, body = answer
    return status == 503 and "not reachable" in body.get("error", "")


def assert_only_an_error(answer: dict) -> None:
    """README: every error answer is {"error": "..."}, the text not empty, and nothing else."""
    assert list(answer) == ["error"] and isinstance(answer["error"], str) and answer["error"].strip(), answer


ONE_IMAGE = image_part(png((4, 4))) + b"--xx--\r\n"


@pytest.mark.parametrize("cap", ["MAX_REQUESTS_IN_FLIGHT", "MAX_CLIENT_REQUESTS_IN_FLIGHT"])
def test_an_upload_past_an_in_flight_cap_is_503_with_retry_after_and_only_an_error(cap):
    """One place under the cap, held by 127.0.0.2's upload: the next upload the cap counts is refused at its head,
    503 + Retry-After (RETRY_AFTER_S, 1 by default) and {"error"} alone; MAX_CLIENT_REQUESTS_IN_FLIGHT counts
    that address's uploads only (another address's is read and sent on), MAX_REQUESTS_IN_FLIGHT everyone's."""
    from adapter.limits import BUSY_MESSAGE, CLIENT_BUSY_MESSAGE

    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead, min_rate_grace_s=60, body_timeout_s=60,
                        **{cap.lower(): 1})
    with in_process_adapter(settings) as port, holding_a_place(port, "127.0.0.2"):
        same = status_and_json(exchange(port, form_request(port, ONE_IMAGE), source="127.0.0.2"))
        other = status_and_json(exchange(port, form_request(port, ONE_IMAGE), source="127.0.0.3"))
    status, headers, answer = same
    assert (status, headers.get("retry-after")) == (503, "1"), same
    assert headers["content-type"] == "application/json" and answer == {"error": CLIENT_BUSY_MESSAGE}, same
    assert_only_an_error(answer)
    if cap == "MAX_CLIENT_REQUESTS_IN_FLIGHT":
        assert sent_on(other), other
    else:
        status, headers, answer = other
        assert (status, headers.get("retry-after"), answer) == (503, "1", {"error": BUSY_MESSAGE}), other


def test_retry_after_s_from_the_environment_is_the_busy_refusals_retry_after(monkeypatch):
    """RETRY_AFTER_S=7 in the environment: an upload past its address's share is told Retry-After: 7."""
    dead = f"http://127.0.0.1:{free_port()}"
    for name, value in {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "RETRY_AFTER_S": "7",
                        "MAX_CLIENT_REQUESTS_IN_FLIGHT": "1", "MIN_RATE_GRACE_S": "60", "BODY_TIMEOUT_S": "60"}.items():
        monkeypatch.setenv(name, value)
    with in_process_adapter(Settings.from_env()) as port, holding_a_place(port, "127.0.0.1"):
        status, headers, answer = status_and_json(exchange(port, form_request(port, ONE_IMAGE)))
    assert (status, headers.get("retry-after")) == (503, "7"), (status, headers, answer)
    assert_only_an_error(answer)


def test_an_upload_refused_at_its_head_by_a_cap_is_closed_without_waiting_for_its_body():
    """The 503 before the body is read ends the connection (Connection: close, then the close): the unread body must
    not keep the socket, nor be parsed as a next request. Here the body never comes: the refused connection is
    closed at once, not held while the client waits."""
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead, min_rate_grace_s=60, body_timeout_s=60,
                        max_client_requests_in_flight=1)
    with in_process_adapter(settings) as port, holding_a_place(port, "127.0.0.2"), \
            connect(port, timeout=LATE_S, source="127.0.0.2") as refused:
        refused.sendall(multipart_head(port, 100_000))  # its body never sent
        try:
            answer = read_until_closed(refused)
        except socket.timeout:
            answer = None
    assert answer is not None, f"the refused connection was still open {LATE_S:g} s after its head"
    status, headers, _ = status_and_json(answer)
    assert (status, headers.get("retry-after"), headers.get("connection")) == (503, "1", "close"), answer


def test_a_head_whose_body_never_begins_stops_no_upload_and_gets_the_busy_503_at_the_grace():
    """A newcomer under its fair share claims a place held past another's once its body begins (its first bytes within
    MIN_RATE_GRACE_S): a head alone, its body never sent, stops nobody (heads sent every 0.1 s from four addresses had
    stopped half an honest client's uploads). At the grace it gets the busy 503, and both uploads held go on."""
    from adapter.limits import BUSY_MESSAGE

    dead = f"http://127.0.0.1:{free_port()}"
    # One byte a second: the held uploads' few bytes keep them for seconds past the short grace.
    settings = Settings(inference_url=dead, management_url=dead, max_requests_in_flight=2,
                        max_client_requests_in_flight=2, min_rate_grace_s=0.5, min_upload_rate=1, body_timeout_s=60)
    with in_process_adapter(settings) as port, holding_a_place(port, "127.0.0.2"), \
            holding_a_place(port, "127.0.0.2"), connect(port, timeout=LATE_S, source="127.0.0.3") as head_only:
        head_only.sendall(multipart_head(port, 100_000))  # 127.0.0.3's share: 2 // 2 = 1; 127.0.0.2 holds 2
        answer = status_and_json(read_until_closed(head_only))
        held = requests_in_flight(port)
    status, headers, body = answer
    assert (status, headers.get("retry-after"), body) == (503, "1", {"error": BUSY_MESSAGE}), answer
    assert held == 2


def test_an_image_of_exactly_max_upload_bytes_is_read_and_one_byte_more_is_413():
    """MAX_UPLOAD_BYTES is the largest image accepted, itself included: a file of exactly that size is read and sent
    on, one byte more is 413 {"error"} naming the limit."""
    from adapter.upload import too_large

    image = png((4, 4))
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(inference_url=dead, management_url=dead, max_upload_bytes=len(image))
    with in_process_adapter(settings) as port:
        at_limit = status_and_json(exchange(port, form_request(port, image_part(image) + b"--xx--\r\n")))
        over = status_and_json(exchange(port, form_request(port, image_part(image + b"\0") + b"--xx--\r\n")))
    assert sent_on(at_limit), at_limit
    status, _, answer = over
    assert status == 413 and answer == {"error": too_large(len(image)).message}, over
    assert_only_an_error(answer)


def test_a_form_with_two_image_fields_is_400_asking_for_one_image(edge):
    """README: more than one `image` field is a 400 (the seed answered for the last one silently): whichever the
    other parts are, and with the same form of one image read and sent on."""
    image = image_part(png((4, 4)))
    assert sent_on(status_and_json(exchange(edge.port, form_request(edge.port, ONE_IMAGE))))
    for form in (image + image, image + image_part(b"note", name="note") + image_part(b"")):
        status, _, answer = status_and_json(exchange(edge.port, form_request(edge.port, form + b"--xx--\r\n")))
        assert status == 400 and "more than one field named 'image'" in answer["error"], answer
        assert_only_an_error(answer)


def test_an_empty_image_file_is_400_saying_it_is_empty(edge):
    status, _, answer = status_and_json(exchange(edge.port, form_request(edge.port, image_part(b"") + b"--xx--\r\n")))
    assert status == 400 and answer == {"error": "The uploaded file is empty."}, answer
    assert_only_an_error(answer)
