"""The model under KServe's own Python model server (``kserve.ModelServer``): the Open Inference
Protocol without TorchServe, which is archived upstream and whose KServe runtime is deprecated.

    python -m handler.kserve_predictor --model_dir dist/kserve [--http_port 8080] [--grpc_port 8081]

It serves the same archive as TorchServe (``model-store/cifar100.mar`` under ``--model_dir``, where
KServe mounts ``storageUri``; or a ``.mar`` path; or a folder of the archive's files) with the same
parts: the handler's decoding and pixel limits, the engine chosen and guarded at start
(handler/engine.py; compiled engines cached as in a TorchServe worker), the calibration, and the
v1/v2 bodies and answers (handler/protocols.py, handler/answers.py). Concurrent requests share
forward passes (handler/batching.py: up to the archive's ``batchSize`` images, waiting at most its
``maxBatchDelay``), one at a time on every core (``handler.cpu_threads`` or OMP_NUM_THREADS pin
fewer), or on the first GPU the process sees (handler/engine.py serving_device). Routes are KServe's: ``POST /v2/models/cifar100/infer``, ``GET /v2/models/cifar100/ready``,
``POST /v1/models/cifar100:predict``, ``POST /v1/models/cifar100:explain`` (the answer plus a Grad-CAM
heatmap, as TorchServe's /explanations), the v2 routes of the served version (``/v2/models/cifar100/versions/<v>/...``,
VersionedRoutes), ``/v2/health/live|ready``, Prometheus ``/metrics``; and the
protocol's gRPC service (ModelInfer: each image's bytes as a BYTES element, the v2 outputs back). KServe's
model repository extension (load/unload by request) is refused on both (501, UNIMPLEMENTED).

Errors are ``{"error": "..."}``: 400 for a malformed body, a bad image or the binary tensor extension,
413 for an image over the pixel limit, more than ``handler.max_images_per_request`` images (counted before
anything is converted: a JSON body's commas before it is parsed, a gRPC request's parts before KServe's
conversion), or a body over ``max_request_size`` (config.properties, as TorchServe; gRPC's message limit
too); 503, before
the body is decoded, when ``--max_waiting_requests`` requests already wait for a forward pass (default:
the bundle's ``job_queue_size``, 24 as shipped; TorchServe's default 100), or ``--max_waiting_explanations`` explanations are under way
(default: the same bound; taken on the explainer's thread in turns by client, a client past its fair share of them
giving way to one under it), or a REST body would take the bytes of all bodies held past ``--max_body_bytes_held``
(96 MiB; before it is read when it declares its length), unless the bodies still arriving of a client past its fair
share of it give way (handler/held_bodies.py RestBodies); each busy 503 has ``Retry-After``. A gRPC call waits
for its share of that bound before its message is read (handler/held_bodies.py): UNAVAILABLE when
``--max_waiting_requests`` calls already wait or its turn has not come in ``--body_timeout_s``,
DEADLINE_EXCEEDED when its message has not arrived by then; one client (its address, or what a proxy in
``--trusted_proxies`` forwards for) takes at most ``--max_client_share`` of the reservations, and of the
waiting places once they are full, and no more than its fair share (an equal part) while other clients want them;
a reservation whose message has not come within ``--grpc_message_grace_s`` passes to another client's waiting call;
of the places to wait for a forward pass too, REST and gRPC alike (handler/batching.py). Connections are bounded on both ports: REST's by the adapter's HTTP/1.1
protocol (adapter/protocol.py: ``--max_open_connections``, ``--max_client_connections``, ``--header_timeout_s``,
...), gRPC's by the same per-client and total counts, a count of their own, at a TCP relay in front of grpc, which
listens on 127.0.0.1 (handler/grpc_relay.py: grpc core counts connections only in all), and by grpc core's handshake
and idle bounds (grpc_connection_options). A client that leaves before its answer has its request cancelled. Over
gRPC the 4xx are INVALID_ARGUMENT, the 503 UNAVAILABLE, with the same message; a model or version not
served NOT_FOUND. KServe's own checks
answer first where they apply (JSON that is not an inference request: 422, as ``{"error": ...}`` with FastAPI's
first reason, not its ``{"detail": [...]}``, which echoed the body),
except where they would answer wrongly: a v2 body that is not JSON, or JSON with NaN or nested past
the recursion limit, gets our 400 (PlainV2Route).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import torch
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio
from grpc_interceptor.exceptions import InvalidArgument, NotFound, Unavailable, Unimplemented
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.model import InferenceVerb
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest import server as rest_server
from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from adapter.config import Settings as EdgeSettings
from adapter.edge import shown_path
from adapter.metrics import CONNECTION_REFUSALS, EDGE_REFUSALS, parser_refusal_reason
from adapter.model_server import validation_error_at
from adapter.protocol import OpenConnections, protocol_class, silent_timeout_s
from handler import engine as engines
from handler.answers import NOT_FINITE, image_answers, served_topk
from handler.batching import Batcher, BatcherFull
from handler.calibration import load_calibration
from handler.explain import HEATMAP_MAX_SIDE
from handler.grpc_relay import INTERNAL_HOST, RESET_REASONS, FairShare, GrpcRelay, PerSecond
from handler.held_bodies import GrpcMessageBound, HeldBytes, RestBodies, client_share
from handler.preprocessing import ImageRequestError, decoded_tensors, decodes_inline, normalize, opened_images
from handler.protocols import (DEFAULT_MAX_IMAGES_PER_REQUEST, MAX_DATA_DEPTH, OUTPUTS, V2, ProtocolError,
                               encode_answer, json_body, logged_request_id, parse_request, plain_v2_body,
                               refuse_binary_extension, refuse_json_flood, request_id_refusal, shown_name, tensor_at,
                               too_many_dimensions, too_many_images, unsupported_datatype)
from model import check_class_count, load_class_names, network_from_state_dict
from serving.cli import positive_float, positive_int, share
from serving.clients import (CALLER, ForwardedClient, StoppableWait, client_key, newest_past_fair_share,
                             proxy_networks)
from serving.fair_pool import FairPool
from serving.pace import paced_deadline, stop_now
from serving.process import ensure_open_files
from serving.rotating_log import RotatingLog, log_everything_to
from serving.settings import (BODY_TIMEOUT_S, LOG_BACKUPS, LOG_MAX_BYTES, MIN_RATE_GRACE_S, MIN_UPLOAD_RATE, MODEL_NAME,
                              read_model_config)
from serving.throttled_log import ThrottledLog
from serving.torchserve import BASE_CONFIG, read_properties

logger = logging.getLogger("handler.kserve_predictor")

ARCHIVE_IN_BUNDLE = Path("model-store") / f"{MODEL_NAME}.mar"  # serving/kserve.py's layout
# Where max_request_size and job_queue_size are read: the bundle's TorchServe settings, else the repository's
# (in the image too).
PROPERTIES_IN_BUNDLE = Path("config") / "config.properties"
TORCHSERVE_JOB_QUEUE_SIZE = 100  # TorchServe's default job_queue_size (requests waiting per model)
# Entries in one v2 parameters map over gRPC (the request's, a tensor's, an output's): this model reads none, and
# KServe converts every entry on the event loop before the model sees the request (500,000 of them: 2 s).
MAX_GRPC_PARAMETERS = 64
# Request bodies held at once over REST, from their first byte to their answer's end (--max_body_bytes_held): in
# Standard mode (RawDeployment) no queue-proxy bounds the connections, and 64 bodies of 11 MiB held the server at 2.35 GB.
MAX_BODY_BYTES_HELD = 96 * 1024 * 1024
# gRPC health and metadata calls read at once (--max_grpc_health_calls), beside the message bound: their messages
# are empty or a name, yet gRPC could carry max_request_size in each; four cover a probe per kind and a metadata call.
MAX_GRPC_HEALTH_CALLS = 4
# One client's part of the gRPC message bound (--max_client_share): half, so that one client's stalled calls leave
# the other half of the reservations and waiting places to everyone else.
MAX_CLIENT_SHARE = 0.5
# How long a gRPC call's reserved message may take to come while another client's call waits for a reservation
# (--grpc_message_grace_s): eight addresses stalling one call each held every reservation for 30 s; a 12 MiB
# message needs 2.4 MB/s to come within it, a 32x32 image's tensor (12 KB) one round trip.
GRPC_MESSAGE_GRACE_S = 5.0
# REST connections from one client (--max_client_connections): this server's clients are services, not browsers (the
# adapter's 64): an adapter in front holds up to its pool's 24 (TS_MAX_CONNECTIONS) + 8 for health checks at once.
MAX_CLIENT_CONNECTIONS = 128
# gRPC streams (calls) one client may open in a second (--max_client_streams, handler/grpc_relay.py PerSecond): about
# twice the one-image calls this server answers a second on 2 cores (benchmarks/RESULTS.md session 58).
MAX_CLIENT_STREAMS = 1000
# gRPC streams all clients together may open in a second (--max_streams, handler/grpc_relay.py FairShare), an address
# past its fair share then reset: 4 addresses at 250 a second each kept another client's calls at 17 ms p50 (10 quiet;
# 38 ms at 500 each, 0.9 s and CANCELLED at 900 each); not below MAX_CLIENT_STREAMS, which one client alone may open.
MAX_STREAMS = 1000
# HTTP/2 frames one client may send in a second (--max_client_frames): a call takes 3-5 (HEADERS, DATA, WINDOW_UPDATE),
# so 5,000 at MAX_CLIENT_STREAMS, and a 12 MiB message 770 of 16 KiB; read by the relay at ~1 us each.
MAX_CLIENT_FRAMES = 10_000
# gRPC messages as sent only (grpc core's enabled algorithms: identity alone; a compressed one is answered
# UNIMPLEMENTED): 11 KB of gzip inflating to an 11 MB message cost this server what the 11 MB one does, for a thousandth
# of the bytes (session 59); an image is compressed already.
GRPC_UNCOMPRESSED = ("grpc.compression_enabled_algorithms_bitset", 1)
# Open files beyond the connection caps: the model's and the archive's files, logs, sockets of threads and probes.
OPEN_FILES_MARGIN = 256


# At /metrics beside KServe's own (the names of the TorchServe handler's counters, handler/engine.py).
IMAGES = Counter(engines.IMAGES_METRIC, "Images through the forward pass", ["Engine"])
RECHECKED = Counter(engines.RECHECKED_METRIC, "Images openvino-int8 had fp32 answer again", ["Engine"])
BATCHES = Counter("ForwardBatches", "Forward passes (batches of concurrent requests' images)", ["Engine"])
# What the bounds turn away, by the setting that bounds it (its option's name), and what they hold now.
REFUSED = Counter("RequestsRefused", "Requests refused by a bound, by the setting that refused them", ["Bound"])
BODY_BYTES_HELD = Gauge("RequestBodyBytesHeld", "Request body bytes held or reserved now (--max_body_bytes_held), "
                        "by protocol", ["Protocol"])
# The REST port's own refusals (adapter/protocol.py), by the adapter's reasons (adapter/metrics.py, README).
HTTP_REFUSED = Counter("HttpRefused", "REST requests refused at the HTTP parser and connections reset by a cap, by "
                       "reason", ["Reason"])
for _reason in EDGE_REFUSALS:
    HTTP_REFUSED.labels(_reason)  # at 0 from the start: rate() sees the first one
GRPC_CONNECTIONS_RESET = Counter("GrpcConnectionsReset", "gRPC connections reset at once by a cap, by reason "
                                 "(HttpRefused's names)", ["Reason"])
for _reason in (*CONNECTION_REFUSALS.values(), *RESET_REASONS):
    GRPC_CONNECTIONS_RESET.labels(_reason)
GRPC_CALLS_WAITING = Gauge("GrpcCallsWaiting", "gRPC calls waiting for their turn to have their message read")


class RequestRefused(Exception):
    """A request this model refuses: ``status`` (4xx) and ``message`` for its ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# A busy 503's Retry-After (s): as the adapter's own (RETRY_AFTER_S), a client told when to try again.
