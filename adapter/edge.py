"""What the edge records of every request: its X-Request-ID, one JSON log line, Prometheus metrics.

An ASGI middleware around the whole app (outermost, so the in-flight caps' 503s pass through it):
  * X-Request-ID: the client's, when it is sane (1..REQUEST_ID_MAX_LENGTH characters of
    letters, digits and ``._:-``, once spaces and tabs around it are dropped), else a new one;
    returned on every answer, errors included, and sent on to the model server (adapter/request_context.py);
  * one line per request on the logger ``adapter.access``, a JSON object: time (UTC), client (whole:
    adapter/limits.py's client_host; the shares count an IPv6 address by its /64), method,
    route, status, bytes_in, latency_ms, request_id, model_version (of the answer, when a model
    answered); adapter/run.py writes those lines bare, as JSON; status 499 (CLIENT_GONE): the client
    went away before its answer began (mid-upload, or while the model worked: adapter/protocol.py notes
    it in the request's record, as uvicorn drops an answer to a closed connection without a word), and
    got none;
  * adapter/metrics.py's counters and histograms, when metrics are on.
Refusals at the HTTP parser (adapter/protocol.py: 400, 408 head, 414, 431) never reach the app:
``refused_before_app`` gives them a request id (the client's when sane: from the headers parsed so far),
a log line and their count. A request whose body the parser refuses after the app got it (a chunk that
breaks mid-stream) is the Edge's: the parser's answer carries its id, and the Edge records it once, with
the parser's status (the app's own answer never left).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

from starlette.requests import ClientDisconnect

from .limits import client_host
from .metrics import Metrics, route_label
from .request_context import CURRENT

access_log = logging.getLogger("adapter.access")
log = logging.getLogger("adapter.edge")
# The request's record in its ASGI scope (the dict the app and adapter/protocol.py share): request_id,
# model_version, parser_refused (the status the parser answered its body with, else None), client_gone
# (the connection closed before the answer began), relayed (the answer passes on the model server's refusal), and
# busy_cap (what refused it busy: adapter/metrics.py BUSY_CAPS, or GAVE_WAY).
EDGE_RECORD = "adapter.edge"

_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]+")
# Characters of a request's path (or target) put in a plain log line; the access line names its route instead
# (route_label: a known route, else "other"). Here and in KServe's predictor (handler/kserve_predictor.py): a path of
# 15,000 characters made each of its 404s' access lines that long (2,362 of them: 35.7 MB of log in 3 s).
PATH_LOGGED = 200
# nginx's "client closed request": the client went away before its answer (mid-upload), so none was sent.
CLIENT_GONE = 499


def shown_path(path: str) -> str:
    """A request's path as a log line shows it: cut to PATH_LOGGED characters, its length said when cut."""
    return path if len(path) <= PATH_LOGGED else f"{path[:PATH_LOGGED]}...({len(path)} characters)"


def request_id_from(headers, max_length: int) -> str:
    """The client's X-Request-ID when sane, else a new random one (32 hex digits). Spaces and tabs around the
    value are not part of it (RFC 9110's optional whitespace, which the parser may leave on)."""
    for name, value in headers:
        if name == b"x-request-id":
            value = value.strip(b" \t")
            if 0 < len(value) <= max_length and _SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


def edge_record(scope: dict, max_length: int) -> dict:
    """The request's record in its scope (EDGE_RECORD), made on first use: by the Edge, or by the parser when it
    refuses the body before the app has run (both in one read of the socket)."""
    record = scope.get(EDGE_RECORD)
    if record is None:
        record = scope[EDGE_RECORD] = {"request_id": request_id_from(scope["headers"], max_length),
                                       "model_version": None, "parser_refused": None, "client_gone": False,
                                       "relayed": False, "busy_cap": None}
    return record


def _log_line(client: str | None, method: str, route: str, status: int, bytes_in: int, seconds: float,
              request_id: str, model_version: str | None) -> None:
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "client": client, "method": method,
            "route": route, "status": status, "bytes_in": bytes_in, "latency_ms": round(seconds * 1000, 2),
            "request_id": request_id, "model_version": model_version}))


