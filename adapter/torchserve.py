"""Talking to TorchServe: one prediction, the model's status, and the token keys they need.

One pooled `aiohttp.ClientSession` per API (inference, management) lives for the adapter's lifetime,
so requests reuse keep-alive connections instead of paying a TCP connect each time. aiohttp rather
than httpx because the upstream client is the adapter's main CPU cost per request (a tenth of
httpx's: benchmarks/RESULTS.md).

TorchServe failures become ClassifyError with the status the adapter's caller should see:
    TorchServe down / refusing connections ........ 503
    no pooled connection free in time (busy) ...... 503
    model not registered / no worker ready (404, 503) 503
    slower than TS_PREDICT_TIMEOUT_S .............. 504
    the image refused by the handler (4xx) ........ same 4xx, with the handler's message
    the handler or TorchServe broke (5xx) ......... 502
A prediction whose batch died with its worker (TorchServe answers 507 "Worker died.") or whose
connection broke is sent once more (classification is idempotent), within the same deadline.
No internal address or path is put in a message a client sees; the log has them.
Token keys expire and change when TorchServe restarts: on an auth refusal the key file is read
again, and if it still holds the refused key the API key renews it; then the request is retried once.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import struct
import time
import zlib
from dataclasses import dataclass

import aiohttp
# Only for KeyFile.renew's errors: serving/keys.py renews keys with httpx (synchronously, rarely).
import httpx

from serving.keys import KeyFile, KeyFileError

from .config import Settings
from .errors import ClassifyError
from .metrics import Metrics
from .request_context import note_model_version, request_id_header

log = logging.getLogger("adapter.torchserve")

# httpx's default pool size, which the management API had before: it only serves /health checks.
MANAGEMENT_MAX_CONNECTIONS = 100


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
    stopped or wedged answer nothing: 503."""

    def __init__(self, settings: Settings, send_probe):
        self.settings, self.send_probe = settings, send_probe
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
        except _TRANSPORT_ERRORS:
            raise ClassifyError(503, f"The model is not answering: {silent} got no answer within "
                                     f"{timeout_s:g} s.") from None
        if response.status_code != 200:
            raise ClassifyError(503, f"The model is not answering: {silent} failed "
                                     f"({response.status_code}).")
        self.answered()


@dataclass(frozen=True, slots=True)
class _Response:
    """TorchServe's answer, read whole once: the connection goes back to the pool before we look at it."""
    status_code: int
    content: bytes
    reason_phrase: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.content)  # ValueError (JSONDecodeError, UnicodeDecodeError) if not JSON


class _PoolBusy(Exception):
    """Every pooled connection stayed in use for longer than the wait allowed."""


# True while the current task waits for a pooled connection: a deadline around the whole call (a
# prediction's, its retry included) that runs out then means "busy" (503), not "too slow" (504).
_WAITING_FOR_SLOT: contextvars.ContextVar[bool] = contextvars.ContextVar("waiting_for_slot", default=False)


class _Pool:
    """One API's pooled aiohttp session, plus a count of its free connections.

    aiohttp has no pool timeout of its own: its `connect` timeout lumps waiting for a free pooled
    connection together with opening a new one, and both raise the same ConnectionTimeoutError.
    To tell "busy" (503, try again) from "not reachable" honestly, the waiting happens here, on a
    semaphore as large as the connector's limit: a request that holds a slot always finds a
    connection in aiohttp's pool (each request holds at most one, released when its body is read),
    so aiohttp's own `connect` timeout only ever times DNS + TCP connect, like httpx's did.
    """

    def __init__(self, base_url: str, limit: int, wait_s: float, timeout: aiohttp.ClientTimeout,
                 latency=None):
        self.base_url = base_url.rstrip("/")
        self.wait_s = wait_s
        self.latency = latency  # a Prometheus histogram of each call's seconds, or None
        self._slots = asyncio.Semaphore(limit)
        # Needs the running event loop: the adapter builds its client in the app's lifespan.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit), timeout=timeout,
            # httpx sent a raw body without a Content-Type; aiohttp would add application/octet-stream.
            # Keep the request TorchServe sees unchanged.
            skip_auto_headers=("Content-Type",))

    async def request(self, method: str, path: str, headers: dict[str, str],
                      data: bytes | None = None) -> _Response:
        _WAITING_FOR_SLOT.set(True)
        try:
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise _PoolBusy() from None
        _WAITING_FOR_SLOT.set(False)
        started = time.perf_counter()
        try:
            async with self.session.request(method, self.base_url + path, headers=headers,
                                            data=data) as response:
                return _Response(response.status, await response.read(), response.reason or "")
        finally:
            self._slots.release()
            if self.latency is not None:
                self.latency.observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self.session.close()