BUSY_RETRY_AFTER_S = 1


async def _refused(_, err: RequestRefused) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"error": err.message},
                        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)} if err.status == 503 else None)


# Characters of a validation error's reason, and of where it is, put in its answer.
VALIDATION_SHOWN = 200


async def _not_a_request(_, err: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body KServe's request model refuses, on every route, as ``{"error": ...}``: its first reason
    and where, cut short. FastAPI's own ``{"detail": [...]}`` echoed the input (each error's ``input``: {"id": 5, ...}
    with 11 MB of data came back in an 11.5 MB answer)."""
    errors = err.errors()
    first = errors[0] if errors else {}
    where = validation_error_at(first)[:VALIDATION_SHOWN]
    reason = str(first.get("msg") or "not valid")[:VALIDATION_SHOWN]
    more = f"; {len(errors) - 1} more" if len(errors) > 1 else ""
    return JSONResponse(status_code=422, content={
        "error": f"not an inference request: {reason}" + (f" ({where})" if where else "") + more})


class RequestChecks:
    """ASGI middleware, before KServe parses anything: the binary tensor extension -> 400 (KServe's own
    decoding of it fails with a 500 that echoes the image's bytes; the handler refuses it on TorchServe
    too), a body over ``max_bytes`` (declared, or as it streams in) -> 413 (uvicorn itself reads a
    body of any length), a body slower than ``pace`` allows -> 408 (serving/pace.py, as the
    adapter: a slow client would otherwise hold a slot of the pod's containerConcurrency for as long
    as it likes), a JSON body of more values than a request of ``max_images`` images holds -> 413
    (handler/protocols.py refuse_json_flood: parsing it would hold the event loop for seconds), and a body
    that would take the bytes every request's body holds past ``max_held`` -> 503 busy (its declared
    length before any byte is read, else as it streams), unless a client past its fair share of them has bodies
    still arriving: they give way (503; handler/held_bodies.py RestBodies). The body is held here, then handed on, and
    counted until the answer ends; a refusal closes the connection. A client that leaves before its answer
    has started has its request cancelled (``_answered``)."""

    def __init__(self, app, max_bytes: int, max_images: int = DEFAULT_MAX_IMAGES_PER_REQUEST,
                 pace: dict | None = None, max_held: int = MAX_BODY_BYTES_HELD, bodies: HeldBytes | None = None,
                 clients: ForwardedClient | None = None):
        self.app, self.max_bytes, self.max_images = app, max_bytes, max_images
        self.clients = clients if clients is not None else ForwardedClient([])  # who a request's client is (CALLER)
        # Body bytes held by the requests under way (one event loop): ``bodies`` when given (main's, at /metrics),
        # by client (a body of a client within its fair share takes the bytes of bodies of one past it).
        self.bodies = bodies if bodies is not None else HeldBytes(max_held)
        self.shares = RestBodies(self.bodies)
        self.refusals = ThrottledLog(logger)  # a flood of slow clients: one line a second
        self.pace = {"limit_s": BODY_TIMEOUT_S, "grace_s": MIN_RATE_GRACE_S, "min_rate": MIN_UPLOAD_RATE, **(pace or {})}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1"): value for name, value in scope["headers"]}
        try:
            refuse_binary_extension(headers)
        except ProtocolError as err:
            return await _answer(send, err.status, err.message)
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        client = await self._client(scope)
        CALLER.set(client)  # (this request's own task, and the answer's copied from it)
        body = self.shares.open(client)  # what this request adds to self.bodies, given back when it ends however
        chunks, seen, message = [], 0, {"more_body": True}
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if declared.isdigit() and not self.shares.fits(body, int(declared), stop=False):
                return await self._busy(send, scope, headers, int(declared))
            while message.get("more_body"):
                deadline = paced_deadline(started, seen, **self.pace)
                try:
                    async with asyncio.timeout_at(deadline) as timer:
                        body.stop = functools.partial(stop_now, timer)
                        message = await receive()
                except TimeoutError:
                    if body.given_way:
                        return await self._gave_way(send, scope, headers, client)
                    whole_time = deadline >= started + self.pace["limit_s"]  # else its rate fell short first
                    REFUSED.labels("body_timeout_s" if whole_time else "min_upload_rate").inc()
                    self.refusals.warning("408: the body of %s %s (%s) did not arrive in time (%d bytes in %.1f s)",
                                          scope["method"], logged_path(scope), logged_request_id(headers), seen,
                                          loop.time() - started)
                    return await _answer(send, 408, (
                        f"the request body did not arrive within {self.pace['limit_s']:g} s"
                        if whole_time else
                        f"the request body arrived too slowly (under {self.pace['min_rate']:g} bytes/s)"))
                finally:
                    body.stop = None
                if body.given_way:  # (as this message came)
                    return await self._gave_way(send, scope, headers, client)
                if message["type"] != "http.request":  # the client left
                    return
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                if seen > self.max_bytes:
                    return await self._refuse(send)
                if not self.shares.take(body, len(chunks[-1])):
                    return await self._busy(send, scope, headers, seen)
            whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            del chunks
            try:
                refuse_json_flood(whole["body"], self.max_images)
            except ProtocolError as err:
                return await _answer(send, err.status, err.message)
            await _answered(self.app, scope, whole, receive, send)
        finally:
            self.shares.close(body)

    async def _client(self, scope) -> str:
        host = scope["client"][0] if scope.get("client") else "unknown"
        if not self.clients.reads_headers:
            return client_key(host)
        forwarded = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
        return await self.clients.key(host, forwarded)

    async def _busy(self, send, scope, headers: dict, size: int) -> None:
        REFUSED.labels("max_body_bytes_held").inc()
        held, limit = self.bodies.held, self.bodies.limit
        self.refusals.warning("503 to %s %s (%s): its body of %d bytes beside the %d held (--max_body_bytes_held %d)",
                              scope["method"], logged_path(scope), logged_request_id(headers), size, held, limit)
        await _answer(send, 503, f"The model is busy: request bodies of {held} bytes are held, and this one "
                                 f"would take them past {limit} (--max_body_bytes_held); try again shortly.")

    async def _gave_way(self, send, scope, headers: dict, client: str) -> None:
        REFUSED.labels("max_client_share").inc()
        self.refusals.warning("503 to %s %s (%s): its body gave way to another client's, %s holding more than its "
                              "fair share of --max_body_bytes_held", scope["method"], logged_path(scope),
                              logged_request_id(headers), client)
        await _answer(send, 503, f"The model is busy with request bodies from your address ({client}): this one had "
                                 "not all arrived and its bytes went to another client's request, past your fair share "
                                 "of them (--max_body_bytes_held, shared equally among the clients sending); try "
                                 "again shortly.")

    async def _refuse(self, send) -> None:
        REFUSED.labels("max_request_size").inc()
        await _answer(send, 413, f"request body over {self.max_bytes} bytes (max_request_size)")


def logged_path(scope) -> str:
    """A request's path as a log line names it: escaped (uvicorn decodes %0A into the path: a line of the
    client's making in KServe's plain log) and cut to PATH_LOGGED characters (adapter/edge.py shown_path)."""
    return ascii(shown_path(scope["path"]))


class ShortAccessTarget(logging.Filter):
    """uvicorn's access line (``uvicorn.access``: client, method, target, HTTP version, status) with its target cut
    as the other lines' paths are (adapter/edge.py shown_path): pipelined GETs of a 15,000-character path wrote
    35.7 MB of 404 lines in 3 s. (uvicorn quotes the path: no line of the client's making.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], shown_path(record.args[2]), *record.args[3:])
        return True


async def _answer(send, status: int, message: str) -> None:
    """An ``{"error": ...}`` answer straight from the middleware; the connection closes (a body may be unread)."""
    await _send_json(send, status, json.dumps({"error": message}).encode(), close=True)


async def _send_json(send, status: int, body: bytes, close: bool = False) -> None:
    """A JSON answer sent from an ASGI middleware (``close``: the connection closes after it)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", str(BUSY_RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"connection", b"close")] if close else headers})
    await send({"type": "http.response.body", "body": body})


async def _answered(app, scope, whole: dict, receive, send) -> None:
    """``app`` on a request whose ``whole`` body is read, cancelled if the client leaves before the answer
    starts: uvicorn lets a handler run on for a client gone (its decoding, a forward pass and a waiting
    slot spent for nobody, live requests refused meanwhile). Only a watcher reads the connection; the app
    gets the body, then the disconnect when the watcher sees it (at the latest when the answer is sent)."""
    pending, left, started = [whole], asyncio.Event(), False

    async def replay():
        if pending:
            return pending.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def sending(message):
        nonlocal started
        started = True
        await send(message)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        left.set()

    answering, watcher = asyncio.ensure_future(app(scope, replay, sending)), asyncio.ensure_future(watch())
    try:
        await asyncio.wait((answering, watcher), return_when=asyncio.FIRST_COMPLETED)
        if left.is_set() and not started and not answering.done():
            answering.cancel()
            try:
                await answering
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # this task's own cancellation (the server stopping)
                    raise
            return
        await answering
    finally:
        watcher.cancel()
        answering.cancel()  # a no-op unless this task itself was cancelled


def _replaying(message: dict, receive):
    """An ASGI ``receive`` that gives ``message`` (a request's whole body, read by a middleware) once, then
    the connection's own messages (the disconnect, when it comes)."""
    pending = [message]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def unserved_version(model: Model, version: str) -> str | None:
    """Why a request naming ``version`` of ``model`` is not served (gRPC's NOT_FOUND, REST's 404), the client's
    version cut as a tensor's name; None for the served version, or none named."""
    if version in ("", model.model_version):
        return None
    return (f"model {model.name} has no version {shown_name(version)}: this server serves version "
            f"{model.model_version!r}")


class VersionedRoutes:
    """The v2 routes of a model version (``/v2/models/<name>/versions/<version>``, ``.../ready``, ``.../infer``):
    KServe answers them 501 "Model versioning not supported yet", so a client that names the version (as
    tritonclient's ``model_version``) was served over gRPC only. The served version's routes are answered as the
    routes without it; another version gets 404, as gRPC's NOT_FOUND (unserved_version). The access line keeps the
    path as sent."""

    PATH = re.compile(r"/v2/models/([^/]+)/versions/([^/]+)(/.*)?")

    def __init__(self, app, model: Model):
        self.app, self.model = app, model

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v2/models/") and (
                found := self.PATH.fullmatch(scope["path"])):
            name, version, rest = found.groups()
            if name == self.model.name and (unserved := unserved_version(self.model, version)):
                return await _answer(send, 404, f"{unserved} (or leave the version out)")
            path = f"/v2/models/{name}{rest or ''}"  # (another model's: KServe's 404 on the route without it)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        return await self.app(scope, receive, send)


class PlainV2Route:
    """ASGI middleware: ``POST /v2/models/<name>/infer`` with a plain v2 JSON body
    (handler/protocols.py ``plain_v2_body``) goes to the model straight, past FastAPI's routing,
    KServe's pydantic request and answer models and ``jsonable_encoder`` (half the event loop's time
    per image at concurrency 16: benchmarks/RESULTS.md, session 22), still through ``Model.__call__``
    (KServe's latency histograms). Any other request, or a body that is not plain, goes on to
    KServe's route, which answers it as before (its 422s). A body sent without a Content-Type is taken
    as JSON, on either way (KServe's route alone would take it for the binary extension's: a 400)."""

    def __init__(self, app, path: str, model: Model):
        self.app, self.path, self.model = app, path, model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path or not self.model.ready:
            return await self.app(scope, receive, send)
        message = await receive()  # RequestChecks holds the whole body: one message
        content_type = next((value for name, value in scope["headers"] if name == b"content-type"), b"").decode("latin-1")
        if not content_type.strip():
            # A v2 body is JSON; KServe's route would read one sent without a type as the binary extension's.
            content_type = "application/json"
            scope = {**scope, "headers": [*(h for h in scope["headers"] if h[0] != b"content-type"),
                                          (b"content-type", content_type.encode())]}
        try:
            if not is_json_type(content_type):
                # KServe's route would read it as the binary extension's and say its header is missing.
                raise ProtocolError(400, f"a v2 request is JSON: send it as Content-Type: application/json "
                                         f"(not {shown_name(content_type.split(';')[0].strip())})")
            payload = None if message.get("more_body") else plain_v2_body(content_type, message["body"])
        except ProtocolError as err:
            return await _send_json(send, err.status, json.dumps({"error": err.message}).encode())
        if payload is None:
            return await self.app(scope, _replaying(message, receive), send)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            answer, _ = await self.model(payload, headers=headers, verb=InferenceVerb.PREDICT)
            status = 200
        except RequestRefused as err:
            answer, status = {"error": err.message}, err.status
        await _send_json(send, status, json.dumps(answer, separators=(",", ":")).encode())


def is_json_type(content_type: str) -> bool:
    """Whether a v2 body of this Content-Type is read as JSON: none given (PlainV2Route labels it JSON),
    application/json, or application/*+json (FastAPI, KServe's v2 route)."""
    kind = content_type.split(";")[0].strip().lower()
    return not kind or kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def grpc_count_refusal(request, max_images: int) -> str | None:
    """Why a gRPC ModelInferRequest holds more than a request to this model may, from plain counts
    (protobuf's len, no element converted), or None: more than ``max_images`` inputs or elements, more
    outputs than the model has, a shape longer than MAX_DATA_DEPTH, more than MAX_GRPC_PARAMETERS entries
    in a parameters map, raw_input_contents not one per input; and a datatype other than BYTES (KServe's
    conversion of it would fail first, with a traceback in the log), or contents beside raw_input_contents (KServe's
    own refusal of it logged a traceback, unthrottled: 1,686 in 60 s from one connection)."""
    if len(request.inputs) > max_images:
        return too_many_images(len(request.inputs), max_images, "inputs").message
    # Before the walk below: KServe refuses any other count anyway, and millions of empty entries pass the walk.
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        return (f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs: "
                f"one per input, or none")
    if len(request.outputs) > len(OUTPUTS):
        return f"{len(request.outputs)} outputs asked; this model has {len(OUTPUTS)}, each may be asked once"
    maps = [request.parameters, *(t.parameters for t in request.inputs), *(o.parameters for o in request.outputs)]
    if any(len(parameters) > MAX_GRPC_PARAMETERS for parameters in maps):
        return f"a parameters map of more than {MAX_GRPC_PARAMETERS} entries (this model reads none)"
    images = 0
    for n, tensor in enumerate(request.inputs):
        at = tensor_at(n, tensor.name)
        if tensor.datatype != "BYTES":
            return unsupported_datatype(at, tensor.datatype).message
        if len(tensor.shape) > MAX_DATA_DEPTH:
            return too_many_dimensions(at, len(tensor.shape)).message
        if request.raw_input_contents and tensor.HasField("contents"):  # (KServe's refusal logged a traceback each)
            return f"{at}: its elements go in raw_input_contents or in contents, not both"
        filled = tensor.contents.ListFields()
        if other := [field.name for field, _ in filled if field.name != "bytes_contents"]:  # (KServe reads none)
            return f"{at}: a BYTES tensor's elements go in bytes_contents (or raw_input_contents), not {other[0]}"
        images += sum(len(values) for _, values in filled)
    for raw in request.raw_input_contents:  # 4-byte length + bytes per element: counted until one too many
        at = 0
        while at + 4 <= len(raw) and images <= max_images:
            at += 4 + int.from_bytes(raw[at:at + 4], "little")
            images += 1
        if images > max_images:
            return too_many_images(f"more than {max_images}", max_images).message
    return too_many_images(images, max_images).message if images > max_images else None


class CIFAR100Servicer(InferenceServicer):
    """KServe's gRPC servicer with checks of its own before KServe's work (installed in its place in main:
    KServe's server builds its servicer itself). ModelInfer: KServe turns every element, dimension and
    parameter of a request into Python objects on the event loop before the model sees it
    (InferRequest.from_grpc: 5 s for 100,000 one-element inputs, while no REST or gRPC client is
    answered), so a request is first refused on plain counts (grpc_count_refusal). A model name or version
    this server does not serve gets NOT_FOUND (KServe answered any version with the one it has, and logs a
    traceback for a wrong name)."""

    def validate_grpc_request(self, request) -> None:  # KServe's classmethod, called on the servicer before from_grpc
        model = self._served(request.model_name, request.model_version)
        if (refusal := grpc_count_refusal(request, model.max_images)) is not None:
            raise InvalidArgument(refusal)
        super().validate_grpc_request(request)

    def _served(self, name: str, version: str) -> "CIFAR100Predictor":
        model = self._data_plane.model_registry.get_model(name)
        if model is None:
            raise NotFound(f"Model with name {name} does not exist.")
        if unserved := unserved_version(model, version):
            raise NotFound(f"{unserved} (or leave model_version empty)")
        return model

    async def ModelReady(self, request, context):
        self._served(request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):
        self._served(request.name, request.version)
        return await super().ModelMetadata(request, context)


class RepositoryExtensionRefused(Unimplemented):
    """A call of KServe's model repository extension: gRPC UNIMPLEMENTED, REST 501 (``_repository_refused``)."""


class NoModelRepository:
    """In place of KServe's model repository extension (``POST /v2/repository/models/<name>/load|unload``,
    gRPC RepositoryModelLoad/Unload): any client could unload the model, the pod staying up (its
    probes answered) with no way back but a restart. This server serves one model, loaded at start."""

    async def load(self, model_name: str):
        raise RepositoryExtensionRefused(
            f"the model repository extension is not served: {shown_name(model_name)} cannot be loaded or unloaded by a "
            f"request; this server serves {MODEL_NAME}, loaded at start")

    unload = load


async def _repository_refused(_, err: RepositoryExtensionRefused) -> JSONResponse:
    return JSONResponse(status_code=501, content={"error": err.details})


def _without_repository_extension(server: ModelServer) -> None:
    """KServe's model repository extension refused on both transports, and not advertised in the server
    metadata (``GET /v2``, gRPC ServerMetadata)."""
    server.model_repository_extension = NoModelRepository()  # handed to the REST and gRPC servers at start
    model_server.app.add_exception_handler(RepositoryExtensionRefused, _repository_refused)
    metadata = server.dataplane.metadata
    server.dataplane.metadata = lambda: {**metadata(), "extensions": []}


# What KServe's encode reads of a request's headers to answer a CloudEvent as one (its own headers then replace these).
CLOUDEVENT_HEADERS = ("ce-specversion", "ce-source", "ce-type", "ce-id")
CLOUDEVENT_TYPE = "application/cloudevents+json"


def _explain_without_echo(server: ModelServer) -> None:
    """KServe's :explain answers with the headers its dataplane returns, which are the request's own
    (dataplane.explain: ``response_headers = headers``): a client's Authorization and Cookie came back, curl -d's
    form Content-Type labelled the JSON answer, and a chunked request's answer had Transfer-Encoding beside
    Content-Length (aiohttp refuses it). The answer now has headers of its own, as :predict's."""
    explain = server.dataplane.explain

    async def explained(model_name, request, headers=None):
        response, _ = await explain(model_name, request, dict(headers or {}))
        return response, {name: value for name, value in (headers or {}).items()
                          if name in CLOUDEVENT_HEADERS or (name == "content-type" and value == CLOUDEVENT_TYPE)}

    server.dataplane.explain = explained


def archive_folder(model_dir: Path, into: Path) -> Path:
    """The folder holding the archive's files: ``model_dir`` itself, or a .mar (zip) unpacked into ``into``."""
    mar = model_dir if model_dir.suffix == ".mar" else model_dir / ARCHIVE_IN_BUNDLE
    if mar.is_file():
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(into)
        return into
    if (model_dir / "MAR-INF" / "MANIFEST.json").is_file():
        return model_dir
    raise FileNotFoundError(f"no {ARCHIVE_IN_BUNDLE} (make kserve-bundle) and no unpacked archive in {model_dir}")


def torchserve_setting(model_dir: Path, key: str, default: int | None = None) -> int:
    """A TorchServe limit that applies here too (``max_request_size``, ``job_queue_size``): from the bundle's
    config.properties, else the repository's, else TorchServe's own default."""
    for properties in (model_dir / PROPERTIES_IN_BUNDLE, BASE_CONFIG):
        if properties.is_file() and key in (props := read_properties(properties)):
            return int(props[key])
    if default is None:
        raise FileNotFoundError(f"no {key} in {model_dir / PROPERTIES_IN_BUNDLE} or {BASE_CONFIG}")
    return default


class _Explanation:
    """One explanation under way (CIFAR100Predictor.explain): its client; until it runs on the explainer's thread,
    stop() ends it, its request answered 503 (it gave its place to another client's)."""

    __slots__ = ("client", "wait", "running", "gave_way_at")

    def __init__(self, client: str | None):
        self.client, self.wait = client, StoppableWait()
        self.running = False
        self.gave_way_at: int | None = None  # the share it was past, once stopped

    def on_thread(self, work, *args):
        """``work(*args)`` on the explainer's thread, marked running first (no longer stopped)."""
        self.running = True
        return work(*args)

    def stop(self, share: int) -> None:
        self.gave_way_at = share
        self.wait.stop()


class CIFAR100Predictor(Model):
    def __init__(self, name: str, model_dir: Path, engine_setting: str | None = None,
                 max_waiting: int | None = None, max_explanations: int | None = None,
                 client_waiting: int | None = None, client_explanations: int | None = None):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        # client_waiting: the waiting places a client keeps when all are taken (handler/batching.py)
        self.engine_setting, self.max_waiting, self.client_waiting = engine_setting, max_waiting, client_waiting
        # Explanations under way at once (None: no bound); one more gets 503, unless a client past its share gives
        # way (explain). client_explanations: the most a client keeps when all are taken.
        self.max_explanations = max_explanations
        self.client_explanations = client_explanations
        self._explaining: dict[_Explanation, None] = {}  # those under way, oldest first
        self._unpacked = tempfile.TemporaryDirectory(prefix="cifar100-kserve-")
        # Grad-CAM's one thread, taken in turns by client (one client's 24 queued explanations of 64 images each had
        # another's wait behind them all).
        self._explainer = FairPool(1, "explain")
        # Large images decoded at once: one per CPU (load() sizes it anew for the threads it sets), shared out by
        # client (CALLER). asyncio's default pool (CPUs + 4) held 6 x 16 MP decodes on 2 CPUs: 1.5 GB over the
        # pod's 2 GiB (benchmarks/RESULTS.md session 47).
        self._decoder = FairPool(torch.get_num_threads(), "decode")
        self.refusals = ThrottledLog(logger)  # a flood refused: one line a second

    def load(self) -> bool:
        folder = archive_folder(self.model_dir, Path(self._unpacked.name))
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        config = read_model_config(folder / manifest["configFile"]) if manifest.get("configFile") else {}
        handler_cfg = config.get("handler") or {}
        torch.set_num_threads(int(engines.pinned_threads(config) or len(os.sched_getaffinity(0))))
        self._decoder.close()  # (its threads start on first use: none yet)
        self._decoder = FairPool(torch.get_num_threads(), "decode")
        weights = folder / manifest["serializedFile"]
        self.model_version = str(manifest.get("modelVersion", "unknown"))
        self.labels = load_class_names(folder / "index_to_name.json")
        self.topk = served_topk(handler_cfg, len(self.labels))
        self.max_images = int(handler_cfg.get("max_images_per_request", DEFAULT_MAX_IMAGES_PER_REQUEST))
        self.flip_tta = engines.flip_tta(config)
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        self.device = engines.serving_device()
        network = engines.serving_model(state_dict).to(self.device)
        check_class_count(network.num_classes, self.labels)  # else a top-k index past the names fails each batch
        self._state_dict, self._explanation_model = state_dict, None  # Grad-CAM's network: built on first use
        self.heatmap_max_side = int(handler_cfg.get("heatmap_max_side", HEATMAP_MAX_SIDE))
        # Not "self.engine": KServe's Model.engine is a flag (an engine to start; stop_engine at unload).
        self.network_engine, self.calibration = engines.start(
            self.engine_setting or handler_cfg.get("engine", engines.AUTO), network,
            hashlib.sha256(weights.read_bytes()).hexdigest(), engines.images_per_forward(config),
            self.device, folder, load_calibration(str(folder), self.flip_tta), self.flip_tta)
        self.batcher = Batcher(self._forward, int(config.get("batchSize") or 1),
                               float(config.get("maxBatchDelay") or 0) / 1000, self.max_waiting, self.client_waiting)
        logger.info("CIFAR-100 model %s on %s, %d threads, top-%d, engine %s %s, flip TTA %s, batches of up to %d "
                    "images within %s ms", self.model_version, self.device, torch.get_num_threads(), self.topk,
                    self.network_engine.name, self.network_engine.info, "on" if self.flip_tta else "off",
                    self.batcher.max_images, config.get("maxBatchDelay"))
        self.ready = True
        return self.ready

    def _forward(self, images: torch.Tensor) -> list[dict | None]:
        """One batch's answers (None for an image whose output is not finite), on the batcher's thread (the
        event loop only encodes them), counted as the TorchServe handler counts its own."""
        logits, run, rechecked = self.network_engine.answer(images.to(self.device, non_blocking=True), self.flip_tta)
        IMAGES.labels(self.network_engine.name).inc(run)
        RECHECKED.labels(self.network_engine.name).inc(rechecked)
        BATCHES.labels(self.network_engine.name).inc()
        # None for a row that is not finite: only the request holding it fails (_answers), not the batch.
        return image_answers(logits, self.calibration, self.topk, self.labels, self.model_version,
                             self.network_engine.name)

    def _request(self, payload) -> tuple:
        """The request and its images' opened headers (pixel limits checked, nothing decoded yet). A
        refused request raises RequestRefused (its 4xx)."""
        try:
            request = parse_request({"body": _as_dict(payload)}, self.max_images)
            if request is None:
                raise ProtocolError(400, "expected a v1 body {\"instances\": [...]} or a v2 body {\"inputs\": [...]}")
            return request, opened_images(request, request.images)
        except (ProtocolError, ImageRequestError) as err:
            raise RequestRefused(err.status, err.message) from None

    def _decoded(self, request, opened: list) -> tuple:
        """Opened images -> one normalized tensor and their (width, height), one decoded at a time."""
        try:
            tensors, sizes = decoded_tensors(request, opened)
        except ImageRequestError as err:
            raise RequestRefused(err.status, err.message) from None
        return normalize(torch.stack(tensors)), sizes

    def _images(self, payload) -> tuple:
        request, opened = self._request(payload)
        return (request, *self._decoded(request, opened))

    async def _answers(self, payload, headers: dict | None) -> tuple:
        """The request, its images, their sizes, and each image's answer (its forward pass shared with
        others'). A small request is read on the event loop (handler/preprocessing.py decodes_inline: a
        thread's hand-off costs more than decoding a CIFAR-size image), any other in a thread (Pillow lets
        go of the GIL while it decodes; one thread per CPU, shared out by client), so a large photo never holds
        up the loop."""
        if self.batcher.full(CALLER.get() or None):  # refused before its images are decoded (up to 64), not after
            raise self._busy(str(BatcherFull(self.batcher.max_waiting)), "--max_waiting_requests", headers)
        size = _request_bytes(payload, headers)
        if decodes_inline(size):
            request, opened = self._request(payload)
            if decodes_inline(size, opened):
                images, sizes = self._decoded(request, opened)
            else:
                images, sizes = await self._decoder.run(CALLER.get(), self._decoded, request, opened)
        else:  # a large body, or one without a length (chunked): parsed in a thread too
            request, images, sizes = await self._decoder.run(CALLER.get(), self._images, payload)
        try:
            answers = await self.batcher(images, CALLER.get() or None)
        except BatcherFull as err:  # filled up while this one was read, or its place went to another client
            raise self._busy(str(err), "--max_client_share" if err.gave_way else "--max_waiting_requests",
                             headers) from None
        if None in answers:  # a plain exception, as before: REST 500 "ValueError : ...", gRPC INTERNAL
            raise ValueError(NOT_FINITE)
        return request, images, sizes, answers

    def _busy(self, why: str, option: str, headers: dict | None) -> RequestRefused:
        """The 503 of a full bound (``option`` names it in the log line, with the request's id)."""
        REFUSED.labels(option.lstrip("-")).inc()
        self.refusals.warning("503 to %s: %s (%s)", logged_request_id(headers), why, option)
        return RequestRefused(503, f"The model is busy: {why}; try again shortly.")

    async def predict(self, payload, headers: dict | None = None) -> dict | InferResponse:
        grpc = isinstance(payload, InferRequest) and payload.from_grpc
        try:
            request, _, _, answers = await self._answers(payload, headers)
        except RequestRefused as err:
            if grpc:  # INVALID_ARGUMENT / UNAVAILABLE with the message (KServe's interceptor: INTERNAL for the rest)
                raise (Unavailable if err.status == 503 else InvalidArgument)(err.message) from None
            raise
        answer = encode_answer(request, answers, self.name, self.model_version)
        if request.protocol == V2 and "id" not in answer:
            # KServe's v2 answer must have an id (the protocol's is optional): the caller's request id, else a new one.
            tagged = (headers or {}).get("x-request-id")
            answer["id"] = tagged if tagged and request_id_refusal(tagged) is None else uuid.uuid4().hex
        if grpc:  # KServe's gRPC servicer wants its typed answer; raw inputs get raw outputs (the protocol's rule)
            return InferResponse(answer["id"], answer["model_name"], [InferOutput(**output) for output in answer["outputs"]],
                                 answer["model_version"], parameters=answer.get("parameters"),
                                 use_binary_outputs=payload.use_binary_outputs)
        return answer

    def get_input_types(self) -> list[dict]:
        """The v2 model metadata's inputs (``GET /v2/models/cifar100``, gRPC ModelMetadata): encoded images."""
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": name, "datatype": datatype, "shape": [-1, -1] if name.startswith("topk_") else [-1]}
                for name, datatype in OUTPUTS.items()]

    async def explain(self, payload, headers: dict | None = None) -> dict:
        """KServe's v1 explain route (``POST /v1/models/cifar100:explain``, v1 or v2 body): each image's
        answer plus a Grad-CAM ``heatmap`` of its top-1 class (handler/explain.py), as TorchServe's
        /explanations; answered as v1 ``{"predictions": [...]}``. One explanation batch at a time, on its own
        thread (a backward pass: 10-18 ms an image here), beside the forward passes, taken in turns by client. At
        most ``max_explanations`` under way (read, answered, waiting for or on that thread); one more gets 503 at
        once, rather than a queue without end on the thread; but one of a client under its fair share of them (an
        equal part among the clients explaining, at most ``client_explanations``) takes the place of the newest
        explanation not yet on the thread of the client most past its share, which gets the 503 (one address's 24
        explanations had every other client's refused, 58 of 58)."""
        client = CALLER.get() or None
        if self.max_explanations is not None and len(self._explaining) >= self.max_explanations:
            place = self._explanation_to_stop(client)
            if place is None:
                raise self._busy(f"{self.max_explanations} explanations already wait for the explainer",
                                 "--max_waiting_explanations", headers)
            place[0].stop(place[1])
        explanation = _Explanation(client)
        self._explaining[explanation] = None
        try:
            request, images, sizes, answers = await self._answers(payload, headers)
            targets = torch.tensor([answer["index"] for answer in answers])
            maps = await self._explainer.run(client or "", explanation.on_thread, self._heatmaps, images, targets,
                                             sizes)
        except asyncio.CancelledError:
            if not explanation.wait.gave_way():
                raise
            raise self._busy(f"{self.max_explanations} explanations are under way and more than "
                             f"{explanation.gave_way_at} of them are this client's (its share): its newest gave its "
                             "place to another client's", "--max_client_share", headers) from None
        finally:
            self._explaining.pop(explanation, None)
        return {"predictions": [{**answer, "heatmap": heatmap} for answer, heatmap in zip(answers, maps)]}

    def _explanation_to_stop(self, client: str | None) -> "tuple[_Explanation, int] | None":
        """When all explanations' places are taken: the one whose place ``client``'s takes (serving/clients.py
        newest_past_fair_share, among those not yet on the explainer's thread), with the share it was past."""
        if client is None or self.client_explanations is None:
            return None
        stoppable = [(entry, entry.client) for entry in self._explaining if not entry.running]
        return newest_past_fair_share(stoppable, client, self.max_explanations, self.client_explanations)

    def _heatmaps(self, images: torch.Tensor, targets: torch.Tensor, sizes: list) -> list[str]:
        from handler.explain import explanation_model, heatmaps  # captum: imported on the first explanation

        if self._explanation_model is None:
            self._explanation_model = explanation_model(network_from_state_dict(self._state_dict)).to(self.device)
        return heatmaps(self._explanation_model, images.to(self.device), targets.to(self.device), sizes,
                        self.heatmap_max_side)


