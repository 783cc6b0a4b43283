"""Talking to an Open Inference Protocol (v2) server instead of the local TorchServe (OIP_URL set):
a KServe InferenceService with many replicas, the KServe bundle's TorchServe, or KServe's own model
server on the same bundle (handler/kserve_predictor.py, no TorchServe).

    predict       POST {OIP_URL}/v2/models/{model}/infer, the image as a BYTES input (base64)
    explain       POST {OIP_URL}/v1/models/{model}:explain, {"instances": [{"data": base64}]} (KServe's v1
                  route: the protocol has no explanations; KServe's own model server on the bundle answers it,
                  handler/kserve_predictor.py; a server without it -> 501)
    model_status  GET  {OIP_URL}/v2/models/{model}/ready   (KServe's model server answers it;
                  TorchServe alone does not, so /health says "unavailable" in front of a bare one)
    health        model_status, plus a prediction of a 1-pixel image after HEALTH_MAX_SILENCE_S without
                  an answer (SilenceProbe, as in front of TorchServe: ready but wedged -> 503)

The answer's outputs (serving/settings.py V2_OUTPUTS) become the handler's per-image answer, so
/classify/ answers exactly as in front of TorchServe. Failures map to the same statuses as
in front of TorchServe (adapter/model_server.py, shared): down / busy / model missing or not ready 503, too slow 504, the image
refused (4xx) the same 4xx with the server's message, the server broken 502. No token: KServe
authenticates at its ingress (OIP_HOST_HEADER names the InferenceService when calling the
ingress by address).
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging

import aiohttp

from serving.settings import V2_OUTPUTS  # the handler's v2 output names, one home

from .config import Settings
from .errors import ClassifyError
from .metrics import Metrics
from .model_server import (NEVER_CONNECTED, PROBE_IMAGE, TRANSPORT_ERRORS, Pool, PoolBusy, Response, SilenceProbe,
                           answer_error, count_failure, error_message, named_engine, pool_busy_error,
                           prediction_deadline)
from .request_context import note_model_version, request_id_header

log = logging.getLogger("adapter.oip")

INPUT_NAME = "image"


def infer_body(image: bytes) -> dict:
    """The v2 inference request for one image: a BYTES input holding it in base64."""
    return {"inputs": [{"name": INPUT_NAME, "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(image).decode("ascii")]}]}


def answer_from_outputs(body: dict) -> dict:
    """One image's OIP answer -> the handler's shape: prediction, label, index, probability, topk."""
    try:
        outputs = {o["name"]: o["data"] for o in body["outputs"]}
        missing = [name for name in V2_OUTPUTS if name not in outputs]
        if missing:
            raise ClassifyError(502, f"The model server's answer lacks the outputs {missing}.")
        topk = [{"label": label, "name": name, "index": index, "probability": probability}
                for label, name, index, probability in zip(outputs["topk_label"], outputs["topk_name"],
                                                            outputs["topk_index"], outputs["topk_probability"])]
        return {"prediction": outputs["name"][0], "label": outputs["label"][0], "index": outputs["index"][0],
                "probability": outputs["probability"][0], "unsure": outputs["unsure"][0], "topk": topk,
                "model_version": body.get("model_version"), "engine": (body.get("parameters") or {}).get("engine")}
    except (KeyError, IndexError, TypeError):
        raise ClassifyError(502, "The model server's answer is not an Open Inference Protocol answer.") from None


def _model_missing(response: Response) -> bool:
    """A 404 from KServe's model server about the model ({"error": ...}), not about the route ({"detail": ...})."""
    try:
        return "error" in response.json()
    except (ValueError, TypeError):
        return False


