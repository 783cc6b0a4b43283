"""What the edge records: X-Request-ID on every answer, one JSON log line per request, Prometheus
metrics at /metrics (or on their own port, or off). A real adapter process in front of the session's
real TorchServe; the settings checks run adapters in front of no TorchServe at all."""
from __future__ import annotations

import json
import re
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapter.metrics import BUSY_CAPS
from adapter.run import running_adapter
from adapter.model_server import PROBE_IMAGE
from serving.process import free_port

REPO = Path(__file__).resolve().parents[1]
PNG_1PX = PROBE_IMAGE  # a valid 1x1 PNG
NEW_ID = re.compile(r"[0-9a-f]{32}")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def raw_request(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.fixture(scope="module")
def adapter(torchserve, tmp_path_factory):
    log = tmp_path_factory.mktemp("adapter-edge") / "adapter.log"
    with running_adapter({**torchserve.adapter_env(), "MAX_UPLOAD_BYTES": "100000"}, log) as proc:
        yield proc


def test_every_refusal_reason_and_model_server_error_kind_is_there_at_0_from_the_start():
    """A series that appears at its first count (1) is no increase to Prometheus' rate()/increase(): an alert on
    the first model-server outage or the first refusal of a kind never fired. Each is exported at 0 from the start."""
    from prometheus_client import generate_latest

    from adapter.metrics import (CONNECTION_REFUSALS, GAVE_WAY, MODEL_SERVER_CALLS, MODEL_SERVER_ERROR_KINDS,
                                 PARSER_REFUSAL, REFUSAL_REASONS, Metrics)

    values = samples(generate_latest(Metrics().registry).decode())
    for reason in (*REFUSAL_REASONS.values(), PARSER_REFUSAL, "busy", GAVE_WAY, *CONNECTION_REFUSALS.values()):
        assert values[("adapter_refusals_total", (("reason", reason),))] == 0
    for kind in MODEL_SERVER_ERROR_KINDS:
        assert values[("adapter_model_server_errors_total", (("kind", kind),))] == 0
    for cap in BUSY_CAPS:
        assert values[("adapter_busy_refusals_total", (("cap", cap),))] == 0
    for call in MODEL_SERVER_CALLS:
        assert values[("adapter_model_server_duration_seconds_count", (("call", call),))] == 0


def test_request_ids_log_lines_and_metrics(adapter, client):
    base = adapter.base_url
    ok = client.post(f"{base}/classify/", files={"image": ("p.png", PNG_1PX, "image/png")},
                     headers={"X-Request-ID": "req-42.a:b_c"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-42.a:b_c"
    version = ok.json()["model_version"]
    # Insane ids (spaces, too long) are replaced by a new one; errors carry one too.
    for bad in ("two words", "x" * 129, "<script>"):
        r = client.post(f"{base}/classify/", files={"image": ("p.png", PNG_1PX, "image/png")},
                        headers={"X-Request-ID": bad})
        assert r.status_code == 200 and NEW_ID.fullmatch(r.headers["x-request-id"]), r.headers
    no_field = client.post(f"{base}/classify/", files={"photo": ("p.png", PNG_1PX, "image/png")})
    too_big = client.post(f"{base}/classify/", files={"image": ("p.png", b"\0" * 200_000, "image/png")})
    assert (no_field.status_code, too_big.status_code) == (400, 413)
    assert NEW_ID.fullmatch(no_field.headers["x-request-id"]) and NEW_ID.fullmatch(too_big.headers["x-request-id"])
    # Refused at the HTTP parser, before the app: too many headers (431).
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(120))
    answer = raw_request(base, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431") and re.search(rb"x-request-id: [0-9a-f]{32}", answer), answer[:300]

    metrics = client.get(f"{base}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    values = samples(metrics.text)
    assert values[("adapter_requests_total", (("route", "/classify/"), ("status", "200")))] == 4
    assert values[("adapter_requests_total", (("route", "/classify/"), ("status", "413")))] == 1
    assert values[("adapter_refusals_total", (("reason", "too_large"),))] == 1
    assert values[("adapter_refusals_total", (("reason", "headers_too_large"),))] == 1
    # (/health's own probe predictions are timed apart: call="probe")
    assert values[("adapter_model_server_duration_seconds_count", (("call", "prediction"),))] == 4
    assert values[("adapter_request_duration_seconds_count", (("route", "/classify/"),))] == 6
    assert values[("adapter_requests_in_flight", ())] == 0  # (not this /metrics request: it holds no body)
    assert values[("adapter_explanations_at_model_server", ())] == 0 == values[("adapter_explanations_waiting", ())]
    assert ("adapter_model_server_retries_total", ()) in values

    lines = [json.loads(line) for line in adapter.log_file.read_text().splitlines() if line.startswith("{")]
    [mine] = [line for line in lines if line["request_id"] == "req-42.a:b_c"]
    assert mine["route"] == "/classify/" and mine["status"] == 200 and mine["method"] == "POST"
    assert mine["model_version"] == version and mine["bytes_in"] > len(PNG_1PX) and mine["latency_ms"] > 0
    assert {line["client"] for line in lines} == {"127.0.0.1"}  # the 431 at the parser included
    assert datetime.fromisoformat(mine["time"]).tzinfo is not None
    assert {line["status"] for line in lines} >= {200, 400, 413, 431}
    refused = [line for line in lines if line["request_id"] == no_field.headers["x-request-id"]]
    assert refused and refused[0]["model_version"] is None


def access_record(log_file: Path, request_id: str, wait_s: float = 5.0) -> dict:
    """The access line of the request with this id, once the adapter has written it."""
    deadline = time.monotonic() + wait_s
    while True:
        for line in log_file.read_text().splitlines():
            if line.startswith("{") and (record := json.loads(line))["request_id"] == request_id:
                return record
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.05)


def test_a_client_gone_mid_upload_is_counted_as_499_not_as_a_bad_request(adapter, client):
    """A client that hung up half-way through its upload was counted and logged as a 400 (a bad request of
    its own). Now nginx's 499 (client closed request): counted apart, and nothing went to the model server."""
    base = adapter.base_url
    before = samples(client.get(f"{base}/metrics").text)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /classify/ HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-mid-upload\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")
        time.sleep(0.3)  # the app is reading the body
    record = access_record(adapter.log_file, "gone-mid-upload")
    after = samples(client.get(f"{base}/metrics").text)
    assert (record["route"], record["status"]) == ("/classify/", 499), record

    def grown(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)
    assert grown("adapter_requests_total", (("route", "/classify/"), ("status", "499"))) == 1
    assert grown("adapter_requests_total", (("route", "/classify/"), ("status", "400"))) == 0
    assert not any(grown(name, labels) for name, labels in after if name == "adapter_model_server_duration_seconds_count")
    assert not any(name == "adapter_refusals_total" and grown(name, labels) for name, labels in after)


def test_a_scrape_shows_the_request_before_it_and_scrapes_with_nothing_between_reuse_the_page(adapter, client):
    """GET /metrics rendered the whole registry each time (~3 ms of the event loop): 6 connections scraping
    nonstop took a lone /classify/'s median from 19 to 65 ms (review). Now a scrape with nothing recorded since
    the last render gets the same page (the scrapes' own count waits for the next render), and one after a
    request renders anew, with that request counted."""
    url = f"{adapter.base_url}/metrics"
    pairs = [(client.get(url).text, client.get(url).text) for _ in range(3)]  # (a loaded host: 1 s between, once)
    assert any(first == again for first, again in pairs), "two scrapes with nothing between rendered twice"
    key = ("adapter_requests_total", (("route", "/classes"), ("status", "200")))
    for _ in range(3):
        before = samples(client.get(url).text).get(key, 0)
        assert client.get(f"{adapter.base_url}/classes").status_code == 200
        assert samples(client.get(url).text)[key] == before + 1


@pytest.mark.parametrize("env, on_main, on_own_port", [
    ({"METRICS_ENABLED": "0"}, 404, None),
    ({"METRICS_PORT": "{port}"}, 404, 200),
])
def test_metrics_can_be_turned_off_or_moved(tmp_path, env, on_main, on_own_port):
    port = free_port()
    env = {key: value.format(port=port) for key, value in env.items()}
    dead = f"http://127.0.0.1:{free_port()}"  # no TorchServe needed for this
    with running_adapter({"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, **env}, tmp_path / "a.log") as a:
        r = httpx.get(f"{a.base_url}/metrics", timeout=30)
        assert r.status_code == on_main and "error" in r.json()
        if on_own_port:
            own = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
            assert own.status_code == on_own_port and "adapter_requests_total" in own.text
        # A failed model-server call is counted (here: nobody listens at TorchServe's address).
        r = httpx.post(f"{a.base_url}/classify/", files={"image": ("p.png", PNG_1PX, "image/png")}, timeout=30)
        assert r.status_code == 503 and NEW_ID.fullmatch(r.headers["x-request-id"])
        if on_own_port:
            own = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
            assert own[("adapter_model_server_errors_total", (("kind", "unreachable"),))] == 1
            # A 503 for a model server that is down is not a refusal of the adapter's ("busy" is
            # 503 + Retry-After, its in-flight caps): alerts on refusals must not fire for it.
            assert not any(name == "adapter_refusals_total" and value for (name, _), value in own.items()), own


def test_a_client_id_is_kept_up_to_its_length_limit_and_only_with_sane_characters(tmp_path):
    """REQUEST_ID_MAX_LENGTH characters of letters, digits and ._:- are kept (the limit included);
    anything else (too long, empty, other characters) gets a new id. No model server needed: the
    503 for the absent one carries the id like any answer."""
    dead = f"http://127.0.0.1:{free_port()}"
    # HEALTH_CACHE_S=0: each /health checks on its own, so each logs its warning (named below)
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "REQUEST_ID_MAX_LENGTH": "40", "HEALTH_CACHE_S": "0"}
    kept = ["a" * 40, "Z", "0.1:2-3_4", "req-" + "9" * 36]
    replaced = ["a" * 41, "", "a/b", "a;b", "a b", "a,b", "\u00e9t\u00e9".encode(), "a\tb"]
    with running_adapter({**env}, tmp_path / "a.log") as a:
        for request_id in kept + replaced:
            r = httpx.get(f"{a.base_url}/health", headers=[("X-Request-ID", request_id)], timeout=30)
            assert r.status_code == 503, r.text
            if request_id in kept:
                assert r.headers["x-request-id"] == request_id
            else:
                assert NEW_ID.fullmatch(r.headers["x-request-id"]), (request_id, r.headers["x-request-id"])
        # Whitespace around a sane id (before and after the value) is dropped and the id kept, not replaced;
        # on a refusal at the parser too (431: too many headers).
        for request in (b"GET /classes HTTP/1.1\r\nHost: x\r\nX-Request-ID: \t padded-7 \t\r\n"
                        b"Connection: close\r\n\r\n",
                        b"GET /classes HTTP/1.1\r\nHost: x\r\nX-Request-ID:  padded-8\t\r\n"
                        + b"".join(b"X-H%d: v\r\n" % i for i in range(120)) + b"\r\n"):
            answer = raw_request(a.base_url, request)
            assert re.search(rb"x-request-id: padded-[78]\r\n", answer), answer[:400]
    # Its warnings name the request (they named none: an operator could not follow one request).
    warnings = [line for line in a.log_file.read_text().splitlines() if "TorchServe not reachable" in line]
    assert all(any(line.endswith(f" (request {k})") for line in warnings) for k in kept), warnings


def test_the_log_rotates_at_its_size_and_keeps_every_line(tmp_path):
    import logging

    from serving.rotating_log import RotatingLog

    path = tmp_path / "adapter.log"
    logger = logging.getLogger("test.rotation")
    logger.propagate = False
    # Unescaped: the handler counts the bytes of non-ASCII lines, not their characters.
    lines = [json.dumps({"n": n, "text": "é" * 20}, ensure_ascii=False) for n in range(60)]
    # A restarted adapter (a new handler) appends to the file it finds, and counts what is there.
    for run in (lines[:30], lines[30:]):
        handler = RotatingLog(path, maxBytes=1000, backupCount=2, encoding="utf-8")
        logger.addHandler(handler)
        try:
            for line in run:
                logger.warning(line)
        finally:
            handler.close()
            logger.removeHandler(handler)
    files = [path, path.with_name("adapter.log.1"), path.with_name("adapter.log.2")]
    assert not path.with_name("adapter.log.3").exists()
    assert all(f.exists() and 0 < f.stat().st_size < 1000 for f in files), [f.stat().st_size for f in files]
    kept = [line for f in reversed(files) for line in f.read_text(encoding="utf-8").splitlines()]
    assert kept == lines[-len(kept):] and len(kept) >= 15  # the newest, in order, none cut


def test_refusals_before_and_in_the_app_are_counted_by_reason(tmp_path):
    """503 busy (in-flight cap), 408 for a slow body and for a slow head: no model server needed."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "MAX_REQUESTS_IN_FLIGHT": "1",
           "BODY_TIMEOUT_S": "3", "HEADER_TIMEOUT_S": "1"}
    post = (b"POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"--b" * 3)
    with running_adapter(env, tmp_path / "a.log") as a:
        host, port = a.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as holder:
            holder.sendall(post)  # holds the one in-flight slot; its body never completes
            time.sleep(0.5)
            busy = raw_request(a.base_url, post)
            assert busy.startswith(b"HTTP/1.1 503") and b"retry-after" in busy.lower(), busy[:300]
            # The gauges are the caps' own counts, those the 503 was decided on: one request holding the
            # 9 bytes it sent (not the 1000 it declared), and not the scrape itself.
            held = samples(httpx.get(f"{a.base_url}/metrics", timeout=30).text)
            assert (held[("adapter_requests_in_flight", ())], held[("adapter_bytes_in_flight", ())]) == (1, 9)
            with socket.create_connection((host, int(port)), timeout=30) as slow_head:
                slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and nothing more
                assert slow_head.recv(65536).startswith(b"HTTP/1.1 408")
            assert holder.recv(65536).startswith(b"HTTP/1.1 408")  # under MIN_UPLOAD_RATE after its grace
        values = samples(httpx.get(f"{a.base_url}/metrics", timeout=30).text)
        assert values[("adapter_refusals_total", (("reason", "busy"),))] == 1
        # ... and which cap refused it: the client's share of the requests in flight (one, as the cap is one)
        assert {cap: values[("adapter_busy_refusals_total", (("cap", cap),))] for cap in BUSY_CAPS} == {
            cap: int(cap == "client_in_flight") for cap in BUSY_CAPS}
        assert values[("adapter_refusals_total", (("reason", "timeout"),))] == 2
        assert values[("adapter_requests_total", (("route", "/classify/"), ("status", "503")))] == 1


def test_a_path_cannot_forge_a_line_of_the_log(tmp_path):
    """The refusal warnings print the request's path, percent-decoded: a path holding %0A and JSON wrote a line
    of its own that `grep '^{' logs/adapter.log | jq` (README) read as an access record. Every plain line now
    has its line breaks and control characters escaped; only access records start a line with "{"."""
    from urllib.parse import quote

    dead = f"http://127.0.0.1:{free_port()}"
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "MAX_REQUESTS_IN_FLIGHT": "1"}
    forged = json.dumps({"time": "2026-12-02T00:00:00.000+00:00", "method": "POST", "route": "/classify/",
                         "status": 200, "bytes_in": 1, "latency_ms": 1.0, "request_id": "forged",
                         "model_version": "w3-FORGED"})
    path = quote("/x\n" + forged + "\r\n\x1b[2J\u2028", safe="/").encode()
    with running_adapter(env, tmp_path / "a.log") as a:
        host, port = a.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as holder:
            holder.sendall(b"POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: 1000\r\n\r\n--b")  # holds the one slot: its body never completes
            time.sleep(0.5)
            busy = raw_request(a.base_url, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
                               + b"0123456789")
            assert busy.startswith(b"HTTP/1.1 503"), busy[:300]
    lines = a.log_file.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and not [r for r in records if r["request_id"] == "forged"], lines
    refusal = next(line for line in lines if "refused POST /x" in line)
    assert '/x\\n{"time": "2026' in refusal and '\\r\\n\\x1b[2J\\u2028 from 127.0.0.1' in refusal, refusal


def test_a_tracebacks_client_text_cannot_forge_a_line_of_the_log():
    """A traceback's lines were indented but not escaped: an exception whose message held a client's text (\r, a
    terminal escape, U+2028, which Python's splitlines breaks at) went into the log as it was."""
    import logging
    import sys

    from adapter.edge import AccessLogFormatter

    try:
        raise ValueError('bad \r\x1b[2J\u2028{"request_id": "forged"}')
    except ValueError:
        record = logging.LogRecord("adapter", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    text = AccessLogFormatter("%(message)s").format(record)
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), ascii(text)
    assert "\\r\\x1b[2J\\u2028{" in text and all(line.startswith("  ") for line in text.splitlines()[1:]), text


def test_bad_http_counts_the_parsers_400s_not_the_apps(tmp_path):
    """adapter_refusals_total{reason="bad_http"} is what its name and the README say: requests that are
    not valid HTTP, refused at the parser. A 400 of the app (no image in the upload) is an answer about
    the request's content: adapter_requests_total counts it, not a refusal. No model server needed."""
    dead = f"http://127.0.0.1:{free_port()}"
    with running_adapter({"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead}, tmp_path / "a.log") as a:
        for _ in range(2):
            r = httpx.post(f"{a.base_url}/classify/", files={"photo": ("p.png", PNG_1PX, "image/png")}, timeout=30)
            assert r.status_code == 400, r.text
        answer = raw_request(a.base_url, b"POST /classify/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        values = samples(httpx.get(f"{a.base_url}/metrics", timeout=30).text)
        assert values[("adapter_refusals_total", (("reason", "bad_http"),))] == 1
        assert values[("adapter_requests_total", (("route", "/classify/"), ("status", "400")))] == 2


def coded_requests(path: bytes, content_type: bytes, body: bytes) -> dict[str, bytes]:
    """Requests whose body cannot be read as it is sent, by the status they get (adapter/protocol.py)."""
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type + b"\r\n"
    return {
        # an uncompressed body labelled gzip (the adapter classified it), and a large one: its 415 survives the body
        "415": head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        "415 large": head + b"Content-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % (len(body) + (1 << 20))
                     + body + b" " * (1 << 20),
        "501": head + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
        "411": b"POST " + path + b" HTTP/1.0\r\nHost: x\r\nContent-Type: " + content_type + b"\r\n\r\n" + body,
    }


def test_a_body_that_cannot_be_read_as_sent_is_refused_at_the_parser(tmp_path):
    """A Content-Encoding (other than identity) was ignored: an uncompressed upload labelled gzip was classified; a
    Transfer-Encoding other than chunked, or an HTTP/1.0 POST without Content-Length, reached the app with a body it
    could not read. Now 415, 501, 411, {"error": ...}, counted by reason. No model server needed."""
    dead = f"http://127.0.0.1:{free_port()}"
    part = (b"--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + PNG_1PX + b"\r\n--XX--\r\n")
    with running_adapter({"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead}, tmp_path / "a.log") as a:
        for expected, request in coded_requests(b"/classify/", b"multipart/form-data; boundary=XX", part).items():
            answer = raw_request(a.base_url, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 " + expected[:3].encode()), (expected, answer[:300])
            assert "not supported" in json.loads(body)["error"] or "Content-Length" in json.loads(body)["error"]
        assert b"gzip" in raw_request(a.base_url, coded_requests(b"/classify/", b"x", b"abc")["415"])
        # the coding named is the client's text: shown cut short (serving/client_text.py)
        long_coding = raw_request(a.base_url, b"POST /classify/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                  + b"z" * 5000 + b", chunked\r\n\r\n0\r\n\r\n")
        refused = json.loads(long_coding.partition(b"\r\n\r\n")[2])["error"]
        assert long_coding.startswith(b"HTTP/1.1 501") and "z" * 40 + "... is not" in refused, refused[:300]
        # identity is no coding, and a request without a body has nothing coded: answered as before
        for coding in (b"identity", b"gzip"):
            same = raw_request(a.base_url, b"GET /classes HTTP/1.1\r\nHost: x\r\nContent-Encoding: " + coding
                               + b"\r\nConnection: close\r\n\r\n")
            assert same.startswith(b"HTTP/1.1 200"), (coding, same[:300])
        values = samples(httpx.get(f"{a.base_url}/metrics", timeout=30).text)
    assert {reason: values[("adapter_refusals_total", (("reason", reason),))]
            for reason in ("encoded", "unsupported", "length_required")} == {
        "encoded": 3, "unsupported": 2, "length_required": 1}


def test_a_request_refused_at_the_parser_keeps_the_clients_id_and_is_counted_and_logged_once(tmp_path):
    """README: every answer, those refused at the HTTP parser included, has the client's X-Request-ID when
    it is sane. A 431 (too many headers) and a 400 for a chunk that breaks mid-body had a new one. And the
    body's 400, refused after the app had the request, was counted and logged twice: once by the parser
    (route "other", with the id the client got) and once by the app's edge (route /classify/, with an id
    the client never saw). Now: one record, with the id the client got."""
    dead = f"http://127.0.0.1:{free_port()}"
    png = PNG_1PX
    part = (b"--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XX--\r\n")

    def broken_chunk(request_id: bytes | None) -> bytes:
        return (b"POST /classify/ HTTP/1.1\r\nHost: x\r\n" + (b"X-Request-ID: " + request_id + b"\r\n" if request_id else b"")
                + b"Content-Type: multipart/form-data; boundary=XX\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % 40 + part[:40] + b"\r\nZZZZ-not-hex\r\n\r\n")

    many = b"".join(b"X-H%d: v\r\n" % i for i in range(120))
    with running_adapter({"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead}, tmp_path / "a.log") as a:
        before = samples(httpx.get(f"{a.base_url}/metrics", timeout=30).text)
        answers = [raw_request(a.base_url, b"GET /classes HTTP/1.1\r\nHost: x\r\nX-Request-ID: client-431\r\n" + many
                               + b"\r\n"),
                   raw_request(a.base_url, broken_chunk(b"client-chunk")), raw_request(a.base_url, broken_chunk(None)),
                   raw_request(a.base_url, broken_chunk(b"not sane!"))]
        time.sleep(0.5)  # the edge's record of the last one
        after = samples(httpx.get(f"{a.base_url}/metrics", timeout=30).text)
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 431"] + [b"HTTP/1.1 400"] * 3, answers
    ids = [re.search(rb"x-request-id: (\S+)", answer)[1].decode() for answer in answers]
    assert ids[:2] == ["client-431", "client-chunk"] and NEW_ID.fullmatch(ids[2]) and NEW_ID.fullmatch(ids[3]), ids
    records = [json.loads(line) for line in a.log_file.read_text().splitlines() if line.startswith("{")]
    refused = [r for r in records if r["status"] in (400, 431)]
    assert [(r["route"], r["status"], r["request_id"]) for r in refused] == [
        ("other", 431, "client-431"), ("/classify/", 400, ids[1]), ("/classify/", 400, ids[2]),
        ("/classify/", 400, ids[3])], refused

    def grown(name, labels):
        return after.get((name, labels), 0) - before.get((name, labels), 0)
    assert grown("adapter_requests_total", (("route", "/classify/"), ("status", "400"))) == 3
    assert grown("adapter_requests_total", (("route", "other"), ("status", "400"))) == 0
    assert grown("adapter_refusals_total", (("reason", "bad_http"),)) == 3
    assert grown("adapter_refusals_total", (("reason", "headers_too_large"),)) == 1


def test_start_restarts_an_adapter_started_in_front_of_another_model_server(tmp_path):
    """`make serve` after `make serve-kserve` (no make stop): `adapter.run start` finds an adapter running
    in front of KServe's server (OIP_URL) and restarts it in front of TorchServe, saying so; started
    again with the same model server it is left running. ADAPTER_LOG_DIR keeps its pid and record
    out of logs/; nobody listens at either model server's address (no model server needed)."""
    import os
    import subprocess
    import sys

    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "ADAPTER_LOG_DIR": str(tmp_path), "ADAPTER_PORT": str(free_port()),
           "TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead}
    env.pop("OIP_URL", None)
    base = f"http://127.0.0.1:{env['ADAPTER_PORT']}"

    def run(command: str, **more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "adapter.run", command], cwd=REPO, env={**env, **more},
                              capture_output=True, text=True, timeout=120)

    def backend() -> str:  # which client the adapter runs, by its 503 for a model server nobody runs
        error = httpx.get(f"{base}/health", timeout=30).json()["error"]
        return "torchserve" if "is TorchServe running?" in error else "oip"
    try:
        started = run("start", OIP_URL=dead)
        assert started.returncode == 0, started.stderr
        first = (tmp_path / "adapter.pid").read_text()
        assert backend() == "oip"
        again = run("start")  # make serve: TorchServe
        assert again.returncode == 0, again.stderr
        assert f"in front of the OIP server at {dead}: restarting it in front of TorchServe at {dead}" in again.stdout
        assert (tmp_path / "adapter.pid").read_text() != first and backend() == "torchserve"
        same = run("start")
        assert same.returncode == 0 and "Adapter already running" in same.stdout, same.stdout
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0 and "Adapter stopped" in stopped.stdout
    assert not (tmp_path / "adapter.pid").exists() and not (tmp_path / "adapter.model-server").exists()


@pytest.mark.parametrize("flag, status", [(None, 404), ("1", 200)], ids=["default", "ADAPTER_DOCS=1"])
def test_swagger_ui_is_served_only_with_adapter_docs(tmp_path, flag, status):
    """ADAPTER_DOCS=1 serves /docs and /redoc (their scripts come from a CDN); off by default.
    /openapi.json is served either way."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "ADAPTER_DOCS": flag or "0"}
    with running_adapter(env, tmp_path / "a.log") as a:
        for path in ("/docs", "/redoc"):
            r = httpx.get(f"{a.base_url}{path}", timeout=30)
            assert r.status_code == status, (path, r.text[:200])
            if status == 404:
                assert r.json() == {"error": f"Not found: {path}"}
            else:
                assert "text/html" in r.headers["content-type"]
        assert httpx.get(f"{a.base_url}/openapi.json", timeout=30).json()["paths"]["/classify/"]


def test_settings_tell_the_page_the_configured_upload_limit(tmp_path):
    """The page checks a file against GET /settings before uploading it: MAX_UPLOAD_BYTES as set."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "MAX_UPLOAD_BYTES": "20000"}
    with running_adapter(env, tmp_path / "a.log") as a:
        settings = httpx.get(f"{a.base_url}/settings", timeout=30).json()
    assert (settings["max_upload_bytes"], settings["top_k"]) == (20000, 5)


def test_the_413_names_the_limit_in_binary_units_to_a_tenth_rounded_half_up():
    """adapter/upload.py binary_size, the words of every 413 (and, digit for digit, the page's formatBytes): the unit
    chosen on the rounded value, a tenth shown only when it is not 0. Only the browser tier checked it before."""
    from adapter.upload import binary_size, too_large

    assert [binary_size(n) for n in (10 * 1024 * 1024, 100_000, 20_000, 1_048_552, 1023, 102, 1536, 1588)] == [
        "10 MiB", "97.7 KiB", "19.5 KiB", "1 MiB", "1 KiB", "102 bytes", "1.5 KiB", "1.6 KiB"]
    err = too_large(100_000)
    assert (err.status_code, err.message) == (413, "The image is too large: the limit is 97.7 KiB.")


def test_the_edge_gives_the_model_server_the_id_it_returns_and_keeps_it_on_a_last_resort_500():
    """In-process, around a bare ASGI app: the id the app sees (sent on to the model server) is the one the
    client gets back; an app that raises gets the edge's own 500 in JSON, with the id too."""
    import asyncio

    from adapter.edge import Edge
    from adapter.request_context import CURRENT

    seen = []

    async def app(scope, receive, send):
        seen.append(CURRENT.get()["request_id"])
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call(path: str) -> list[dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "headers": [(b"x-request-id", b"abc-1")]}
        await Edge(app, 40, None)(scope, receive, send)
        return sent

    ok = asyncio.run(call("/health"))
    assert (b"x-request-id", b"abc-1") in ok[0]["headers"] and seen == ["abc-1"]
    failed = asyncio.run(call("/boom"))
    assert failed[0]["status"] == 500 and (b"x-request-id", b"abc-1") in failed[0]["headers"]
    assert "Internal error" in json.loads(failed[1]["body"])["error"] and seen == ["abc-1", "abc-1"]


@pytest.mark.parametrize("gone", ["ClientDisconnect", "ConnectionResetError"])
def test_a_client_gone_before_its_answer_began_is_499_and_sent_no_500_by_the_edge_alone(caplog, gone):
    """In-process, around a bare ASGI app whose client went away mid-upload (the app's receive raised), and no
    parser noted it (the Edge's own rule, whatever server runs it): 499 in the access line and the metrics, and
    no last-resort 500 sent to nobody, nor counted as the adapter's error."""
    import asyncio
    import logging

    from starlette.requests import ClientDisconnect

    from adapter.edge import Edge
    from adapter.metrics import Metrics

    async def app(scope, receive, send):
        await receive()
        raise ClientDisconnect() if gone == "ClientDisconnect" else ConnectionResetError("reset by peer")

    async def call() -> list[dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"--b\r\n", "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/classify/", "client": ("127.0.0.1", 5000),
                 "headers": [(b"x-request-id", b"gone-1")]}
        await Edge(app, 40, metrics)(scope, receive, send)
        return sent

    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="adapter.access")
    assert asyncio.run(call()) == []
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "adapter.access"]
    assert [(line["request_id"], line["status"], line["bytes_in"]) for line in lines] == [("gone-1", 499, 5)], lines
    counted = {labels: value for (name, labels), value in samples(metrics.render().decode()).items()
               if name == "adapter_requests_total" and value}
    assert counted == {(("route", "/classify/"), ("status", "499")): 1}, counted


def test_metrics_host_and_frontend_dir_are_the_settings_readme_says(tmp_path):
    """METRICS_HOST: the metrics port listens there only (127.0.0.2: another loopback address);
    FRONTEND_DIR: the folder served at /; a folder that is not there: no page, said in the log."""
    dead = f"http://127.0.0.1:{free_port()}"
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<!doctype html><title>mine</title>")
    # The same port number on 127.0.0.1 held (bound, not listening: connections refused) for the test: a port free
    # on 127.0.0.2 alone was once taken on 127.0.0.1 by another server, which answered (CI, session 34).
    guard = socket.socket()
    while True:
        port = free_port("127.0.0.2")
        try:
            guard.bind(("127.0.0.1", port))
            break
        except OSError:
            continue
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "METRICS_PORT": str(port),
           "METRICS_HOST": "127.0.0.2", "FRONTEND_DIR": str(page)}
    with guard, running_adapter(env, tmp_path / "a.log") as a:
        assert "adapter_requests_total" in httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=30).text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert "<title>mine</title>" in httpx.get(f"{a.base_url}/", timeout=30).text
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "FRONTEND_DIR": str(tmp_path / "nowhere")}
    with running_adapter(env, tmp_path / "b.log") as a:
        assert httpx.get(f"{a.base_url}/", timeout=30).status_code == 404
        assert httpx.get(f"{a.base_url}/classes", timeout=30).status_code == 200
        assert "no page: FRONTEND_DIR" in a.log_file.read_text()


def _closed_at_once(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server has closed this connection (within ``wait_s``)."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(16) == b""
    except socket.timeout:
        return False
    except OSError:  # reset
        return True


def test_the_metrics_port_holds_a_clients_share_of_connections_until_the_heads_deadline(tmp_path):
    """prometheus_client's own server held a thread and a file descriptor per connection for ever: 788 half-sent
    requests on METRICS_PORT (METRICS_HOST=0.0.0.0 in a pod) took the adapter's last descriptors and /classify/
    stopped answering (review 30). The metrics port now holds at most MAX_CLIENT_CONNECTIONS at once (more are
    closed at once) and closes each HEADER_TIMEOUT_S after it opened, a client dripping bytes included; then it
    scrapes again."""
    import psutil

    port, dead = free_port(), f"http://127.0.0.1:{free_port()}"
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "METRICS_PORT": str(port),
           "MAX_CLIENT_CONNECTIONS": "4", "HEADER_TIMEOUT_S": "4"}  # (2 s: one of the 4 had reached it on a loaded host)
    with running_adapter(env, tmp_path / "a.log") as a:
        adapter = psutil.Process(a.process.pid)
        threads = adapter.num_threads()
        held = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            held.append(sock)
        try:
            time.sleep(0.3)
            still_open = [sock for sock in held if not _closed_at_once(sock, 0.05)]
            assert len(still_open) == 4, len(still_open)  # its share held (the rest closed at once)
            assert adapter.num_threads() <= threads + 2 * 4  # each held one: its thread, its deadline's
            assert all(_closed_at_once(sock, 5) for sock in still_open)  # the head's deadline, 4 s
        finally:
            for sock in held:
                sock.close()
        # A byte every 0.5 s never leaves a read waiting 4 s: the deadline counts from the connection's start.
        time.sleep(0.5)  # the held ones' threads gone (else the last of these may be one past the share)
        dripping = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        started, closed_after = time.monotonic(), {}
        try:
            while len(closed_after) < len(dripping) and time.monotonic() - started < 8:
                for number, sock in enumerate(dripping):
                    if number not in closed_after:
                        try:
                            sock.sendall(b"G")
                            if _closed_at_once(sock, 0.01):
                                closed_after[number] = time.monotonic() - started
                        except OSError:
                            closed_after[number] = time.monotonic() - started
                time.sleep(0.5)
        finally:
            for sock in dripping:
                sock.close()
        assert len(closed_after) == 4 and 3.5 <= min(closed_after.values()) <= max(closed_after.values()) < 6, \
            closed_after
        assert "adapter_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text


def test_open_connections_and_the_clients_holding_them_are_gauged(tmp_path):
    """adapter_connections_open and adapter_clients_connected: what MAX_OPEN_CONNECTIONS and
    MAX_CLIENT_CONNECTIONS count, read at each scrape (5 idle connections held, then let go)."""
    dead = f"http://127.0.0.1:{free_port()}"
    with running_adapter({"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead}, tmp_path / "a.log") as adapter:
        host, port = adapter.base_url.removeprefix("http://").split(":")

        def gauges() -> tuple[float, float]:
            with httpx.Client(timeout=30) as client:  # a connection of its own: counted too
                values = samples(client.get(f"{adapter.base_url}/metrics").text)
            return values[("adapter_connections_open", ())], values[("adapter_clients_connected", ())]
        held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(5)]
        try:
            time.sleep(0.3)  # accepted
            assert gauges() == (6, 1)
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while gauges() != (1, 1):
            assert time.monotonic() < deadline, gauges()
            time.sleep(0.1)


def test_the_pages_range_refusals_are_json_and_openapi_json_warns_of_nothing(tmp_path):
    """README: every 4xx/5xx is {"error": ...}. The page's files answered a Range they cannot give in
    Starlette's plain text (400 "Range header: range must be requested", a 416 with no body); now JSON,
    the 416 with its Content-Range (RFC 9110). Ranges they can give are served as before. And GET
    /openapi.json logged FastAPI's "Duplicate Operation ID" for /classes, /settings and /health (their
    HEAD had the GET's id): no warning now."""
    dead = f"http://127.0.0.1:{free_port()}"
    size = (REPO / "frontend" / "app.js").stat().st_size
    with running_adapter({"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead}, tmp_path / "a.log") as a:
        url = f"{a.base_url}/app.js"
        for value in ("bytes=a-b", "bytes=5-1", "items=0-1"):
            r = httpx.get(url, headers={"Range": value}, timeout=30)
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (value, r.text)
            assert "range" in r.json()["error"].lower(), (value, r.text)  # Starlette's reason, as JSON
        r = httpx.get(url, headers={"Range": "bytes=99999999-"}, timeout=30)
        assert (r.status_code, r.headers["content-range"]) == (416, f"bytes */{size}"), r.text
        assert r.json() == {"error": f"Range not satisfiable: the file has {size} bytes."}
        r = httpx.get(url, headers={"Range": "bytes=0-9"}, timeout=30)
        assert (r.status_code, r.headers["content-range"], len(r.content)) == (206, f"bytes 0-9/{size}", 10)
        r = httpx.get(url, headers={"Range": "bytes=0-4,2-9"}, timeout=30)
        assert r.status_code == 206, r.text
        assert httpx.get(url, timeout=30).status_code == 200
        spec = httpx.get(f"{a.base_url}/openapi.json", timeout=30).json()
        assert set(spec["paths"]) == {"/classify/", "/explain/", "/classes", "/settings", "/health"}, spec["paths"]
    # (FastAPI's warning goes to the process's stderr, not its log: asked of an app here.)
    from adapter.app import create_app
    from adapter.config import Settings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_app(Settings.from_env()).openapi()
