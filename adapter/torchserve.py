"""Talking to TorchServe: one prediction, the model's status, and the token keys they need.

One pooled `httpx.AsyncClient` per API (inference, management) lives for the adapter's lifetime, so
requests reuse keep-alive connections instead of paying a TCP connect each time.

TorchServe failures become ClassifyError with the status the adapter's caller should see:
    TorchServe down / refusing connections ........ 503
    model not registered / no worker ready (404, 503) 503
    slower than TS_PREDICT_TIMEOUT_S .............. 504
    the image refused by the handler (4xx) ........ same 4xx, with the handler's message
    the handler or TorchServe broke (5xx) ......... 502
Token keys expire and change when TorchServe restarts: on an auth refusal the key file is read
again, and if it still holds the refused key the API key renews it; then the request is retried once.
"""
from __future__ import annotations

import asyncio
import json
import logging

import httpx

from serving.keys import KeyFile, KeyFileError

from .config import Settings
from .errors import ClassifyError

log = logging.getLogger("adapter.torchserve")


def _error_message(response: httpx.Response) -> str:
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


def _is_auth_refusal(response: httpx.Response) -> bool:
    # TorchServe 0.12 answers a missing/expired/wrong key with 400 InvalidKeyException, not 401.
    if response.status_code == 401:
        return True
    return response.status_code == 400 and "InvalidKeyException" in response.text


class TorchServeClient:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = KeyFile(settings.key_file)
        self._renew_lock = asyncio.Lock()
        limits = httpx.Limits(max_connections=settings.max_connections,
                              max_keepalive_connections=settings.max_connections)
        self._inference = httpx.AsyncClient(
            base_url=settings.inference_url, limits=limits,
            timeout=httpx.Timeout(settings.predict_timeout_s, connect=settings.connect_timeout_s))
        self._management = httpx.AsyncClient(
            base_url=settings.management_url,
            timeout=httpx.Timeout(settings.health_timeout_s, connect=settings.connect_timeout_s))

    async def aclose(self) -> None:
        await self._inference.aclose()
        await self._management.aclose()

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

    async def _send(self, client: httpx.AsyncClient, kind: str, method: str, url: str,
                    **kwargs) -> httpx.Response:
        header = self._auth_header(kind)
        response = await client.request(method, url, headers=header, **kwargs)
        if not _is_auth_refusal(response):
            return response
        fresh = await self._fresh_auth_header(kind, refused=header)
        if fresh and fresh != header:
            response = await client.request(method, url, headers=fresh, **kwargs)
        if _is_auth_refusal(response):
            raise ClassifyError(503, f"The model server refused the adapter's {kind} key; check that "
                                     f"TS_KEY_FILE ({self.keys.path}) is the key file of the running TorchServe.")
        return response

    def _unreachable(self, err: httpx.HTTPError, url: str) -> ClassifyError:
        if isinstance(err, (httpx.ReadTimeout, httpx.WriteTimeout)):
            return ClassifyError(504, f"The model server took longer than {self.settings.predict_timeout_s:g} s to answer.")
        if isinstance(err, httpx.PoolTimeout):
            return ClassifyError(503, "The model server is busy: too many requests are waiting. Try again shortly.")
        return ClassifyError(503, f"The model server is not reachable at {url} (is TorchServe running?).")

    # --- API --------------------------------------------------------------------------------
    async def predict(self, image: bytes) -> dict:
        """TorchServe's answer for one image: {"prediction", "label", "index", "probability", "topk", ...}."""
        path = f"/predictions/{self.settings.model_name}"
        try:
            # A raw body (not multipart): the handler reads it as the request's `body`.
            response = await self._send(self._inference, "inference", "POST", path, content=image)
        except httpx.HTTPError as err:
            raise self._unreachable(err, self.settings.inference_url) from None
        status = response.status_code
        if status == 200:
            try:
                answer = response.json()
            except ValueError:
                raise ClassifyError(502, "The model server sent an answer that is not JSON.") from None
            if not isinstance(answer, dict) or not isinstance(answer.get("label") or answer.get("prediction"), str):
                raise ClassifyError(502, "The model server's answer has no prediction.")
            return answer
        message = _error_message(response)
        if status == 404:
            raise ClassifyError(503, f"The model '{self.settings.model_name}' is not loaded on the model server.")
        if status == 413:
            # The handler says why (too many pixels); TorchServe's own size refusal has no body.
            raise ClassifyError(413, message if response.content.strip() else
                                "The image is larger than the model server accepts.")
        if status == 503:
            raise ClassifyError(503, f"The model is not ready: {message}")
        if 400 <= status < 500:
            # The handler refused this image (not an image, empty, ...): pass its verdict on.
            raise ClassifyError(status, message)
        raise ClassifyError(502, f"The model server failed: {message}")

    async def model_status(self) -> dict:
        """{"model", "archive_version", "workers_ready", "workers"} or ClassifyError(503) when not ready."""
        path = f"/models/{self.settings.model_name}"
        try:
            response = await self._send(self._management, "management", "GET", path)
        except httpx.HTTPError as err:
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