@contextlib.asynccontextmanager
async def prediction_deadline(seconds: float):
    """One deadline around a whole prediction (its retry and its waits for a pooled connection included):
    TimeoutError (-> 504) when it runs out, or _PoolBusy (-> 503 busy) when it runs out while the
    request still waits for a connection (the pool's own wait is as long but starts later)."""
    _WAITING_FOR_SLOT.set(False)  # (left set by an earlier call of this task that the pool refused)
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        if _WAITING_FOR_SLOT.get():
            raise _PoolBusy() from None
        raise


def answer_error(response: _Response, model_name: str) -> ClassifyError:
    """A model server's non-200 answer to a prediction -> what the adapter's client gets (TorchServe
    and an Open Inference Protocol server alike). A 5xx that wraps a client error (KServe's wrapper)
    becomes that 4xx; no internal URL or exception name reaches the client (the log has them)."""
    status, message = response.status_code, _error_message(response)
    wrapped = _wrapped_client_error(status, message, response)
    if wrapped is not None:
        status, message = wrapped
    message = _URL.sub("(internal address)", message)
    if status == 404:
        return ClassifyError(503, f"The model '{model_name}' is not loaded on the model server.")
    if status == 413:
        # The handler says why (too many pixels); TorchServe's own size refusal has no body.
        return ClassifyError(413, message if message and response.content.strip() else
                             "The image is larger than the model server accepts.")
    if status == 503:
        return ClassifyError(503, f"The model is not ready: {message}")
    if 400 <= status < 500:
        # The handler refused this image (not an image, empty, ...): pass its verdict on.
        return ClassifyError(status, message or f"The model server refused the request ({status}).")
    log.warning("the model server answered %d: %s", status, message)
    return ClassifyError(502, f"The model server failed ({status}); the adapter's log has the details.")


# KServe's model server (TorchServe's KServe wrapper) answers a 4xx of the server behind it as
# 500 {"error": "HTTPStatusError : <that server's error>, '400 Bad Request' for url '<pod-internal URL>'"}.
_WRAPPED_4XX = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\s*:\s*)?(?P<inner>.*?),?\s*'(?P<code>4\d\d) [^']*' for url '[^']*'",
                          re.DOTALL)
_URL = re.compile(r"\b\w+://\S+")


def _wrapped_client_error(status: int, message: str, response: _Response) -> tuple[int, str] | None:
    """(4xx, clean message) when a model server's answer wraps a client error, else None:
    the wrapper's 500 around the handler's 4xx, or FastAPI's 422 {"detail": [...]}."""
    if status == 422:
        try:
            first = response.json()["detail"][0]
            where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
            return 400, f"The model server could not read the request: {first['msg']}" + (f" ({where})" if where else "")
        except (ValueError, LookupError, TypeError, AttributeError):
            return 400, "The model server could not read the request."
    if status < 500 or (match := _WRAPPED_4XX.match(message)) is None:
        return None
    inner = match["inner"].strip()
    if inner.startswith("{") and (quoted := re.search(r"'message': '([^']*)'", inner)):
        inner = quoted[1]  # TorchServe's own {"code", "type", "message"} error, printed as a dict
    inner = _URL.sub("(internal address)", inner).strip()
    return int(match["code"]), inner


def _error_message(response: _Response) -> str:
    """TorchServe's own errors are {"code", "type", "message"}; the handler's are {"error": ...}."""
    text = response.text.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
    if text:
        return text[:300]
    return response.reason_phrase or f"HTTP {response.status_code}"


def _worker_lost(response: _Response) -> bool:
    """TorchServe's answer when the batch's worker died or was restarted under it: 0.12 answers the
    batch's requests 507 when its worker process is killed (seen in its access log), 500/503 for a
    worker that failed or is restarting. The image itself was not refused, so it may be resent."""
    return response.status_code in (500, 502, 503, 507)


def _is_auth_refusal(response: _Response) -> bool:
    # TorchServe 0.12 answers a missing/expired/wrong key with 400 InvalidKeyException, not 401.
    if response.status_code == 401:
        return True
    return response.status_code == 400 and "InvalidKeyException" in response.text


# What talking to TorchServe can raise besides an HTTP answer. asyncio.TimeoutError: aiohttp's
# `total` timeout surfaces as a bare one.
_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, _PoolBusy)


