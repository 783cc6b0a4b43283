"""Talking to a model server over HTTP, whichever it is (TorchServe: adapter/torchserve.py; an Open
Inference Protocol server: adapter/oip.py): the pooled connections and their wait (503 busy), one
deadline around a prediction (504), a non-200 answer into the ClassifyError the adapter's caller
sees, the failure counter, and /health's proof that the model answers (SilenceProbe, PROBE_IMAGE).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import re
import struct
import time
import zlib
from dataclasses import dataclass
from functools import partial

import aiohttp

from serving.fair_pool import FairPlaces
from serving.throttled_log import ThrottledLog

from .config import Settings
from .errors import ClassifyError
from .limits import waiting_for_model_server
from .metrics import Metrics
from .request_context import note_busy

log = logging.getLogger("adapter.model_server")
MODEL_SERVER_REFUSALS = ThrottledLog(log)  # its 503s: a full queue answers many at once


def named_engine(answer: dict, last: str | None) -> str | None:
    """The forward pass an answer names (handler/engine.py), else the last one named: /health's engine."""
    return answer.get("engine") or last


def _tiny_png() -> bytes:
    """A valid 1x1 grey PNG: /health's probe asks the model to classify it (a real prediction)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


PROBE_IMAGE = _tiny_png()


class SilenceProbe:
    """/health's proof that the model answers, for either client (TorchServe's, adapter/oip.py's): when no
    prediction has succeeded for HEALTH_MAX_SILENCE_S, one prediction of PROBE_IMAGE (``send_probe``:
    an awaitable giving the response), shared by the /health callers meanwhile. Ready workers that are
    stopped or wedged answer nothing: 503. ``read_answer`` (the client's reading of a 200: ClassifyError
    when a request would get a 502 for it) judges the probe's answer as every prediction's is judged."""

    def __init__(self, settings: Settings, send_probe, read_answer):
        self.settings, self.send_probe, self.read_answer = settings, send_probe, read_answer
        self.last_answer_at = 0.0  # time.monotonic() of the last answer (a prediction's or the probe's)
        self._probe: asyncio.Future | None = None

    def answered(self) -> None:
        self.last_answer_at = time.monotonic()

    async def check(self) -> float:
        """Seconds since the last answer, after a probe when that was too long ago (ClassifyError 503)."""
        if time.monotonic() - self.last_answer_at > self.settings.health_max_silence_s:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._probe_prediction())
            # Many /health callers share one probe; shielded: one caller leaving does not cancel it.
            await asyncio.shield(self._probe)
        return round(time.monotonic() - self.last_answer_at, 3)

    async def _probe_prediction(self) -> None:
        timeout_s = self.settings.health_timeout_s
        silent = ("no prediction has succeeded for over "
                  f"{self.settings.health_max_silence_s:g} s and a test prediction")
        try:
            async with asyncio.timeout(timeout_s):
                response = await self.send_probe()
        except TRANSPORT_ERRORS:
            raise ClassifyError(503, f"The model is not answering: {silent} got no answer within "
                                     f"{timeout_s:g} s.") from None
        if response.status_code != 200:
            raise ClassifyError(503, f"The model is not answering: {silent} failed "
                                     f"({response.status_code}).")
        try:
            self.read_answer(response)  # (answered() when it is an answer)
        except ClassifyError as err:  # NaN probabilities, no prediction: every prediction would be a 502
            raise ClassifyError(503, f"The model is not answering: {silent} got a bad answer: {err.message}") from None


@dataclass(frozen=True, slots=True)
class Response:
    """A model server's answer, read whole once: the connection goes back to the pool before we look at it."""
    status_code: int
    content: bytes
    reason_phrase: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self):
        """The body as JSON, strictly: ValueError (JSONDecodeError, UnicodeDecodeError) if not JSON, and for NaN
        or infinity, which Python's json reads but the adapter cannot send on (a bad answer, not a number)."""
        return json.loads(self.content, parse_constant=_not_a_number, parse_float=_finite_float)


