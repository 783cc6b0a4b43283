"""A real TorchServe for the tests: built from this checkout, on free loopback ports.

``start_test_torchserve(root)`` packages the shipped default weights (model/weights/, or
$CIFAR100_TEST_WEIGHTS) with this checkout's handler into ``root/model_store/cifar100.mar`` and
starts a TorchServe whose key_file.json, config, logs and TMPDIR/TEMP all live under ``root``; it
returns a :class:`serving.torchserve.TorchServeInstance`, which offers

    inference_url, management_url, metrics_url, predictions_url, model_name
    key_file        serving.keys.KeyFile of this instance (header("inference"), renew(...))
    stop(), start() + wait_ready(), is_running(), worker_statuses()

conftest.py wraps it in the session fixture ``torchserve`` shared by every serving test (one Java
start per test session; a start takes ~10-20 s on 2 busy cores).
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from model.shipped import SHIPPED_WEIGHTS
from serving.settings import MODEL_CONFIG
from serving.archive import build_archive
from serving.torchserve import TorchServeInstance

WEIGHTS_ENV = "CIFAR100_TEST_WEIGHTS"
READY_TIMEOUT_S = 600  # generous: the first start on a machine compiles the engine (handler/engine.py), CI is slow
HTTP_TIMEOUT_S = 60.0  # no test request may hang: every call has a deadline (connect: 10 s)


def weights_under_test() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV, SHIPPED_WEIGHTS))


def start_test_torchserve(root: Path, weights: Path | None = None, model_config: Path = MODEL_CONFIG) -> TorchServeInstance:
    """A started, READY TorchServe serving ``weights`` (default: the weights under test) packaged with ``model_config``."""
    if shutil.which("java") is None:
        raise RuntimeError("TorchServe needs Java on PATH: run `make install-system` (openjdk-17-jre-headless)")
    root = Path(root)
    store = root / "model_store"
    build_archive(weights or weights_under_test(), store, quiet=True, model_config=model_config)
    ts = TorchServeInstance.on_free_ports(root, model_store=store)
    ts.start()
    try:
        ts.wait_ready(READY_TIMEOUT_S)
    except Exception:
        ts.stop()
        raise
    return ts


def stop_meanwhile(ts: TorchServeInstance, config) -> None:
    """Stop ``ts`` while the next tests run: a stop waits ~4 s for Java and its workers to exit, with a quarter of a
    second of CPU among them. ``config`` (pytest's) waits for it at the session's end, so nothing outlives the run."""
    stopping = threading.Thread(target=ts.stop, name=f"stop TorchServe {ts.workdir}")
    stopping.start()
    config.add_cleanup(stopping.join)