def count_failure(metrics: Metrics | None, error: ClassifyError, cause: Exception | _Response) -> None:
    """adapter_model_server_errors_total{kind} for a failed prediction (TorchServe or OIP): ``cause``
    is the transport error, or the model server's answer."""
    if metrics is None:
        return
    if isinstance(cause, _Response):
        if error.status_code != 502:
            return  # a 4xx is the image's fault; a 503 "not ready" is /health's to report
        kind = "bad_answer" if cause.status_code == 200 else "error_answer"
    elif isinstance(cause, _PoolBusy):
        kind = "busy"
    elif isinstance(cause, asyncio.TimeoutError) and not isinstance(cause, aiohttp.ConnectionTimeoutError):
        kind = "timeout"
    else:
        kind = "unreachable"
    metrics.model_server_errors.labels(kind).inc()


class TorchServeClient:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.keys = KeyFile(settings.key_file)
        self._renew_lock = asyncio.Lock()
        self.engine: str | None = None  # the forward pass the last answer came from (handler/engine.py)
        self.silence = SilenceProbe(settings, self._send_probe)  # /health: does the model answer?
        s = settings
        # Timeouts: `total` bounds a whole prediction (-> 504), `connect` the DNS + TCP connect (-> 503
        # not reachable); the wait for a free pooled connection is _Pool's (-> 503 busy), bounded like
        # httpx's pool timeout was: by the prediction timeout, or the health timeout for management.
        self._inference = _Pool(s.inference_url, s.max_connections, s.predict_timeout_s,
                                aiohttp.ClientTimeout(total=s.predict_timeout_s, connect=s.connect_timeout_s),
                                metrics.model_server_latency if metrics else None)
        self._management = _Pool(s.management_url, MANAGEMENT_MAX_CONNECTIONS, s.health_timeout_s,
                                 aiohttp.ClientTimeout(total=s.health_timeout_s, connect=s.connect_timeout_s))

    async def aclose(self) -> None:
        try:
            await self._inference.close()
        finally:
            await self._management.close()

    # --- keys -----------------------------------------------------------------------------
    def _auth_header(self, kind: str) -> dict[str, str]:
        # No key file: TorchServe is not running here, or runs with token auth off. Send no key and
        # let TorchServe's answer decide.
        try:
            return self.keys.header(kind)
        except KeyFileError:
            return {}

    async def _fresh_auth_header(self, kind: str, refused: dict[str, str]) -> dict[str, str]:
        """A key other than the refused one: re-read the file, else renew with the API key."""
        async with self._renew_lock:  # many requests refused at once renew once
            header = self._auth_header(kind)
            if header and header != refused:
                return header
            try:
                await asyncio.to_thread(self.keys.renew, self.settings.management_url, kind,
                                        self.settings.health_timeout_s)
            except (KeyFileError, httpx.HTTPError) as err:
                log.warning("could not renew the TorchServe %s key: %s", kind, err)
                return header
            return self._auth_header(kind)

    async def _send(self, pool: _Pool, kind: str, method: str, path: str,
                    data: bytes | None = None) -> _Response:
        refused = self._auth_header(kind)
        response = await pool.request(method, path, {**refused, **request_id_header()}, data)
        if not _is_auth_refusal(response):
            return response
        fresh = await self._fresh_auth_header(kind, refused=refused)
        if fresh and fresh != refused:
            response = await pool.request(method, path, {**fresh, **request_id_header()}, data)
        if _is_auth_refusal(response):
            log.error("TorchServe refused the %s key: is TS_KEY_FILE (%s) the running TorchServe's?",
                      kind, self.keys.path)
            raise ClassifyError(503, f"The model server refused the adapter's {kind} key; see the adapter's log.")
        return response

    def _unreachable(self, err: Exception, url: str) -> ClassifyError:
        if isinstance(err, _PoolBusy):
            return ClassifyError(503, "The model server is busy: too many requests are waiting. Try again shortly.")
        # ConnectionTimeoutError (a TimeoutError too): the TCP connect took longer than
        # TS_CONNECT_TIMEOUT_S, i.e. nobody answers at that address: "not reachable", below.
        # Any other timeout is the `total` one (or a socket read): TorchServe too slow.
        if isinstance(err, asyncio.TimeoutError) and not isinstance(err, aiohttp.ConnectionTimeoutError):
            return ClassifyError(504, f"The model server took longer than {self.settings.predict_timeout_s:g} s to answer.")
        # Refused, reset, disconnected mid-answer (aiohttp.ClientError): TorchServe is down or restarting.
        log.warning("TorchServe not reachable at %s: %s", url, err)
        return ClassifyError(503, "The model server is not reachable (is TorchServe running?).")

    # --- API --------------------------------------------------------------------------------
    async def _predict_response(self, image: bytes, path: str) -> _Response:
        """One image's answer, sent again once if its worker died under it; within TS_PREDICT_TIMEOUT_S."""
        # A raw body (not multipart): the handler reads it as the request's `body`.
        async with prediction_deadline(self.settings.predict_timeout_s):
            try:
                response = await self._send(self._inference, "inference", "POST", path, data=image)
                if not _worker_lost(response):
                    return response
                log.warning("retrying a prediction once: TorchServe answered %d %s", response.status_code,
                            _error_message(response))
            except aiohttp.ClientConnectionError as err:  # reset or disconnected mid-answer
                if isinstance(err, aiohttp.ConnectionTimeoutError):
                    raise
                log.warning("retrying a prediction once: %s", err)
            if self.metrics is not None:
                self.metrics.retries.inc()
            return await self._send(self._inference, "inference", "POST", path, data=image)

    async def predict(self, image: bytes, explain: bool = False) -> dict:
        """TorchServe's answer for one image: {"prediction", "label", "index", "probability", "topk", ...}.

        ``explain``: ask TorchServe's explanations API instead; the answer adds a Grad-CAM "heatmap".
        """
        path = f"/{'explanations' if explain else 'predictions'}/{self.settings.model_name}"
        try:
            response = await self._predict_response(image, path)
        except _TRANSPORT_ERRORS as err:
            error = self._unreachable(err, self.settings.inference_url)
            count_failure(self.metrics, error, err)
            raise error from None
        try:
            answer = self._answer(response, explain)
        except ClassifyError as error:
            count_failure(self.metrics, error, response)
            raise
        note_model_version(answer.get("model_version"))
        return answer

    def _answer(self, response: _Response, explain: bool) -> dict:
        if response.status_code == 200:
            self.silence.answered()
            try:
                answer = response.json()
            except ValueError:
                raise ClassifyError(502, "The model server sent an answer that is not JSON.") from None
            if not isinstance(answer, dict) or not isinstance(answer.get("label") or answer.get("prediction"), str):
                raise ClassifyError(502, "The model server's answer has no prediction.")
            if explain and not isinstance(answer.get("heatmap"), str):
                raise ClassifyError(502, "The model server's answer has no heatmap.")
            self.engine = answer.get("engine", self.engine)
            return answer
        raise answer_error(response, self.settings.model_name)

    async def health(self) -> dict:
        """model_status(), plus a real prediction of a tiny image when none succeeded for
        HEALTH_MAX_SILENCE_S (SilenceProbe)."""
        status = await self.model_status()
        status["last_answer_s_ago"] = await self.silence.check()
        status["engine"] = self.engine
        return status

    async def _send_probe(self) -> _Response:
        response = await self._send(self._inference, "inference", "POST", f"/predictions/{self.settings.model_name}",
                                    data=PROBE_IMAGE)
        if response.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError):
                self.engine = response.json().get("engine", self.engine)
        return response

    async def model_status(self) -> dict:
        """{"model", "archive_version", "workers_ready", "workers"} or ClassifyError(503) when not ready."""
        path = f"/models/{self.settings.model_name}"
        try:
            response = await self._send(self._management, "management", "GET", path)
        except _TRANSPORT_ERRORS as err:
            error = self._unreachable(err, self.settings.management_url)
            raise ClassifyError(503, error.message) from None
        if response.status_code == 404:
            raise ClassifyError(503, f"The model '{self.settings.model_name}' is not registered on the model server.")
        if response.status_code != 200:
            raise ClassifyError(503, f"The model server's status check failed: {_error_message(response)}")
        try:
            description = response.json()[0]
            workers = description.get("workers", [])
        except (ValueError, LookupError, AttributeError, TypeError):
            raise ClassifyError(503, "The model server's status answer is unreadable.") from None
        ready = sum(1 for worker in workers if worker.get("status") == "READY")
        status = {"model": self.settings.model_name, "archive_version": description.get("modelVersion"),
                  "workers_ready": ready, "workers": len(workers)}
        if ready == 0:
            raise ClassifyError(503, f"The model '{self.settings.model_name}' has no worker ready yet "
                                     f"({len(workers)} starting or failed).")
        return status
