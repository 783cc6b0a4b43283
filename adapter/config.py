"""The adapter's settings, read once from environment variables (each has a default).

    TS_INFERENCE_URL      TorchServe inference API              http://127.0.0.1:8080
    TS_MANAGEMENT_URL     TorchServe management API (/health, key renewal)  http://127.0.0.1:8081
    TS_MODEL_NAME         model name registered in TorchServe   cifar100
    TS_KEY_FILE           TorchServe's key_file.json (token auth) key_file.json
    TS_CONNECT_TIMEOUT_S  connecting to TorchServe              2
    TS_PREDICT_TIMEOUT_S  waiting for one prediction (-> 504)   30
    TS_HEALTH_TIMEOUT_S   waiting for the model status          3
    TS_MAX_CONNECTIONS    pooled connections to TorchServe      64
    OIP_URL               an Open Inference Protocol (v2) server to use instead of TorchServe, e.g. a
                          KServe InferenceService's URL (adapter/oip.py; model name TS_MODEL_NAME) (unset)
    OIP_HOST_HEADER       Host header for it (KServe's ingress routes by host name)   (unset)
    MAX_UPLOAD_BYTES      largest accepted image file (-> 413)  10485760 (10 MB)
    CORS_ALLOW_ORIGINS    comma-separated origins, or *         *
    FRONTEND_DIR          folder served at /                    frontend/ beside this package
    ADAPTER_HOST / ADAPTER_PORT  where `python -m adapter.run start` listens  127.0.0.1 / 8000
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"


class ConfigError(ValueError):
    """An environment variable holds a value the adapter cannot use."""


def _env_positive(name: str, default, kind: type, what: str):
    """A positive number of `kind` (int or float) from the environment, or the default when unset."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError as err:
        raise ConfigError(f"{name}={text!r} is not {what}") from err
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be positive")
    return value


def _env_float(name: str, default: float) -> float:
    return _env_positive(name, default, float, "a number")


def _env_int(name: str, default: int) -> int:
    return _env_positive(name, default, int, "a whole number")


def _env_origins(name: str) -> list[str]:
    text = os.environ.get(name, "*")
    return [origin.strip() for origin in text.split(",") if origin.strip()] or ["*"]


@dataclass(frozen=True)
class Settings:
    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    model_name: str = "cifar100"
    key_file: str = "key_file.json"
    connect_timeout_s: float = 2.0
    predict_timeout_s: float = 30.0
    health_timeout_s: float = 3.0
    max_connections: int = 64
    oip_url: str = ""
    oip_host_header: str = ""
    max_upload_bytes: int = 10 * 1024 * 1024
    cors_allow_origins: list[str] = field(default_factory=lambda: ["*"])
    frontend_dir: str = str(DEFAULT_FRONTEND_DIR)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            inference_url=os.environ.get("TS_INFERENCE_URL", cls.inference_url).rstrip("/"),
            management_url=os.environ.get("TS_MANAGEMENT_URL", cls.management_url).rstrip("/"),
            model_name=os.environ.get("TS_MODEL_NAME", cls.model_name),
            key_file=os.environ.get("TS_KEY_FILE", cls.key_file),
            connect_timeout_s=_env_float("TS_CONNECT_TIMEOUT_S", cls.connect_timeout_s),
            predict_timeout_s=_env_float("TS_PREDICT_TIMEOUT_S", cls.predict_timeout_s),
            health_timeout_s=_env_float("TS_HEALTH_TIMEOUT_S", cls.health_timeout_s),
            max_connections=_env_int("TS_MAX_CONNECTIONS", cls.max_connections),
            oip_url=os.environ.get("OIP_URL", cls.oip_url).rstrip("/"),
            oip_host_header=os.environ.get("OIP_HOST_HEADER", cls.oip_host_header),
            max_upload_bytes=_env_int("MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            cors_allow_origins=_env_origins("CORS_ALLOW_ORIGINS"),
            frontend_dir=os.environ.get("FRONTEND_DIR", str(DEFAULT_FRONTEND_DIR)),
        )
