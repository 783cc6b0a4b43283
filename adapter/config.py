"""The adapter's settings, read once from environment variables (each has a default; the ones
shared with TorchServe and the page, such as the ports, model name and upload limit, come from
serving/settings.py).

    TS_INFERENCE_URL      TorchServe inference API              http://127.0.0.1:8080 (port: TS_INFERENCE_PORT)
    TS_MANAGEMENT_URL     TorchServe management API (/health, key renewal)  http://127.0.0.1:8081 (TS_MANAGEMENT_PORT)
    TS_MODEL_NAME         model name registered in TorchServe   cifar100
    TS_KEY_FILE           TorchServe's key_file.json (token auth) key_file.json
    TS_CONNECT_TIMEOUT_S  connecting to TorchServe              2
    TS_PREDICT_TIMEOUT_S  one prediction, its one retry and waits for a pooled connection included
                          (-> 504; still waiting for a connection: 503 busy + Retry-After); must stay
                          below TorchServe's responseTimeout (checked at start-up)  10
    TS_RESPONSE_TIMEOUT_S TorchServe's responseTimeout; unset: read from TS_MODEL_CONFIG (else 120). A request
                          the adapter answered 504 (or whose task was cancelled) keeps its bytes, its place in the
                          request caps and an explanation's turn this long more: TorchServe may still run it
    MODEL_SERVER_HOLD_S   that time instead: 0 for a model server that stops a request whose client left (this
                          project's KServe predictor; make serve-kserve sets 0)  (unset)
    TS_MODEL_CONFIG       the model-config.yaml packed into the archive; one named here must be readable
                          (the default may be absent)  handler/model-config.yaml
    TS_HEALTH_TIMEOUT_S   waiting for the model status / a health probe  3
    TS_MAX_CONNECTIONS    pooled connections to TorchServe: what it holds from the adapter at most (a call given up
                          on keeps its place as long as TS_RESPONSE_TIMEOUT_S); at most its job_queue_size (a burst
                          may find the workers' batches empty, and past the queue TorchServe answers 503)  24
    OIP_URL               an Open Inference Protocol (v2) server to use instead of TorchServe, e.g. a
                          KServe InferenceService's URL (adapter/oip.py; model name TS_MODEL_NAME) (unset)
    OIP_HOST_HEADER       Host header for it (KServe's ingress routes by host name)   (unset)
    HEALTH_MAX_SILENCE_S  /health probes with a real tiny prediction when no prediction has
                          succeeded for this long; a failed probe -> 503  10
    HEALTH_CACHE_S        /health's check (ok or 503) is reused this long after it ends, and callers meanwhile
                          share the one in flight (adapter/health.py); 0: every call checks  1
    MAX_UPLOAD_BYTES      largest accepted image file (-> 413)  10485760 (10 MiB)
    MAX_REQUESTS_IN_FLIGHT  requests with a body held at once; more -> 503 + Retry-After, unless its client
                          holds under its fair share and another past it is still uploading: that upload gives
                          way (503) (adapter/limits.py)  64
    MAX_BYTES_IN_FLIGHT   bytes those requests may hold together: received, plus the rest of their declared
                          size while they arrive at MIN_UPLOAD_RATE (a chunked upload declares MAX_UPLOAD_BYTES
                          + 64 KiB, the form); more -> 503 + Retry-After, unless an upload of a client past
                          its fair share of the bytes gives way, as above  104857600 (100 MiB)
    MAX_CLIENT_REQUESTS_IN_FLIGHT  of those, what one client address may hold; more -> 503 for that
                          client alone  16
    MAX_CLIENT_BYTES_IN_FLIGHT  bytes one client address may hold (buffered, or promised to its
                          uploads arriving at a healthy rate); more -> 503  33554432 (32 MiB)
    MAX_EXPLANATIONS_IN_FLIGHT  POST /explain/ answered by the model server at once (each costs
                          several classifications' CPU); more wait their turn  4
    MAX_CLIENT_EXPLANATIONS_IN_FLIGHT  explanations one client address may hold (reading, waiting or
                          answered); more -> 503 + Retry-After at once  2
    EXPLANATION_WAIT_S    the longest an explanation waits for its turn; then 503 + Retry-After  5
    RETRY_AFTER_S         the Retry-After of those 503s         1
    MIN_UPLOAD_RATE       after MIN_RATE_GRACE_S, a body (and a head) must arrive at this many
                          bytes/s on average, else 408 and closed at once  16384
    MIN_RATE_GRACE_S      the grace before MIN_UPLOAD_RATE applies   2
    MAX_OPEN_CONNECTIONS  open client connections; more are reset at once (file descriptors), unless an idle one
                          of an address past its fair share gives way, or one of its connections whose answers
                          have waited unread for MIN_RATE_GRACE_S (adapter/protocol.py)  512
    MAX_CLIENT_CONNECTIONS  open connections from one client address (trusted proxies exempt)  64
    TRUSTED_PROXIES       comma-separated proxy addresses/networks whose X-Forwarded-For names
                          the client (behind nginx or KServe's ingress); empty: the socket's peer  (none)
    BODY_TIMEOUT_S        a request's whole body must arrive within this (-> 408, closed)  30
    HEADER_TIMEOUT_S      a request's head (line + headers) must arrive within this (-> 408); a fresh
                          connection that sends nothing is closed after it (or KEEPALIVE_TIMEOUT_S if shorter)  10
    KEEPALIVE_TIMEOUT_S   idle keep-alive connections (between requests) are closed after  5
    MAX_HEADER_BYTES      request line + headers, in bytes (URL too long -> 414, else 431)  16384
    MAX_HEADER_COUNT      headers per request (-> 431)          100
    MAX_FORM_PARTS        parts in one upload's multipart form (-> 400; the page sends 1)  16
    MAX_PIPELINED_REQUESTS  requests one connection may have waiting behind its answer in progress
                          (HTTP/1.1 pipelining; one more -> 429 after the earlier answers, closed)  16
    SEND_TIMEOUT_S        an answer the client does not read: the connection is reset when its
                          send buffer stays full this long (writing paused)  30
    CORS_ALLOW_ORIGINS    comma-separated origins, or *; empty: none (the page is same-origin)  (none)
    ADAPTER_DOCS          1: serve /docs (Swagger UI loads from a CDN); default off, /openapi.json stays  0
    ADAPTER_LOG_MAX_BYTES / ADAPTER_LOG_BACKUPS  adapter.log rotates at this size, keeping this
                          many old files (adapter.log.1, ...)   10485760 / 5
    METRICS_ENABLED       1: Prometheus metrics (adapter/metrics.py); 0: none, and no /metrics  1
    METRICS_PORT          unset: GET /metrics on the adapter's own port; a port: there instead (own
                          HTTP server, METRICS_HOST), and not on the adapter's port  (unset)
    METRICS_HOST          where that metrics server listens (0.0.0.0 in a pod for Prometheus)  127.0.0.1
    REQUEST_ID_MAX_LENGTH  longest client X-Request-ID kept (letters, digits, ._:-); else a new one;
                          at most 128 (the model servers' logs keep no more)  128
    FRONTEND_DIR          folder served at /                    frontend/ beside this package
    ADAPTER_HOST / ADAPTER_PORT  where `python -m adapter.run start` listens  127.0.0.1 / 8000
    SHRINK_UPLOADS        1: large photos are shrunk here before they go on, and the page shrinks
                          them before uploading (adapter/shrink.py); 0: every file goes as it is
                          (its header still read here)  1
    SHRINK_MIN_BYTES      uploads above this (or above 1 MP) are shrunk  262144 (256 KiB)
    SHRINK_WORKERS        threads that decode uploads to shrink them    2
    SHRINK_WAIT_S         the longest an upload waits for a free one; then 503 + Retry-After  5
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from serving import images
from serving.clients import proxy_networks
from serving import settings as shared  # the defaults every part shares (model name, ports, upload limit)

DEFAULT_FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"


class ConfigError(ValueError):
    """An environment variable holds a value the adapter cannot use."""


def _env_positive(name: str, default, kind: type, what: str, zero_ok: bool = False):
    """A positive number of `kind` (int or float) from the environment (or 0, when ``zero_ok``), or the
    default when unset."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError as err:
        raise ConfigError(f"{name}={text!r} is not {what}") from err
    if not math.isfinite(value):  # nan passed every comparison below; inf would be a deadline never reached
        raise ConfigError(f"{name}={text!r} is not a finite number")
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{name}={text!r} must be {'0 or more' if zero_ok else 'positive'}")
    return value