class OIPClient:
    """Same interface as TorchServeClient: predict(image), health(), model_status(), aclose()."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.engine: str | None = None  # the forward pass the last answer named (/health)
        self.silence = SilenceProbe(settings, self._send_probe, self._answer)  # /health: does the model answer?
        s = settings
        self.headers = {"Host": s.oip_host_header} if s.oip_host_header else {}
        self._infer_path = f"/v2/models/{s.model_name}/infer"
        self._explain_path = f"/v1/models/{s.model_name}:explain"  # KServe's v1 route: OIP has no explanations
        self._pool = Pool(s.oip_url, s.max_connections, s.predict_timeout_s,
                           aiohttp.ClientTimeout(total=s.predict_timeout_s, connect=s.connect_timeout_s),
                           metrics.model_server_latency if metrics else None,
                           s.model_server_hold_s())
        self._health = Pool(s.oip_url, 8, s.health_timeout_s,
                             aiohttp.ClientTimeout(total=s.health_timeout_s, connect=s.connect_timeout_s))

    async def aclose(self) -> None:
        try:
            await self._pool.close()
        finally:
            await self._health.close()

    def _unreachable(self, err: Exception) -> ClassifyError:
        if isinstance(err, PoolBusy):
            return pool_busy_error(self.settings)
        if isinstance(err, TimeoutError) and not isinstance(err, aiohttp.ConnectionTimeoutError):
            return ClassifyError(504, f"The model server took longer than {self.settings.predict_timeout_s:g} s to answer.")
        log.warning("model server not reachable at %s: %s", self.settings.oip_url, err)  # the URL stays internal
        return ClassifyError(503, "The model server is not reachable.")

    async def predict(self, image: bytes, explain: bool = False) -> dict:
        """The model server's answer for one image in the handler's shape; ``explain``: KServe's v1 explain
        route instead (the Open Inference Protocol has none), whose answer adds a Grad-CAM "heatmap"."""
        if explain:
            path, body = self._explain_path, {"instances": [{"data": base64.b64encode(image).decode("ascii")}]}
        else:
            path, body = self._infer_path, infer_body(image)
        headers = {**self.headers, "Content-Type": "application/json", **request_id_header()}
        call = "explanation" if explain else "prediction"
        try:
            # The wait for a pooled connection and the answer share one deadline, as TorchServe's do.
            async with prediction_deadline(self.settings.predict_timeout_s):
                data = json.dumps(body).encode()
                try:
                    response: Response = await self._pool.request("POST", path, headers, data, call)
                except aiohttp.ClientConnectionError as err:
                    # Reset or closed mid-answer (a pooled connection the server had closed, a pod going
                    # away): sent once more within the same deadline, as in front of TorchServe.
                    if isinstance(err, NEVER_CONNECTED):
                        raise
                    log.warning("retrying a prediction once: %s", err)
                    if self.metrics is not None:
                        self.metrics.retries.inc()
                    response = await self._pool.request("POST", path, headers, data, call)
        except TRANSPORT_ERRORS as err:
            error = self._unreachable(err)
            count_failure(self.metrics, error, err)
            raise error from None
        try:
            answer = self._explanation(response) if explain else self._answer(response)
        except ClassifyError as error:
            count_failure(self.metrics, error, response)
            raise
        note_model_version(answer.get("model_version"))
        self.engine = named_engine(answer, self.engine)
        return answer

    def _json(self, response: Response):
        try:
            return response.json()
        except ValueError:
            raise ClassifyError(502, "The model server sent an answer that is not JSON.") from None

    def _answer(self, response: Response) -> dict:
        if response.status_code == 200:
            answer = answer_from_outputs(self._json(response))
            self.silence.answered()
            return answer
        raise answer_error(response, self.settings)

    def _explanation(self, response: Response) -> dict:
        if response.status_code == 200:
            try:
                answer = self._json(response)["predictions"][0]
                if isinstance(answer.get("prediction"), str) and isinstance(answer.get("heatmap"), str):
                    return answer
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
            raise ClassifyError(502, "The model server's explanation has no prediction and heatmap.")
        if response.status_code in (405, 501) or (response.status_code == 404 and not _model_missing(response)):
            # no explain route (a 404 that is not KServe's "model ... does not exist"), or a model without them
            raise ClassifyError(501, "This model server gives no explanations: they need TorchServe's backend or "
                                     "KServe's own model server on the bundle (handler/kserve_predictor.py).",
                                 relayed=True)
        raise answer_error(response, self.settings)

    async def model_status(self) -> dict:
        path = f"/v2/models/{self.settings.model_name}/ready"
        try:
            response = await self._health.request("GET", path, self.headers)
        except TRANSPORT_ERRORS as err:
            raise ClassifyError(503, self._unreachable(err).message) from None
        if response.status_code != 200:
            raise ClassifyError(503, f"The model '{self.settings.model_name}' is not ready on the model server "
                                     f"({response.status_code}: {error_message(response)}).")
        return {"model": self.settings.model_name, "backend": "oip"}

    async def health(self) -> dict:
        """model_status() (the v2 readiness route: a ready flag), plus a real prediction of a tiny image when
        none succeeded for HEALTH_MAX_SILENCE_S, as in front of TorchServe (a wedged server is ready but
        answers nothing: 503)."""
        status = await self.model_status()
        status["last_answer_s_ago"] = await self.silence.check()
        status["engine"] = self.engine
        return status

    async def _send_probe(self) -> Response:
        response = await self._pool.request("POST", self._infer_path, {
            **self.headers, "Content-Type": "application/json", **request_id_header()},
            json.dumps(infer_body(PROBE_IMAGE)).encode(), "probe")
        if response.status_code == 200:
            with contextlib.suppress(ValueError, ClassifyError):
                self.engine = named_engine(answer_from_outputs(response.json()), self.engine)
        return response