def _not_a_number(word: str):
    raise ValueError(f"{word} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999
        raise ValueError(f"{text} is out of a float's range")
    return number


class PoolBusy(Exception):
    """Every pooled connection stayed in use for longer than the wait allowed."""


def pool_busy_error(settings: Settings) -> ClassifyError:
    """PoolBusy's answer: the model server is slow, not down: a later try may pass (Retry-After)."""
    note_busy("model_server_connections")
    return ClassifyError(503, "The model server is busy: too many requests are waiting. Try again shortly.",
                         {"Retry-After": str(settings.retry_after_s)})


# True while the current task waits for a pooled connection: a deadline around the whole call (a
# prediction's, its retry included) that runs out then means "busy" (503), not "too slow" (504).
_WAITING_FOR_SLOT: contextvars.ContextVar[bool] = contextvars.ContextVar("waiting_for_slot", default=False)


class Pool:
    """One API's pooled aiohttp session, plus its connections shared fairly among clients.

    aiohttp has no pool timeout of its own: its `connect` timeout lumps waiting for a free pooled
    connection together with opening a new one, and both raise the same ConnectionTimeoutError.
    To tell "busy" (503, try again) from "not reachable" honestly, the waiting happens here, for one of
    as many places as the connector's limit (serving/fair_pool.py FairPlaces: a freed one goes to the
    waiting client holding the fewest, not to the oldest request): a request that holds a place always
    finds a connection in aiohttp's pool (each request holds at most one, released when its body is read),
    so aiohttp's own `connect` timeout only ever times DNS + TCP connect, like httpx's did.
    """

    def __init__(self, base_url: str, limit: int, wait_s: float, timeout: aiohttp.ClientTimeout,
                 latency=None, hold_s: float = 0.0):
        self.base_url = base_url.rstrip("/")
        self.wait_s = wait_s
        # A call given up on (its deadline, its task cancelled) keeps its slot this long: the model server still
        # holds the request (queued or in a batch), and its queue must not get more than the pool's size.
        self.hold_s = hold_s
        self.latency = latency  # a Prometheus histogram of each call's seconds by call (MODEL_SERVER_CALLS), or None
        self._places = FairPlaces(limit)
        # Needs the running event loop: the adapter builds its client in the app's lifespan.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit), timeout=timeout,
            # httpx sent a raw body without a Content-Type; aiohttp would add application/octet-stream.
            # Keep the request TorchServe sees unchanged.
            skip_auto_headers=("Content-Type",))

    async def request(self, method: str, path: str, headers: dict[str, str],
                      data: bytes | None = None, call: str = "prediction") -> Response:
        """One call; ``call`` (MODEL_SERVER_CALLS) names it in the latency histogram."""
        _WAITING_FOR_SLOT.set(True)
        try:
            # (it may give way meanwhile; its turn comes in its client's line)
            async with waiting_for_model_server() as client, asyncio.timeout(self.wait_s):
                await self._places.take(client)
        except TimeoutError:
            raise PoolBusy() from None
        _WAITING_FOR_SLOT.set(False)
        started, release = time.perf_counter(), partial(self._places.give_back, client)
        try:
            async with self.session.request(method, self.base_url + path, headers=headers,
                                            data=data) as response:
                return Response(response.status, await response.read(), response.reason or "")
        except (asyncio.CancelledError, asyncio.TimeoutError) as err:
            if self.hold_s > 0 and not isinstance(err, aiohttp.ConnectionTimeoutError):  # (that one never got there)
                asyncio.get_running_loop().call_later(self.hold_s, release)
                release = None
            raise
        finally:
            if release is not None:
                release()
            if self.latency is not None:
                self.latency.labels(call).observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self.session.close()


@contextlib.asynccontextmanager
async def prediction_deadline(seconds: float):
    """One deadline around a whole prediction (its retry and its waits for a pooled connection included):
    TimeoutError (-> 504) when it runs out, or PoolBusy (-> 503 busy) when it runs out while the
    request still waits for a connection (the pool's own wait is as long but starts later)."""
    _WAITING_FOR_SLOT.set(False)  # (left set by an earlier call of this task that the pool refused)
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        if _WAITING_FOR_SLOT.get():
            raise PoolBusy() from None
        raise


def answer_error(response: Response, settings: Settings) -> ClassifyError:
    """A model server's non-200 answer to a prediction -> what the adapter's client gets (TorchServe
    and an Open Inference Protocol server alike). A 5xx that wraps a client error (KServe's wrapper)
    becomes that 4xx; no internal URL or exception name reaches the client (the log has them)."""
    status, message = _unwrapped(response)
    message = _URL.sub("(internal address)", message)
    if status == 404:
        return ClassifyError(503, f"The model '{settings.model_name}' is not loaded on the model server.")
    if status == 413:
        # The handler says why (too many pixels); TorchServe's own size refusal has no body.
        return ClassifyError(413, message if message and response.content.strip() else
                             "The image is larger than the model server accepts.", relayed=True)
    if status == 503:
        # Its queue full, or no worker up (TorchServe says "no worker" for both, with advice for its operator):
        # a later try may pass. Its own words go to the log, once a second at most.
        MODEL_SERVER_REFUSALS.warning("the model server answered 503: %s", message)
        return ClassifyError(503, "The model server is busy or has no worker ready; try again shortly.",
                             {"Retry-After": str(settings.retry_after_s)}, relayed=True)
    if 400 <= status < 500:
        # The handler refused this image (not an image, empty, ...): pass its verdict on.
        return ClassifyError(status, message or f"The model server refused the request ({status}).", relayed=True)
    log.warning("the model server answered %d: %s", status, message)
    return ClassifyError(502, f"The model server failed ({status}); the adapter's log has the details.")