def _env_float(name: str, default: float, zero_ok: bool = False) -> float:
    return _env_positive(name, default, float, "a number", zero_ok)


def _env_int(name: str, default: int) -> int:
    return _env_positive(name, default, int, "a whole number")


def _env_port(name: str) -> int | None:
    """A port number (1-65535) from the environment, or None when unset: 70000 passed as a positive whole
    number and failed only when the port was bound, without the variable's name."""
    try:
        return shared.ports_from_env(os.environ, {}, {name: name}).get(name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _env_origins(name: str) -> list[str]:
    text = os.environ.get(name, "")
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def _env_flag(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if text == "":
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text!r} is not 1/0 (true/false)")


def torchserve_response_timeout(model_config: str, must_read: bool = False) -> float | None:
    """TorchServe's per-batch `responseTimeout` (s) from the archive's model-config.yaml; None if absent
    (or the file unreadable, unless ``must_read``: a TS_MODEL_CONFIG given by name must be there)."""
    import yaml  # only at start-up

    try:
        config = shared.read_model_config(model_config)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:  # (not text: the .mar, say)
        if must_read:
            raise ConfigError(f"TS_MODEL_CONFIG={model_config!r} cannot be read: "
                              f"{err.strerror if isinstance(err, OSError) else 'not a YAML file'}") from None
        return None
    value = config.get("responseTimeout") if isinstance(config, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


# TorchServe's own responseTimeout (s) when the archive's model-config.yaml is not where the adapter looks.
TORCHSERVE_DEFAULT_RESPONSE_TIMEOUT_S = 120.0


def _torchserve_url(api: str) -> str:
    """TorchServe's API where `make serve` starts it: its port moved by TS_<API>_PORT (serving/settings.py)."""
    try:
        port = shared.torchserve_ports(os.environ)[api]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return f"http://{shared.TORCHSERVE_HOST}:{port}"


@dataclass(frozen=True)
class Settings:
    inference_url: str = f"http://{shared.TORCHSERVE_HOST}:{shared.TORCHSERVE_PORTS['inference']}"
    management_url: str = f"http://{shared.TORCHSERVE_HOST}:{shared.TORCHSERVE_PORTS['management']}"
    model_name: str = shared.MODEL_NAME
    key_file: str = "key_file.json"
    connect_timeout_s: float = 2.0
    predict_timeout_s: float = 10.0
    response_timeout_s: float | None = None  # TorchServe's; None: read from model_config
    model_server_hold: float | None = None  # MODEL_SERVER_HOLD_S; None: the response timeout
    model_config: str = str(shared.MODEL_CONFIG)
    health_timeout_s: float = 3.0
    max_connections: int = 24
    oip_url: str = ""
    oip_host_header: str = ""
    health_max_silence_s: float = 10.0
    health_cache_s: float = 1.0
    max_upload_bytes: int = shared.MAX_UPLOAD_BYTES
    max_requests_in_flight: int = 64
    max_bytes_in_flight: int = 100 * 1024 * 1024
    max_client_requests_in_flight: int = 16
    max_client_bytes_in_flight: int = 32 * 1024 * 1024
    max_explanations_in_flight: int = 4
    max_client_explanations_in_flight: int = 2
    explanation_wait_s: float = 5.0
    retry_after_s: int = 1
    min_upload_rate: int = shared.MIN_UPLOAD_RATE
    min_rate_grace_s: float = shared.MIN_RATE_GRACE_S
    max_open_connections: int = 512
    max_client_connections: int = 64
    trusted_proxies: list[str] = field(default_factory=list)
    body_timeout_s: float = shared.BODY_TIMEOUT_S
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_header_count: int = 100
    max_form_parts: int = 16
    max_pipelined_requests: int = 16
    send_timeout_s: float = 30.0
    cors_allow_origins: list[str] = field(default_factory=list)
    docs: bool = False
    log_max_bytes: int = shared.LOG_MAX_BYTES
    log_backups: int = shared.LOG_BACKUPS
    metrics: bool = True
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    request_id_max_length: int = shared.REQUEST_ID_MAX_LENGTH
    frontend_dir: str = str(DEFAULT_FRONTEND_DIR)
    shrink_uploads: bool = True
    shrink_min_bytes: int = images.SHRINK_MIN_BYTES
    shrink_workers: int = 2  # the machine's cores: decoding is CPU work
    shrink_wait_s: float = 5.0

    def check(self) -> None:
        """Refuse settings that contradict each other (called at start-up)."""
        # Not read when TS_RESPONSE_TIMEOUT_S says it; the default file may be absent (an adapter deployed alone).
        response_timeout = self.response_timeout_s or torchserve_response_timeout(
            self.model_config, must_read=self.model_config != str(shared.MODEL_CONFIG))
        # A wedged worker is restarted by TorchServe only after responseTimeout; the client must
        # hear 504 from the adapter before that, not wait for TorchServe's own verdict.
        if response_timeout is not None and self.predict_timeout_s >= response_timeout:
            raise ConfigError(
                f"TS_PREDICT_TIMEOUT_S={self.predict_timeout_s:g} must be below TorchServe's "
                f"responseTimeout ({response_timeout:g} s, TS_RESPONSE_TIMEOUT_S or {self.model_config})")
        # A full-size upload declares the image plus its form, and a chunked one counts as that much
        # (adapter/limits.py): the budgets must hold it.
        from .upload import FORM_OVERHEAD_BYTES, upload_body_limit  # (starlette: only when checking)

        full_upload = upload_body_limit(self.max_upload_bytes)
        if self.max_bytes_in_flight < full_upload:
            raise ConfigError(f"MAX_BYTES_IN_FLIGHT={self.max_bytes_in_flight} is below MAX_UPLOAD_BYTES="
                              f"{self.max_upload_bytes} + {FORM_OVERHEAD_BYTES} (the form around the image): "
                              "no full-size upload could ever be accepted")
        if self.max_client_bytes_in_flight < full_upload:
            raise ConfigError(f"MAX_CLIENT_BYTES_IN_FLIGHT={self.max_client_bytes_in_flight} is below "
                              f"MAX_UPLOAD_BYTES={self.max_upload_bytes} + {FORM_OVERHEAD_BYTES} (the form around "
                              "the image): no client could send a full-size upload")
        # The model servers' log lines name a request by at most this much of its id (handler/protocols.py).
        if self.request_id_max_length > shared.REQUEST_ID_MAX_LENGTH:
            raise ConfigError(f"REQUEST_ID_MAX_LENGTH={self.request_id_max_length} is above "
                              f"{shared.REQUEST_ID_MAX_LENGTH}: the model servers' logs keep no longer an id "
                              "(serving/settings.py), so a longer one could not be found there")
        try:
            proxy_networks(self.trusted_proxies)
        except ValueError as err:
            raise ConfigError(f"TRUSTED_PROXIES: {err}") from None

    def model_server_hold_s(self) -> float:
        """How long the model server may still work on a request after the adapter stopped waiting for it
        (504, or its task cancelled): TorchServe keeps the request queued, and a batch runs until it answers or
        responseTimeout passes. Until then the request keeps its place in the caps (adapter/limits.py). A model
        server that stops a request whose client left (the adapter closes the connection) holds nothing after it:
        MODEL_SERVER_HOLD_S=0."""
        if self.model_server_hold is not None:
            return self.model_server_hold
        return (self.response_timeout_s or torchserve_response_timeout(self.model_config)
                or TORCHSERVE_DEFAULT_RESPONSE_TIMEOUT_S)

    def trusted_networks(self) -> list[str]:
        """TRUSTED_PROXIES as networks (serving/clients.py proxy_networks), for uvicorn and the connection caps
        (adapter/protocol.py) alike."""
        return proxy_networks(self.trusted_proxies)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            inference_url=os.environ.get("TS_INFERENCE_URL", _torchserve_url("inference")).rstrip("/"),
            management_url=os.environ.get("TS_MANAGEMENT_URL", _torchserve_url("management")).rstrip("/"),
            model_name=os.environ.get("TS_MODEL_NAME", cls.model_name),
            key_file=os.environ.get("TS_KEY_FILE", cls.key_file),
            connect_timeout_s=_env_float("TS_CONNECT_TIMEOUT_S", cls.connect_timeout_s),
            predict_timeout_s=_env_float("TS_PREDICT_TIMEOUT_S", cls.predict_timeout_s),
            response_timeout_s=_env_float("TS_RESPONSE_TIMEOUT_S", None),
            model_server_hold=_env_float("MODEL_SERVER_HOLD_S", None, zero_ok=True),
            model_config=os.environ.get("TS_MODEL_CONFIG", cls.model_config),
            health_timeout_s=_env_float("TS_HEALTH_TIMEOUT_S", cls.health_timeout_s),
            max_connections=_env_int("TS_MAX_CONNECTIONS", cls.max_connections),
            oip_url=os.environ.get("OIP_URL", cls.oip_url).rstrip("/"),
            oip_host_header=os.environ.get("OIP_HOST_HEADER", cls.oip_host_header),
            health_max_silence_s=_env_float("HEALTH_MAX_SILENCE_S", cls.health_max_silence_s),
            health_cache_s=_env_float("HEALTH_CACHE_S", cls.health_cache_s, zero_ok=True),
            max_upload_bytes=_env_int("MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            max_requests_in_flight=_env_int("MAX_REQUESTS_IN_FLIGHT", cls.max_requests_in_flight),
            max_bytes_in_flight=_env_int("MAX_BYTES_IN_FLIGHT", cls.max_bytes_in_flight),
            max_client_requests_in_flight=_env_int("MAX_CLIENT_REQUESTS_IN_FLIGHT",
                                                   cls.max_client_requests_in_flight),
            max_client_bytes_in_flight=_env_int("MAX_CLIENT_BYTES_IN_FLIGHT", cls.max_client_bytes_in_flight),
            max_explanations_in_flight=_env_int("MAX_EXPLANATIONS_IN_FLIGHT", cls.max_explanations_in_flight),
            max_client_explanations_in_flight=_env_int("MAX_CLIENT_EXPLANATIONS_IN_FLIGHT",
                                                       cls.max_client_explanations_in_flight),
            explanation_wait_s=_env_float("EXPLANATION_WAIT_S", cls.explanation_wait_s),
            retry_after_s=_env_int("RETRY_AFTER_S", cls.retry_after_s),
            min_upload_rate=_env_int("MIN_UPLOAD_RATE", cls.min_upload_rate),
            min_rate_grace_s=_env_float("MIN_RATE_GRACE_S", cls.min_rate_grace_s),
            max_open_connections=_env_int("MAX_OPEN_CONNECTIONS", cls.max_open_connections),
            max_client_connections=_env_int("MAX_CLIENT_CONNECTIONS", cls.max_client_connections),
            trusted_proxies=_env_origins("TRUSTED_PROXIES"),
            body_timeout_s=_env_float("BODY_TIMEOUT_S", cls.body_timeout_s),
            header_timeout_s=_env_float("HEADER_TIMEOUT_S", cls.header_timeout_s),
            keepalive_timeout_s=_env_float("KEEPALIVE_TIMEOUT_S", cls.keepalive_timeout_s),
            max_header_bytes=_env_int("MAX_HEADER_BYTES", cls.max_header_bytes),
            max_header_count=_env_int("MAX_HEADER_COUNT", cls.max_header_count),
            max_form_parts=_env_int("MAX_FORM_PARTS", cls.max_form_parts),
            max_pipelined_requests=_env_int("MAX_PIPELINED_REQUESTS", cls.max_pipelined_requests),
            send_timeout_s=_env_float("SEND_TIMEOUT_S", cls.send_timeout_s),
            cors_allow_origins=_env_origins("CORS_ALLOW_ORIGINS"),
            docs=_env_flag("ADAPTER_DOCS", cls.docs),
            log_max_bytes=_env_int("ADAPTER_LOG_MAX_BYTES", cls.log_max_bytes),
            log_backups=_env_int("ADAPTER_LOG_BACKUPS", cls.log_backups),
            metrics=_env_flag("METRICS_ENABLED", cls.metrics),
            metrics_port=_env_port("METRICS_PORT"),
            metrics_host=os.environ.get("METRICS_HOST", cls.metrics_host),
            request_id_max_length=_env_int("REQUEST_ID_MAX_LENGTH", cls.request_id_max_length),
            frontend_dir=os.environ.get("FRONTEND_DIR", str(DEFAULT_FRONTEND_DIR)),
            shrink_uploads=_env_flag("SHRINK_UPLOADS", cls.shrink_uploads),
            shrink_min_bytes=_env_int("SHRINK_MIN_BYTES", cls.shrink_min_bytes),
            shrink_workers=_env_int("SHRINK_WORKERS", cls.shrink_workers),
            shrink_wait_s=_env_float("SHRINK_WAIT_S", cls.shrink_wait_s),
        )
