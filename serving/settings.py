"""The service's shared facts, one home each: read by serving/, the adapter (which tells the page,
GET /settings), the handler (packed into the archive beside it) and the benchmarks.

Standard library only: the adapter and the handler both import it. TorchServe reads its own ports
from config.properties; tests/test_settings.py checks that file agrees with the ports here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

MODEL_NAME = "cifar100"          # the model's name in TorchServe / KServe, and the archive's (cifar100.mar)
# The model-config.yaml an archive packs unless told another (TS_MODEL_CONFIG): batching, workers, the handler's
# settings, and TorchServe's responseTimeout (the adapter's deadline must be shorter).
MODEL_CONFIG = Path(__file__).resolve().parents[1] / "handler" / "model-config.yaml"


def read_model_config(path: Path | str = MODEL_CONFIG) -> dict:
    """A model-config.yaml's settings ({} for an empty file); OSError or yaml.YAMLError when it cannot be read."""
    import yaml  # here, not above: this module stays standard library for the handler

    return yaml.safe_load(Path(path).read_text()) or {}


# TorchServe on loopback (config.properties says the same to TorchServe itself).
TORCHSERVE_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082, "grpc_inference": 7070,
                    "grpc_management": 7071}
TORCHSERVE_HOST = "127.0.0.1"
# Environment variables that move them (`make serve`: TorchServe listens there, the adapter calls there).
TORCHSERVE_PORT_ENV = {"inference": "TS_INFERENCE_PORT", "management": "TS_MANAGEMENT_PORT",
                       "metrics": "TS_METRICS_PORT", "grpc_inference": "TS_GRPC_INFERENCE_PORT",
                       "grpc_management": "TS_GRPC_MANAGEMENT_PORT"}


def torchserve_ports(environ: Mapping[str, str], defaults: Mapping[str, int] = TORCHSERVE_PORTS) -> dict[str, int]:
    """TorchServe's ports: `defaults`, each replaced by its TORCHSERVE_PORT_ENV variable when set."""
    return ports_from_env(environ, defaults, TORCHSERVE_PORT_ENV)


def ports_from_env(environ: Mapping[str, str], defaults: Mapping[str, int],
                   variables: Mapping[str, str]) -> dict[str, int]:
    """`defaults`, each replaced by its variable's value when set (not empty); ValueError (naming the
    variable) for a value that is no port number."""
    ports = dict(defaults)
    for name, variable in variables.items():
        text = environ.get(variable, "").strip()
        if text:
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise ValueError(f"{variable}={text!r} is not a port number (1-65535)")
            ports[name] = int(text)
    return ports


# KServe's own model server run locally (`make serve-kserve`): REST and gRPC ports, and the variables that move them.
PREDICTOR_PORTS = {"http": 8085, "grpc": 8086}
PREDICTOR_PORT_ENV = {"http": "PREDICTOR_HTTP_PORT", "grpc": "PREDICTOR_GRPC_PORT"}
# Its other options (python -m handler.kserve_predictor --help: bounds, deadlines, log rotation), as a shell would
# split them: `PREDICTOR_ARGS="--log_max_bytes 1048576" make serve-kserve`.
PREDICTOR_ARGS_ENV = "PREDICTOR_ARGS"
ADAPTER_HOST = "127.0.0.1"       # the adapter: the one process that faces users
ADAPTER_PORT = 8000
# Where the adapter's and KServe's predictor's logs rotate (serving/rotating_log.py), and the old files they keep:
# the adapter's ADAPTER_LOG_MAX_BYTES / ADAPTER_LOG_BACKUPS, the predictor's --log_max_bytes / --log_backups.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5

# The longest request id kept or echoed: a client's X-Request-ID at the adapter (its REQUEST_ID_MAX_LENGTH overrides
# it there; a longer one is replaced), and a v2 request's "id", which the answer echoes (a longer one: 400; an 11 MB id
# echoed to 100 clients that read nothing held KServe's predictor 0.9 GB up).
REQUEST_ID_MAX_LENGTH = 128
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # one image through the adapter (413 above); the page checks it first
# How long a request's body may take to arrive (serving/pace.py): the adapter's defaults, and KServe's predictor's.
BODY_TIMEOUT_S = 30.0                # all of it, at most (-> 408)
MIN_UPLOAD_RATE = 16 * 1024          # bytes/s on average once MIN_RATE_GRACE_S has passed (-> 408)
MIN_RATE_GRACE_S = 2.0
# Temperature and "unsure" threshold (training/calibrate.py), beside the weights and in the archive.
CALIBRATION_FILE = "calibration.json"
# The engines' accuracy record (training/engines.py) and the training images the worker calibrates
# int8 with and probes each engine on at start (handler/engine.py); beside the weights and in the archive.
ENGINE_RECORD_FILE = "engines.json"
ENGINE_INPUTS_FILE = "engine_inputs.pt"
# The openvino-int8 engine's network (training/quantize.py; its weights in the .bin of the same name).
ENGINE_INT8_FILE = "engine_int8.xml"
# Where compiled engines are kept across worker restarts (serving/torchserve.py sets it for TorchServe).
ENGINE_CACHE_ENV = "CIFAR100_ENGINE_CACHE"
# How many compiled packages (~8 MB each) that folder keeps: the most recently used ones; older ones
# (other weights, torch versions, thread counts) are deleted when a new one is written.
ENGINE_CACHE_KEEP_ENV = "CIFAR100_ENGINE_CACHE_KEEP"
ENGINE_CACHE_KEEP = 8
TOP_K = 5                            # answers per image: the handler's default (model-config.yaml sets it)

# Open Inference Protocol (v2) outputs of the handler, one row per image ([n], or [n, k] for top-k),
# with their datatypes; the adapter's OIP client reads the same names back.
V2_OUTPUTS = {
    "label": "BYTES",              # [n] class label, e.g. "aquarium_fish"
    "name": "BYTES",               # [n] display name, e.g. "Aquarium fish"
    "index": "INT64",              # [n] class index 0..99
    "probability": "FP32",         # [n] probability of that class (temperature-calibrated)
    "unsure": "BOOL",              # [n] probability below the calibrated threshold (model/README.md)
    "topk_label": "BYTES",         # [n, k] the k most likely labels, best first
    "topk_name": "BYTES",          # [n, k] their display names
    "topk_index": "INT64",         # [n, k] their indices
    "topk_probability": "FP32",    # [n, k] their probabilities
}

# Logged by a TorchServe worker once it can explain (its first explanation: Captum imported, the explanation model
# built); a rollout's warm-up sends each new worker one and looks for this line (serving/rollout.py).
EXPLAINER_READY_LOG_LINE = "explanation model ready in %.2f s"