# KServe's model server (TorchServe's KServe wrapper) answers a 4xx of the server behind it as
# 500 {"error": "HTTPStatusError : <that server's error>, '400 Bad Request' for url '<pod-internal URL>'"}.
_WRAPPED_4XX = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\s*:\s*)?(?P<inner>.*?),?\s*'(?P<code>4\d\d) [^']*' for url '[^']*'",
                          re.DOTALL)
_URL = re.compile(r"\b\w+://\S+")


def _unwrapped(response: Response) -> tuple[int, str]:
    """(status, message) of a model server's answer: a client error wrapped in a 5xx (KServe's) as that 4xx; the
    message cut to MESSAGE_KEPT characters once the wrapper's tail was read."""
    status, message = response.status_code, error_message(response, kept=None)
    status, message = _wrapped_client_error(status, message, response) or (status, message)
    return status, message[:MESSAGE_KEPT]


def _wrapped_client_error(status: int, message: str, response: Response) -> tuple[int, str] | None:
    """(4xx, clean message) when a model server's answer wraps a client error, else None:
    the wrapper's 500 around the handler's 4xx, or FastAPI's 422 {"detail": [...]}."""
    if status == 422:
        try:
            first = response.json()["detail"][0]
            where = validation_error_at(first)
            return 400, f"The model server could not read the request: {first['msg']}" + (f" ({where})" if where else "")
        except (ValueError, LookupError, TypeError, AttributeError):
            # KServe's predictor (handler/kserve_predictor.py) answers its 422 as {"error": ...}, without the body.
            said = error_message(response) if _has_error_key(response) else ""
            return 400, "The model server could not read the request" + (f": {said}" if said else ".")
    if status < 500 or (match := _WRAPPED_4XX.match(message)) is None:
        return None
    inner = match["inner"].strip()
    if inner.startswith("{") and (quoted := re.search(r"'message': '([^']*)'", inner)):
        inner = quoted[1]  # TorchServe's own {"code", "type", "message"} error, printed as a dict
    inner = _URL.sub("(internal address)", inner).strip()
    return int(match["code"]), inner


def validation_error_at(error: dict) -> str:
    """Where in the body a FastAPI validation error (422) is: its loc past "body" ("inputs.0.shape"), or ""."""
    return ".".join(str(part) for part in error.get("loc", ()) if part != "body")


def _has_error_key(response: Response) -> bool:
    try:
        return isinstance(response.json().get("error"), str)
    except (ValueError, AttributeError):
        return False


# Characters of a model server's error message kept (passed on, logged): the handler's own are under 300; a
# server that sends megabytes of it must not make log lines and answers of that size.
MESSAGE_KEPT = 1000


def error_message(response: Response, kept: int | None = MESSAGE_KEPT) -> str:
    """TorchServe's own errors are {"code", "type", "message"}; the handler's are {"error": ...}; cut to ``kept``
    characters (None: whole)."""
    text = response.text.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key][:kept]
    if text:
        return text[:kept]
    return response.reason_phrase or f"HTTP {response.status_code}"


# What talking to a model server can raise besides an HTTP answer. asyncio.TimeoutError: aiohttp's
# `total` timeout surfaces as a bare one.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, PoolBusy)
# Connection errors of a request that never reached the model server (its connect refused or unanswered): not
# sent again, as one reset or dropped mid-answer is (a worker died under it; a pooled connection it had closed).
NEVER_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def count_failure(metrics: Metrics | None, error: ClassifyError, cause: Exception | Response) -> None:
    """adapter_model_server_errors_total{kind} for a failed prediction (TorchServe or OIP): ``cause``
    is the transport error, or the model server's answer."""
    if metrics is None:
        return
    if isinstance(cause, Response):
        if error.status_code == 502:
            kind = "bad_answer" if cause.status_code == 200 else "error_answer"
        elif error.status_code == 503 and (status := _unwrapped(cause)[0]) in (503, 404):
            kind = "unavailable" if status == 503 else "no_model"  # (answer_error's two 503s)
        else:
            return  # a 4xx is the image's fault (an OIP server without explanations: 501, its setup)
    elif isinstance(cause, PoolBusy):
        kind = "busy"
    elif isinstance(cause, asyncio.TimeoutError) and not isinstance(cause, aiohttp.ConnectionTimeoutError):
        kind = "timeout"
    else:
        kind = "unreachable"
    metrics.model_server_errors.labels(kind).inc()