def _request_bytes(payload, headers: dict | None) -> int | None:
    """A request's size for decodes_inline: its Content-Length, or over gRPC its tensors' names and bytes (the
    message is whole by then); None when unknown (a chunked body)."""
    if isinstance(payload, InferRequest) and payload.from_grpc:
        return sum(len(tensor.name or "") + (len(raw) if (raw := getattr(tensor, "_raw_data", None)) is not None
                   else sum(len(item) for item in tensor.data or () if isinstance(item, (bytes, bytearray))))
                   for tensor in payload.inputs)
    declared = str((headers or {}).get("content-length", ""))
    return int(declared) if declared.isdigit() else None


def _as_dict(payload) -> dict:
    """KServe hands a v2 body over parsed (InferRequest, from JSON or gRPC); the shared parser reads the
    JSON shape (a gRPC BYTES element is the image's bytes: handler/protocols.py)."""
    if not isinstance(payload, InferRequest):
        if isinstance(payload, (bytes, bytearray)):  # a JSON body sent as another content type: handed over unread
            payload = json_body({"body": payload})
        return payload if isinstance(payload, dict) else {}
    body = {"inputs": [{"name": i.name, "shape": list(i.shape), "datatype": i.datatype, "data": _tensor_data(i)}
                       for i in payload.inputs]}
    if payload.id is not None and not (payload.from_grpc and payload.id == ""):  # gRPC's unset id is ""
        body["id"] = payload.id
    if payload.request_outputs:
        body["outputs"] = [{"name": o.name} for o in payload.request_outputs]
    return body


