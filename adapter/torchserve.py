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
A prediction whose batch died with its worker (TorchServe answers 507, or 500 "Worker died.") or whose
connection broke is sent once more (classification is idempotent), within the same deadline; a 503
(TorchServe's queue full, or no worker up) is not.
No internal address or path is put in a message a client sees; the log has them.
Token keys expire and change when TorchServe restarts: on an auth refusal the key file is read
again, and if it still holds the refused key the API key renews it; then the request is retried once.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
# Only for KeyFile.renew's errors: serving/keys.py renews keys with httpx (synchronously, rarely).
import httpx

from serving.keys import KeyFile, KeyFileError, is_auth_refusal

from .config import Settings
from .errors import ClassifyError
from .metrics import Metrics
from .model_server import (NEVER_CONNECTED, PROBE_IMAGE, TRANSPORT_ERRORS, Pool, PoolBusy, Response, SilenceProbe,
                           answer_error, count_failure, error_message, named_engine, pool_busy_error,
                           prediction_deadline)
from .request_context import note_model_version, request_id_header

log = logging.getLogger("adapter.torchserve")


class KeyRefused(ClassifyError):
    """TorchServe refused the adapter's key, a renewed one too (TS_KEY_FILE is not the running TorchServe's)."""


# httpx's default pool size, which the management API had before: it only serves /health checks.
MANAGEMENT_MAX_CONNECTIONS = 100


def _worker_lost(response: Response) -> bool:
    """TorchServe's answer when the batch's worker died under it: 0.12 answers the batch's requests 507
    when its worker process is killed (seen in its access log), 500 "Worker died." when it was restarted
    mid-batch. The image itself was not refused, so it may be resent. Not a 503: TorchServe's queue is full
    or no worker is up, and the same request sent again at once only doubles the load (88 such resends
    in the review's run)."""
    return response.status_code == 507 or (response.status_code >= 500 and error_message(response) == "Worker died.")


class TorchServeClient:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.keys = KeyFile(settings.key_file)
        self._renew_lock = asyncio.Lock()
        self.engine: str | None = None  # the forward pass the last answer came from (handler/engine.py)
        self.silence = SilenceProbe(settings, self._send_probe, lambda response: self._answer(response, False))
        s = settings
        # Timeouts: `total` bounds a whole prediction (-> 504), `connect` the DNS + TCP connect (-> 503
        # not reachable); the wait for a free pooled connection is Pool's (-> 503 busy), bounded like
        # httpx's pool timeout was: by the prediction timeout, or the health timeout for management.
        self._inference = Pool(s.inference_url, s.max_connections, s.predict_timeout_s,
                                aiohttp.ClientTimeout(total=s.predict_timeout_s, connect=s.connect_timeout_s),
                                metrics.model_server_latency if metrics else None,
                                s.model_server_hold_s())
        self._management = Pool(s.management_url, MANAGEMENT_MAX_CONNECTIONS, s.health_timeout_s,
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

    async def _send(self, pool: Pool, kind: str, method: str, path: str,
                    data: bytes | None = None, call: str = "prediction") -> Response:
        refused = self._auth_header(kind)
        response = await pool.request(method, path, {**refused, **request_id_header()}, data, call)
        if not is_auth_refusal(response.status_code, response.text):
            return response
        fresh = await self._fresh_auth_header(kind, refused=refused)
        if fresh and fresh != refused:
            response = await pool.request(method, path, {**fresh, **request_id_header()}, data, call)
        if is_auth_refusal(response.status_code, response.text):
            log.error("TorchServe refused the %s key: is TS_KEY_FILE (%s) the running TorchServe's?",
                      kind, self.keys.path)
            raise KeyRefused(503, f"The model server refused the adapter's {kind} key; see the adapter's log.")
        return response

    def _unreachable(self, err: Exception, url: str) -> ClassifyError:
        if isinstance(err, PoolBusy):
            return pool_busy_error(self.settings)
        # ConnectionTimeoutError (a TimeoutError too): the TCP connect took longer than
        # TS_CONNECT_TIMEOUT_S, i.e. nobody answers at that address: "not reachable", below.
        # Any other timeout is the `total` one (or a socket read): TorchServe too slow.
        if isinstance(err, asyncio.TimeoutError) and not isinstance(err, aiohttp.ConnectionTimeoutError):
            return ClassifyError(504, f"The model server took longer than {self.settings.predict_timeout_s:g} s to answer.")
        # Refused, reset, disconnected mid-answer (aiohttp.ClientError): TorchServe is down or restarting.
        log.warning("TorchServe not reachable at %s: %s", url, err)
        return ClassifyError(503, "The model server is not reachable (is TorchServe running?).")

    # --- API --------------------------------------------------------------------------------
    async def _predict_response(self, image: bytes, path: str, call: str) -> Response:
        """One image's answer, sent again once if its worker died under it; within TS_PREDICT_TIMEOUT_S."""
        # A raw body (not multipart): the handler reads it as the request's `body`.
        async with prediction_deadline(self.settings.predict_timeout_s):
            try:
                response = await self._send(self._inference, "inference", "POST", path, image, call)
                if not _worker_lost(response):
                    return response
                log.warning("retrying a prediction once: TorchServe answered %d %s", response.status_code,
                            error_message(response))
            except aiohttp.ClientConnectionError as err:  # reset or disconnected mid-answer
                if isinstance(err, NEVER_CONNECTED):
                    raise
                log.warning("retrying a prediction once: %s", err)
            if self.metrics is not None:
                self.metrics.retries.inc()
            return await self._send(self._inference, "inference", "POST", path, image, call)

    async def predict(self, image: bytes, explain: bool = False) -> dict:
        """TorchServe's answer for one image: {"prediction", "label", "index", "probability", "topk", ...}.

        ``explain``: ask TorchServe's explanations API instead; the answer adds a Grad-CAM "heatmap".
        """
        path = f"/{'explanations' if explain else 'predictions'}/{self.settings.model_name}"
        try:
            response = await self._predict_response(image, path, "explanation" if explain else "prediction")
        except TRANSPORT_ERRORS as err:
            error = self._unreachable(err, self.settings.inference_url)
            count_failure(self.metrics, error, err)
            raise error from None
        except KeyRefused:
            if self.metrics is not None:
                self.metrics.model_server_errors.labels("key_refused").inc()
            raise
        try:
            answer = self._answer(response, explain)
        except ClassifyError as error:
            count_failure(self.metrics, error, response)
            raise
        note_model_version(answer.get("model_version"))
        return answer

    def _answer(self, response: Response, explain: bool) -> dict:
        if response.status_code == 200:
            try:
                answer = response.json()
            except ValueError as err:  # NaN or infinity included (weights that overflow)
                log.warning("the model server answered 200 with no valid JSON (%s): %s", err, ascii(response.text[:200]))
                raise ClassifyError(502, "The model server sent an answer that is not JSON.") from None
            if not isinstance(answer, dict) or not isinstance(answer.get("label") or answer.get("prediction"), str):
                raise ClassifyError(502, "The model server's answer has no prediction.")
            if explain and not isinstance(answer.get("heatmap"), str):
                raise ClassifyError(502, "The model server's answer has no heatmap.")
            self.silence.answered()  # an answer a client could use: a 502 is no proof for /health
            self.engine = named_engine(answer, self.engine)
            return answer
        raise answer_error(response, self.settings)

    async def health(self) -> dict:
        """model_status(), plus a real prediction of a tiny image when none succeeded for
        HEALTH_MAX_SILENCE_S (SilenceProbe)."""
        status = await self.model_status()
        status["last_answer_s_ago"] = await self.silence.check()
        status["engine"] = self.engine
        return status

    async def _send_probe(self) -> Response:
        return await self._send(self._inference, "inference", "POST", f"/predictions/{self.settings.model_name}",
                                PROBE_IMAGE, "probe")

    async def model_status(self) -> dict:
        """{"model", "archive_version", "workers_ready", "workers"} or ClassifyError(503) when not ready."""
        path = f"/models/{self.settings.model_name}"
        try:
            response = await self._send(self._management, "management", "GET", path)
        except TRANSPORT_ERRORS as err:
            error = self._unreachable(err, self.settings.management_url)
            raise ClassifyError(503, error.message) from None
        if response.status_code == 404:
            raise ClassifyError(503, f"The model '{self.settings.model_name}' is not registered on the model server.")
        if response.status_code != 200:
            raise ClassifyError(503, f"The model server's status check failed: {error_message(response)}")
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
