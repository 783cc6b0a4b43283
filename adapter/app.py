"""The seed's `POST /classify/` API, answered by the model that TorchServe hosts, plus the web page.

    POST /classify/   multipart field `image` -> 200 {"prediction": "Aquarium fish", "label": ...,
                      "probability": ..., "top5": [{"name", "label", "index", "probability"} x5],
                      "unsure": ..., "model_version": ..., "time_ms": ...}
    POST /explain/    the same, plus "heatmap": "data:image/png;base64,..." (Grad-CAM of the answer)
    GET  /classes     the 100 things the model knows: [{"index", "label", "name"}]
    GET  /settings    what the page checks before uploading: {"max_upload_bytes", "top_k", "images"
                      (the formats read and the pixel limits, serving/images.py), "shrink" (which
                      photos it shrinks before uploading, and how; null: none), "explain" (false once
                      the model server has answered that it gives no explanations: an OIP server
                      without KServe's explainer, 501; the page then offers no "Why?")}
                      `prediction` is the seed's key and display rule (label, `_` as spaces, first
                      letter capital); the other keys are additions.
    GET  /health      200 {"status": "ok", ...} when the model can answer now, else
                      503 {"status": "unavailable", "error": ...} (one check shared, reused for
                      HEALTH_CACHE_S: adapter/health.py)
    GET  /metrics     Prometheus text (adapter/metrics.py; METRICS_ENABLED, METRICS_PORT move or drop it;
                      rendered again only once something was recorded, or after RENDER_REUSE_S)
    GET  /            the drag-and-drop page (frontend/; adapter/page.py: its headers, no-cache and CSP)

Every error is {"error": "..."} with its status: 400 no `image` field or two / empty / not an image /
not valid HTTP, 408 body (or head) slower than its deadline, 413 larger than MAX_UPLOAD_BYTES
(refused while reading, see upload.py), 414/431 URL or headers too large, 404/405 unknown route or
method (405 with the right Allow), 503 busy (with Retry-After: too many uploads in flight, or
explanations, see limits.py), TorchServe down or the model not ready, 504 TorchServe too slow, 502 TorchServe broke.
Settings come from environment variables (see config.py). No torch here: the model lives in TorchServe.

Run: `python -m adapter.run start` (background) or `python -m adapter.run serve` (foreground): both
use adapter/protocol.py's HTTP limits and a rotating log; a bare `uvicorn adapter.app:create_app
--factory` lacks the limits on request heads.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.classes import CLASS_NAMES, display_name  # the seed's display rule, one copy (no torch)
from serving.images import page_image_rules
from serving.settings import TOP_K  # answers per image, as the handler's model-config.yaml says (tested)

from .config import Settings
from .edge import Edge, refused_before_app
from .errors import ClassifyError
from .health import SharedCheck
from .limits import Explanations, InFlight, RequestLimits, client_address, held_by_model_server
from .metrics import SCRAPE_ROUTE, Metrics, start_metrics_server
from .oip import OIPClient
from .request_context import note_relayed
from .page import PageFiles
from .shrink import UploadShrinker
from .torchserve import TorchServeClient
from .upload import read_image_upload

log = logging.getLogger("adapter")


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def classify_answer(answer: dict, started: float) -> dict:
    """The handler's answer in the seed's shape: `prediction` first, then the additions."""
    label = answer.get("label")
    prediction = answer.get("prediction") or display_name(label)
    top5 = [
        {"name": item.get("name") or display_name(item["label"]), "label": item["label"],
         "index": item.get("index"), "probability": item.get("probability")}
        for item in (answer.get("topk") or [])[:TOP_K]
        if isinstance(item, dict) and isinstance(item.get("label"), str)
    ]
    return {
        "prediction": prediction,
        "label": label,
        "index": answer.get("index"),
        "probability": answer.get("probability"),
        "top5": top5,
        # Calibrated probability under the threshold in model/weights/calibration.json.
        "unsure": bool(answer.get("unsure", False)),
        "model_version": answer.get("model_version"),
        "time_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # OIP_URL set: an Open Inference Protocol server (KServe) instead of the local TorchServe.
        app.state.torchserve = (OIPClient if settings.oip_url else TorchServeClient)(settings, metrics)
        app.state.health = SharedCheck(app.state.torchserve.health, settings.health_cache_s)
        metrics_server = None
        if metrics is not None and settings.metrics_port:
            try:  # a client's share of connections, and the head's deadline, as on the users' port
                metrics_server = start_metrics_server(metrics.registry, settings.metrics_host, settings.metrics_port,
                                                      settings.max_client_connections, settings.header_timeout_s)
            except OSError as err:  # (adapter.run start checks first; serve alone, or a race, lands here)
                raise RuntimeError(f"cannot serve the metrics on {settings.metrics_host}:{settings.metrics_port} "
                                   f"(METRICS_PORT, METRICS_HOST): {err.strerror or err}") from None
            log.info("adapter: Prometheus metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        app.state.shrinker = UploadShrinker(settings)  # large photos shrunk before they travel on
        log.info("adapter: model '%s' at %s (max upload %d bytes, %d requests / %d bytes in flight, "
                 "predict deadline %g s, a request given up on held %g s more)", settings.model_name,
                 settings.oip_url or settings.inference_url, settings.max_upload_bytes,
                 settings.max_requests_in_flight, settings.max_bytes_in_flight, settings.predict_timeout_s,
                 settings.model_server_hold_s())
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            app.state.shrinker.close()
            await app.state.torchserve.aclose()

    settings.check()
    metrics = Metrics() if settings.metrics else None
    # Swagger UI and ReDoc load their scripts from a CDN: off unless ADAPTER_DOCS=1 (/openapi.json stays).
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="CIFAR-100 classifier", lifespan=lifespan,
                  summary="The seed's /classify/ API in front of TorchServe", **docs)
    app.state.settings = settings
    app.state.in_flight = InFlight(settings.max_requests_in_flight, settings.max_bytes_in_flight)
    app.state.explanations = Explanations(settings)
    # Whether "Why?" may be offered: TorchServe and KServe's own model server explain, a bare OIP server
    # cannot (501, adapter/oip.py); which one answers is known only once it was asked.
    app.state.explains = True
    app.state.metrics = metrics
    if metrics is not None:
        metrics.watch_in_flight(app.state.in_flight)
        metrics.watch_explanations(app.state.explanations)
    # adapter/protocol.py's refusals at the HTTP parser, which never reach the app (adapter/run.py).
    app.state.refused_before_app = partial(refused_before_app, metrics, settings.request_id_max_length)

    @app.exception_handler(ClassifyError)
    async def classify_error(request: Request, err: ClassifyError) -> JSONResponse:
        # (A refusal sent before the body was read closes the connection: limits.py adds that.)
        if err.relayed:
            note_relayed()
        return _error(err.status_code, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"Not found: {request.url.path}",
                    405: f"Method {request.method} is not allowed on {request.url.path}."}
        headers = err.headers
        if err.status_code == 405 and not (headers or {}).get("Allow"):
            # A 405 must name what is allowed; the page's StaticFiles names GET, HEAD itself (Starlette 1.10),
            # older Starlette raised it bare: kept for them.
            headers = {**(headers or {}), "Allow": "GET, HEAD"}
        return _error(err.status_code, messages.get(err.status_code, str(err.detail)), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(400, f"Invalid request: {first.get('msg', 'bad input')} ({where}).")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        # Logged with its traceback by Starlette; the client gets no stack trace.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "Internal error in the adapter; see its log.")

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary"}}}}}}}

    async def classify(request: Request) -> JSONResponse:
        started = time.perf_counter()
        # The body is read here (not by a FastAPI File() parameter) so the size limit acts while
        # it streams in.
        upload = await read_image_upload(request, settings.max_upload_bytes, settings.max_form_parts)
        image = await request.app.state.shrinker.prepare(upload.data, client=client_address(request.scope))
        with held_by_model_server(request.scope, len(image)):
            answer = await request.app.state.torchserve.predict(image)
        return JSONResponse(classify_answer(answer, started))

    app.add_api_route("/classify/", classify, methods=["POST"], openapi_extra=upload_body,
                      summary="Classify one image (multipart field `image`)")

    async def explain(request: Request) -> JSONResponse:
        started = time.perf_counter()
        explanations = request.app.state.explanations
        # Its client's share first, before the body is read; the model server's turn once it is.
        client = client_address(request.scope)
        async with explanations.share(client) as share:
            upload = await read_image_upload(request, settings.max_upload_bytes, settings.max_form_parts)
            image = await request.app.state.shrinker.prepare(upload.data, explain=True, client=client)
            async with explanations.turn(share):  # (kept, with the share, after a 504 while TorchServe may run it)
                with held_by_model_server(request.scope, len(image)):
                    try:
                        answer = await request.app.state.torchserve.predict(image, explain=True)
                    except ClassifyError as err:
                        if err.status_code == 501:  # it never will: GET /settings tells the page
                            request.app.state.explains = False
                        raise
        return JSONResponse({**classify_answer(answer, started), "heatmap": answer["heatmap"]})

    app.add_api_route("/explain/", explain, methods=["POST"], openapi_extra=upload_body,
                      summary="Classify one image and say where the answer came from (Grad-CAM heatmap)")

    # Never changes: encoded once, not on every request.
    classes_body = JSONResponse([{"index": i, "label": label, "name": display_name(label)}
                                 for i, label in enumerate(CLASS_NAMES)]).body

    def get_and_head(path: str, endpoint) -> None:
        # GET and HEAD (uptime checkers): FastAPI's get() adds no HEAD, and the page's mount answered 404.
        # HEAD is kept out of the schema: one route for both gave both the same operation id (FastAPI
        # warned "Duplicate Operation ID" on each GET /openapi.json).
        app.add_api_route(path, endpoint, methods=["GET"])
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    async def classes() -> Response:
        return Response(classes_body, media_type="application/json")

    get_and_head("/classes", classes)

    image_rules = page_image_rules()  # the handler's formats and pixel limits, one copy

    async def page_settings(request: Request) -> JSONResponse:
        # The page asks instead of carrying its own copy of the limits.
        return JSONResponse({"max_upload_bytes": settings.max_upload_bytes, "top_k": TOP_K,
                             "images": image_rules, "shrink": request.app.state.shrinker.page_rules(),
                             "explain": request.app.state.explains})

    get_and_head("/settings", page_settings)
    # The page is mounted at "/" and would swallow what the routes do not match: the slash
    # redirect (answer "/classify" and "/explain" too) and the 405 for other methods (say it here).
    app.add_api_route("/classify", classify, methods=["POST"], include_in_schema=False)
    app.add_api_route("/explain", explain, methods=["POST"], include_in_schema=False)

    async def classify_wrong_method(request: Request) -> JSONResponse:
        return _error(405, f"Method {request.method} is not allowed on {request.url.path}; "
                           "POST an image in a multipart field named 'image'.", {"Allow": "POST"})

    # Every other method, so that the page's mount at "/" does not answer them (Allow: GET, HEAD).
    other_methods = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
    for path in ("/classify/", "/classify", "/explain/", "/explain"):
        app.add_api_route(path, classify_wrong_method, methods=other_methods, include_in_schema=False)

    async def health(request: Request) -> JSONResponse:
        try:
            status = await request.app.state.health()
        except ClassifyError as err:
            return JSONResponse({"status": "unavailable", "error": err.message}, status_code=503)
        return JSONResponse({"status": "ok", **status})

    async def health_wrong_method(request: Request) -> JSONResponse:
        return _error(405, f"Method {request.method} is not allowed on /health.", {"Allow": "GET, HEAD"})

    get_and_head("/health", health)
    app.add_api_route("/health", health_wrong_method, include_in_schema=False,
                      methods=["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])

    if metrics is not None and not settings.metrics_port:
        async def prometheus_metrics(request: Request) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

        app.add_api_route(SCRAPE_ROUTE, prometheus_metrics, methods=["GET", "HEAD"], include_in_schema=False)

    if settings.cors_allow_origins:  # none by default: the page is served from this same origin
        # A page on another origin reads only the headers exposed to it: Retry-After (its busy retries) too.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["Retry-After", "X-Request-ID"])
    # Outermost: refuses or times out bodies before anything else holds them.
    app.add_middleware(RequestLimits, settings=settings, in_flight=app.state.in_flight)
    # Outside even that: its refusals get a request id, a log line and their count too.
    app.add_middleware(Edge, request_id_max_length=settings.request_id_max_length, metrics=metrics)
    if Path(settings.frontend_dir).is_dir():
        app.mount("/", PageFiles(settings.frontend_dir), name="page")
    else:
        log.warning("no page: FRONTEND_DIR %s is not a folder", settings.frontend_dir)
    return app