class Edge:
    def __init__(self, app, request_id_max_length: int, metrics: Metrics | None):
        self.app = app
        self.max_length = request_id_max_length
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        context = edge_record(scope, self.max_length)
        request_id = context["request_id"]
        token = CURRENT.set(context)
        id_header = (b"x-request-id", request_id.encode())
        status, busy, bytes_in, response_started = 500, False, 0, False

        async def counting_receive():
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def tagging_send(message):
            nonlocal status, busy, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                raw = list(message.get("headers", ()))
                busy = status == 503 and any(name.lower() == b"retry-after" for name, _ in raw)
                message = {**message, "headers": [*raw, id_header]}
            await send(message)

        metrics = self.metrics
        try:
            await self.app(scope, counting_receive, tagging_send)
        except Exception as err:
            if isinstance(err, (ClientDisconnect, ConnectionError)):
                # The client went away mid-request: its business, not an error of the adapter's.
                if context["parser_refused"] is None:  # (else the parser closed it, and logged why)
                    log.info("client gone during %s %s: %s", scope["method"], shown_path(scope["path"]),
                             type(err).__name__)
                    if not response_started:  # nobody to answer: counted and logged apart from bad requests
                        status = CLIENT_GONE
            else:
                log.exception("unexpected error on %s %s", scope["method"], shown_path(scope["path"]))
            # Starlette's last-resort 500 is sent outside this middleware: without an id. Send it here.
            if not response_started and status != CLIENT_GONE:
                body = json.dumps({"error": "Internal error in the adapter; see its log."}).encode()
                await tagging_send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            CURRENT.reset(token)
            seconds = time.perf_counter() - started
            route = route_label(scope["path"])
            parser_refused = context["parser_refused"]
            if parser_refused is not None:  # the answer the client got
                status = parser_refused
            elif context["client_gone"]:  # the app answered, to nobody
                status = CLIENT_GONE
            if metrics:
                metrics.answered(route, status, seconds, busy, parser_refused is not None, context["relayed"],
                                 context["busy_cap"])
            _log_line(client_host(scope), scope["method"], route, status, bytes_in, seconds, request_id,
                      context["model_version"])


def refused_before_app(metrics: Metrics | None, request_id_max_length: int, status: int, headers=(),
                       scope: dict | None = None, peer: str | None = None) -> list[tuple[bytes, bytes]]:
    """adapter/protocol.py refused a request at the parser: count and log it; its answer's headers.
    ``headers``: the request's, as far as parsed (its X-Request-ID); ``scope``: the request's, when the app
    has it (its body broke mid-stream): the Edge records it then, with this status and its own id;
    ``peer``: the socket's peer (no X-Forwarded-For is read before the app)."""
    if scope is not None:
        record = edge_record(scope, request_id_max_length)
        record["parser_refused"] = status
        return [(b"x-request-id", record["request_id"].encode())]
    request_id = request_id_from(headers, request_id_max_length)
    if metrics:
        metrics.refused_before_app(status)
    _log_line(peer, "-", "other", status, 0, 0.0, request_id, None)
    return [(b"x-request-id", request_id.encode())]


# Line breaks (those Python's splitlines sees too) and other control characters.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class AccessLogFormatter(logging.Formatter):
    """The access lines as they are (one JSON object each); every other record in the plain format, on a line
    of its own: client text in it (a path, a header) has its line breaks and control characters escaped
    (\\n, \\x1b), and a traceback's lines are indented. A path of ``/x%0A{...}`` wrote a line of its own that
    ``grep '^{'`` read as an access record: only access records start a line with ``{``. A record logged while
    a request is answered (a retry, a model server not reachable, a refusal) ends with ``(request ID)``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == access_log.name:
            return record.getMessage()
        return super().format(record).replace("\n", "\n  ")  # (the message's own were escaped: a traceback's)

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        # An exception's message may hold a client's text too (\r, \x1b): escaped line by line, breaks kept.
        return "\n".join(_escaped(line) for line in super().formatException(ei).split("\n"))

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        text = super().formatMessage(record)
        # Logged while answering a request (the same task, so its context): named, to follow one request.
        if (current := CURRENT.get()) is not None:
            text += f" (request {current['request_id']})"
        return _escaped(text)
