"""The predictor manifests' liveness probes (deploy/kserve/inferenceservice-predictor*.yaml), read as plain YAML
and run as the kubelet would run them, for test_kserve_manifests (their form, against a stand-in) and
test_kserve_predictor (against the real server). No kserve import here: tests/kserve_types.py registers the
package bare in the test process."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

KSERVE_DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kserve"
REST_PORT = 8080  # the containers' --http_port, where the probes ask


def liveness_probe(manifest: Path) -> dict:
    """The manifest's one container's livenessProbe, as written."""
    return yaml.safe_load(manifest.read_text())["spec"]["predictor"]["containers"][0]["livenessProbe"]


def run_exec_probe(command: list[str], port: int) -> tuple[int, float]:
    """An exec probe's command run with this Python (the image's is `python`) and the REST port moved to ``port``
    (8080 is not the tests' to use): (exit code, seconds)."""
    script = command[-1].replace(str(REST_PORT), str(port))
    started = time.monotonic()
    done = subprocess.run([sys.executable, *command[1:-1], script], capture_output=True, timeout=30)
    return done.returncode, time.monotonic() - started