def _tensor_data(tensor) -> list:
    """A request tensor's elements; gRPC's raw_input_contents (4-byte length + bytes per BYTES element)
    read as KServe reads them."""
    if getattr(tensor, "_raw_data", None) is None:
        return tensor.data
    if tensor.datatype != "BYTES":
        return []  # the shared parser refuses the datatype
    try:
        return tensor.as_numpy().reshape(-1).tolist()
    except Exception as err:  # noqa: BLE001 - a malformed raw tensor is the client's
        raise ProtocolError(400, f"input {shown_name(tensor.name)}: raw_input_contents do not hold its shape's BYTES elements "
                                 f"({err})") from None


def _without_timing(app) -> None:
    """Leaves KServe's TimingMiddleware out of ``app``'s middleware stack when it is built (first request;
    KServe adds it at start): it reads the process's CPU time twice a request (getrusage) to log it at
    INFO on kserve.trace, silenced here: ~15% of the event loop's time at concurrency 16."""
    from timing_asgi import TimingMiddleware

    build = app.build_middleware_stack

    def build_without_timing():
        app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
        return build()

    app.build_middleware_stack = build_without_timing


class _AioBounded:
    """grpc.aio as KServe's gRPC server module sees it (it builds its server with ``aio.server`` at start, its
    interceptors and options fixed): the server built with ``bound`` first among them (handler/held_bodies.py)
    and the connection ``options`` added to KServe's (grpc core's channel arguments). It listens on 127.0.0.1 (a
    free port) only: KServe's port, on --host, is ``relay``'s (handler/grpc_relay.py: connections counted per
    client), listening once grpc has started and closed when it stops."""

    def __init__(self, bound: GrpcMessageBound, options: list[tuple[str, int]], host: str, relay: GrpcRelay):
        self.bound, self.options, self.host, self.relay = bound, options, host, relay

    def __getattr__(self, name: str):
        return getattr(aio, name)

    def server(self, *args, interceptors=(), options=(), **kwargs):
        # (not grpc's SO_REUSEPORT: another socket could bind its internal port and take its connections)
        server = aio.server(*args, interceptors=(self.bound, *(interceptors or ())),
                            options=[*(options or ()), *self.options, ("grpc.so_reuseport", 0)], **kwargs)
        listen, start, stop = server.add_insecure_port, server.start, server.stop
        public = []

        def add_insecure_port(address: str) -> int:  # KServe listens on "[::]:port": the relay does, on --host
            public.append(int(address.rpartition(":")[2]))
            self.relay.internal_port = listen(f"{INTERNAL_HOST}:0")
            return public[-1]

        async def started() -> None:
            await start()
            for port in public:
                await self.relay.start(self.host, port)

        async def stopped(grace: float | None) -> None:
            self.relay.stop_listening()  # no new connections; those open keep their calls through the grace
            try:
                await stop(grace)
            finally:
                self.relay.close()

        server.add_insecure_port, server.start, server.stop = add_insecure_port, started, stopped
        return server


class _UvicornGuarded:
    """uvicorn as KServe's REST server module sees it (it builds its ``uvicorn.Config`` at start): the config
    built with ``protocol`` for every connection, the adapter's guarded HTTP/1.1 protocol (adapter/protocol.py)."""

    def __init__(self, protocol, host: str):
        self.protocol, self.host = protocol, host

    def __getattr__(self, name: str):
        return getattr(uvicorn, name)

    def Config(self, *args, **kwargs):  # noqa: N802 - uvicorn's name
        return uvicorn.Config(*args, **{**kwargs, "host": self.host, "http": self.protocol})


def edge_protocol(settings: EdgeSettings) -> type:
    """The adapter's guarded HTTP/1.1 protocol for KServe's REST port, but a client that half-closes (FIN) after its
    request is taken as gone and its request cancelled (RequestChecks), as under KServe's own uvicorn: the adapter
    answers such a client instead, but a client that closed its socket sends the same FIN, and twelve that sent 64
    images each and left had 193 images run for nobody."""
    # uvicorn's own: the transport closes, and uvicorn tells the request its client disconnected.
    return type("PredictorHttpProtocol", (protocol_class(settings, _http_refused, _connection_reset),),
                {"eof_received": HttpToolsProtocol.eof_received})


def _http_refused(status: int, headers=(), scope=None, peer=None) -> list:
    """adapter/protocol.py refused a request at the parser: counted at /metrics; no headers of ours on its answer."""
    HTTP_REFUSED.labels(parser_refusal_reason(status)).inc()
    return []


def _connection_reset(cap: str) -> None:
    HTTP_REFUSED.labels(CONNECTION_REFUSALS[cap]).inc()


def grpc_connection_options(max_open: int, handshake_timeout_s: float, idle_s: float) -> list[tuple[str, int]]:
    """grpc core's bounds on connections: its HTTP/2 preface and settings within ``handshake_timeout_s`` (else
    closed), closed (GOAWAY) after ``idle_s`` with no call: a connection that sends nothing otherwise stays open for
    ever, each holding a file descriptor (three now: the client's, the relay's to grpc and grpc's); and at most
    twice ``max_open`` open, a backstop only: the relay (handler/grpc_relay.py) counts the clients' connections, in
    all (``max_open``) and per client, and grpc may not yet have seen the close of one it closed when the next comes.

    grpc cannot tell a connection that never made a call from one between calls (nor can the relay, which sees no
    calls): ``idle_s`` is the REST port's bound on a connection that has sent nothing (adapter/protocol.py
    silent_timeout_s), not the keep-alive time: 515 connections that sent the preface and an empty SETTINGS held
    ``max_open`` for the keep-alive time (59 s measured at 65 s), every other client's call UNAVAILABLE meanwhile.
    Both go (one that made calls one to two ``idle_s`` after its last: grpc core checks once a period), and the
    relay closes the client's connection with grpc's; a channel reconnects on its next call."""
    return [("grpc.max_allowed_incoming_connections", 2 * max_open),
            ("grpc.server_handshake_timeout_ms", max(1, round(handshake_timeout_s * 1000))),
            ("grpc.max_connection_idle_ms", max(1, round(idle_s * 1000)))]


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, default=Path("/mnt/models"),
                        help="the KServe bundle (make kserve-bundle), a .mar, or an unpacked archive")
    parser.add_argument("--host", default="0.0.0.0",
                        help="the address both ports listen on: all interfaces, as KServe (in a pod, its one "
                             "interface); 127.0.0.1 keeps them on this machine (make serve-kserve, the tests)")
    parser.add_argument("--engine", default=None, help="override model-config.yaml's handler.engine")
    parser.add_argument("--body_timeout_s", type=float, default=BODY_TIMEOUT_S,
                        help="a request's whole body must arrive within this (408)")
    parser.add_argument("--min_upload_rate", type=float, default=MIN_UPLOAD_RATE,
                        help="bytes/s a body must average after --min_rate_grace_s (408)")
    parser.add_argument("--min_rate_grace_s", type=float, default=MIN_RATE_GRACE_S,
                        help="the grace before --min_upload_rate applies; at the connection cap, how long a gRPC "
                             "connection stays quiet, or any connection's answers unread, before it may give way")
    parser.add_argument("--max_waiting_requests", type=positive_int, default=None,
                        help="requests that may wait for a forward pass; one more gets 503 (default: TorchServe's "
                             "job_queue_size of the bundle's config.properties, else the repository's (the image's), "
                             f"else {TORCHSERVE_JOB_QUEUE_SIZE})")
    parser.add_argument("--max_body_bytes_held", type=positive_int, default=MAX_BODY_BYTES_HELD,
                        help="bytes of request bodies held at once, from their first byte to their answer's end, REST "
                             "and gRPC a bound each: a REST body that would pass it gets 503; a gRPC call reserves "
                             "the largest message before its message is read, waiting its turn (handler/held_bodies.py;"
                             " at least max_request_size)")
    parser.add_argument("--max_waiting_explanations", type=positive_int, default=None,
                        help="explanations (:explain) that may be under way at once, one Grad-CAM batch running "
                             "and the rest waiting, taken in turns by client; one more gets 503, unless a client past "
                             "its share (--max_client_share) gives way (default: the --max_waiting_requests bound)")
    # The connection limits of the adapter's edge (adapter/protocol.py, its defaults: adapter/config.py), here on
    # KServe's REST server, which otherwise kept a connection that sends nothing for ever (20,000 of them took every
    # file descriptor: no client was answered), and their gRPC counterparts.
    edge_defaults = EdgeSettings()
    parser.add_argument("--max_open_connections", type=positive_int, default=edge_defaults.max_open_connections,
                        help="connections open at once over REST, and over gRPC (each a count of its own); one more "
                             "is closed at once, before it is read, unless one of the client most past its fair share "
                             "gives way (idle, or quiet or its answers unread for --min_rate_grace_s)")
    parser.add_argument("--max_client_connections", type=positive_int, default=MAX_CLIENT_CONNECTIONS,
                        help="connections open at once from one client over REST, and over gRPC (each a count of "
                             "its own; --trusted_proxies exempt); one more is closed at once")
    parser.add_argument("--max_client_streams", type=positive_int, default=MAX_CLIENT_STREAMS,
                        help="gRPC streams (calls) one client may open in a second, over all its connections "
                             "(--trusted_proxies exempt); the connection that opens one more is reset (HTTP/2 "
                             "rapid reset and the like); raise it for a server that answers more calls a second")
    parser.add_argument("--max_streams", type=positive_int, default=MAX_STREAMS,
                        help="gRPC streams (calls) all clients together may open in a second; past it, the "
                             "connection of a client that opened more than its fair share (this over the clients "
                             "that opened streams in the last second) is reset (--trusted_proxies exempt); raise it "
                             "for a server that answers more calls a second")
    parser.add_argument("--max_client_frames", type=positive_int, default=MAX_CLIENT_FRAMES,
                        help="HTTP/2 frames one client may send over gRPC in a second, over all its connections "
                             "(--trusted_proxies exempt); the connection that sends one more is reset (floods of "
                             "small frames); raise it for clients that send more")
    parser.add_argument("--header_timeout_s", type=positive_float, default=edge_defaults.header_timeout_s,
                        help="a REST request's line and headers must arrive within this (408), at --min_upload_rate "
                             "after --min_rate_grace_s; a gRPC connection's HTTP/2 preface and settings too (closed); "
                             "a REST connection that sends nothing, and a gRPC connection with no call, are closed "
                             "after it (or --timeout-keep-alive, if shorter)")
    parser.add_argument("--max_header_bytes", type=positive_int, default=edge_defaults.max_header_bytes,
                        help="a REST request's URL (414) and its line and headers together (431)")
    parser.add_argument("--max_header_count", type=positive_int, default=edge_defaults.max_header_count,
                        help="headers in a REST request (431)")
    parser.add_argument("--max_pipelined_requests", type=positive_int, default=edge_defaults.max_pipelined_requests,
                        help="REST requests one connection may queue behind the one being answered (429)")
    parser.add_argument("--send_timeout_s", type=positive_float, default=edge_defaults.send_timeout_s,
                        help="how long an answer may wait for a client that reads none of it (then reset)")
    parser.add_argument("--max_client_share", type=share, default=MAX_CLIENT_SHARE,
                        help="the part one client may take of the gRPC message bound's reservations "
                             "(--max_body_bytes_held / the largest message) held at once and of the "
                             "--max_waiting_requests places to wait for one, and of the places to wait for a forward "
                             "pass, REST and gRPC alike, and of the --max_waiting_explanations (one of each at least), "
                             "and while other clients want them an "
                             "equal part at most: when all are taken, another client's request takes the place of the "
                             "newest of a client past its part (503 / UNAVAILABLE). 1: no per-client share")
    parser.add_argument("--grpc_message_grace_s", type=positive_float, default=GRPC_MESSAGE_GRACE_S,
                        help="how long a gRPC call's message may take to come once its reservation is granted, while "
                             "all are taken and another client's call within its share waits: the oldest past it goes "
                             "to that call, and its own call gets UNAVAILABLE (health and metadata calls alike)")
    parser.add_argument("--max_grpc_health_calls", type=positive_int, default=MAX_GRPC_HEALTH_CALLS,
                        help="gRPC calls other than ModelInfer (health, metadata) whose messages may be read at "
                             "once, each reserving the largest message as ModelInfer's do: a bound of their own, "
                             "so that probes never wait behind inference calls")
    parser.add_argument("--trusted_proxies", default="",
                        help="comma-separated addresses or networks of proxies whose X-Forwarded-For names the "
                             "client of a gRPC call (its share) and of a request's decoding (its line), and whose REST "
                             "connections count in no client's --max_client_connections (REST and gRPC); off: the "
                             "client is the connection's peer")
    parser.add_argument("--log_file", type=Path, default=None,
                        help="every log line (KServe's, uvicorn's and its access lines, ours) into this file, rotated "
                             "at --log_max_bytes, keeping --log_backups old files (FILE.1, ...); default: stderr and "
                             "stdout, as KServe (a pod's log)")
    parser.add_argument("--log_max_bytes", type=positive_int, default=LOG_MAX_BYTES,
                        help="--log_file rotates at this size")
    parser.add_argument("--log_backups", type=positive_int, default=LOG_BACKUPS,
                        help="old --log_file files kept")
    # Every option known (KServe's and ours): a misspelt one (--enable-grpc for --enable_grpc) was dropped
    # without a word, leaving gRPC open on every interface.
    args = parser.parse_args()
    if model_server.args.workers != 1:
        # KServe's extra REST processes import its bare app: none of the bounds, checks and routes set up below.
        parser.error(f"--workers {model_server.args.workers}: this server runs one process (its guards are set "
                     "up in it); serve more with more replicas")
    limit = torchserve_setting(args.model_dir, "max_request_size")
    if not any(arg.startswith("--grpc_max_receive_message_length") for arg in sys.argv[1:]):
        # One limit for both routes: gRPC refuses a larger message itself (RESOURCE_EXHAUSTED).
        model_server.args.grpc_max_receive_message_length = limit
    if args.max_streams < args.max_client_streams:  # (one client alone may open its whole share: all of them)
        parser.error(f"--max_streams {args.max_streams} is below --max_client_streams {args.max_client_streams}")
    max_waiting = args.max_waiting_requests if args.max_waiting_requests is not None else torchserve_setting(
        args.model_dir, "job_queue_size", TORCHSERVE_JOB_QUEUE_SIZE)
    if max_waiting < 1:  # a bound of 0 would refuse every request
        parser.error(f"job_queue_size in the bundle's config.properties needs 1 or more, not {max_waiting}")
    if args.max_body_bytes_held < limit:  # a full-size body could never be read
        parser.error(f"--max_body_bytes_held {args.max_body_bytes_held} is below max_request_size {limit}")
    max_message = model_server.args.grpc_max_receive_message_length
    try:
        trusted = proxy_networks(proxy for proxy in args.trusted_proxies.split(",") if proxy.strip())
    except ValueError as err:
        parser.error(f"--trusted_proxies: {err}")
    try:  # REST's and gRPC's connections (three descriptors each: the relay's two, grpc's), the model's files, logs
        ensure_open_files(4 * args.max_open_connections + OPEN_FILES_MARGIN)
    except ValueError as err:
        parser.error(f"--max_open_connections {args.max_open_connections} {err}")
    edge = EdgeSettings(
        max_open_connections=args.max_open_connections, max_client_connections=args.max_client_connections,
        trusted_proxies=trusted, header_timeout_s=args.header_timeout_s, max_header_bytes=args.max_header_bytes,
        max_header_count=args.max_header_count, max_pipelined_requests=args.max_pipelined_requests,
        send_timeout_s=args.send_timeout_s, body_timeout_s=args.body_timeout_s, min_upload_rate=args.min_upload_rate,
        min_rate_grace_s=args.min_rate_grace_s)
    if model_server.args.enable_grpc and args.max_body_bytes_held < max_message:  # no gRPC call could ever be read
        parser.error(f"--max_body_bytes_held {args.max_body_bytes_held} is below "
                     f"--grpc_max_receive_message_length {max_message}")
    client_waiting = client_share(max_waiting, args.max_client_share)  # gRPC's and the forward pass's
    max_explanations = args.max_waiting_explanations if args.max_waiting_explanations is not None else max_waiting
    model = CIFAR100Predictor(args.model_name if args.model_name != "model" else MODEL_NAME, args.model_dir,
                              args.engine, max_waiting, max_explanations, client_waiting,
                              client_share(max_explanations, args.max_client_share))
    server = ModelServer()  # configures KServe's logging; the handler's lines (engine choice, refusals) join it
    for name in ("handler", "model", "serving", "adapter"):
        logging.getLogger(name).handlers[:] = logging.getLogger("kserve").handlers
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False
    if args.log_file is not None:
        # Into one rotating file once KServe has configured its loggers (ModelServer above), each line in the format
        # KServe gave its logger, as on stdout/stderr before. Not KServe's --log_config_file: that file would restate
        # KServe's four formats and its loggers (and have to follow them through KServe's upgrades), one file needs
        # one handler for them all (a handler each, every one rotates the file under the others' open streams), and
        # it takes no path or size from our command line. It still works: --log_file then takes over its loggers.
        log_everything_to(RotatingLog(args.log_file, maxBytes=args.log_max_bytes, backupCount=args.log_backups,
                                      encoding="utf-8"), "kserve")
    # KServe's per-request timing lines (kserve.trace, INFO: wall and CPU time, model latencies) stay silent;
    # the access log stays. Its timing middleware, whose only output they are, goes (_without_timing).
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").addFilter(ShortAccessTarget())
    server.enable_latency_logging = False
    _without_timing(model_server.app)
    model.load()
    model_server.app.add_exception_handler(RequestRefused, _refused)
    model_server.app.add_exception_handler(RequestValidationError, _not_a_request)
    model_server.app.add_middleware(PlainV2Route, path=f"/v2/models/{model.name}/infer", model=model)
    rest_bodies = HeldBytes(args.max_body_bytes_held)
    grpc_messages = HeldBytes(args.max_body_bytes_held,
                              client_share(args.max_body_bytes_held // max_message, args.max_client_share),
                              args.grpc_message_grace_s)
    grpc_health = HeldBytes(args.max_grpc_health_calls * max_message,
                            client_share(args.max_grpc_health_calls, args.max_client_share), args.grpc_message_grace_s)
    BODY_BYTES_HELD.labels("rest").set_function(lambda: rest_bodies.held)
    BODY_BYTES_HELD.labels("grpc").set_function(lambda: grpc_messages.held + grpc_health.held)
    GRPC_CALLS_WAITING.set_function(lambda: grpc_messages.waiting + grpc_health.waiting)
    model_server.app.add_middleware(RequestChecks, max_bytes=limit, max_images=model.max_images, pace={
        "limit_s": args.body_timeout_s, "grace_s": args.min_rate_grace_s, "min_rate": args.min_upload_rate},
        bodies=rest_bodies, clients=ForwardedClient(trusted))
    model_server.app.add_middleware(VersionedRoutes, model=model)  # outermost: the checks see the route it names
    _without_repository_extension(server)
    _explain_without_echo(server)
    grpc_server.InferenceServicer = CIFAR100Servicer  # the servicer KServe's gRPC server builds at start
    # gRPC's connections counted as REST's, a count of their own, by the relay on the public port
    relay = GrpcRelay(OpenConnections(edge, lambda cap: GRPC_CONNECTIONS_RESET.labels(CONNECTION_REFUSALS[cap]).inc()),
                      PerSecond(args.max_client_streams), PerSecond(args.max_client_frames),
                      FairShare(args.max_streams), lambda reason: GRPC_CONNECTIONS_RESET.labels(reason).inc())
    grpc_server.aio = _AioBounded(GrpcMessageBound(
        grpc_messages, max_message, max_waiting, args.body_timeout_s, refused=lambda bound: REFUSED.labels(bound).inc(),
        clients=ForwardedClient(trusted), client_waiting=client_waiting,
        others=grpc_health, peer_host=relay.peer_host),
        [*grpc_connection_options(args.max_open_connections, args.header_timeout_s,
                                  silent_timeout_s(edge, model_server.args.timeout_keep_alive)), GRPC_UNCOMPRESSED],
        args.host, relay)
    rest_server.uvicorn = _UvicornGuarded(edge_protocol(edge), args.host)
    server.start([model])


if __name__ == "__main__":
    try:
        main()
    finally:
        # Stopped or refused: the interpreter's teardown collected every object torch, KServe and pandas made, ~2 s
        # of each stop (~0.7 s of a refusal) freeing nothing the exit does not. Frozen, they are left out of it.
        gc.freeze()
