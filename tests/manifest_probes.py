"""The KServe manifests' liveness probes (deploy/kserve/*.yaml), read as plain YAML and run as the kubelet would
run them, for test_kserve_manifests (their form, against a stand-in), test_kserve_predictor (against the real
predictor) and test_kserve (the TorchServe runtime's, against a real TorchServe). No kserve import here:
tests/kserve_types.py registers the package bare in the test process."""
from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

KSERVE_DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kserve"
REST_PORT = 8080  # the containers' --http_port (KServe's wrapper's, in the TorchServe runtime), where the probes ask


def liveness_probe(manifest: Path) -> dict:
    """The manifest's one container's livenessProbe, as written (a custom container's, or the runtime's model's)."""
    predictor = yaml.safe_load(manifest.read_text())["spec"]["predictor"]
    container = predictor["containers"][0] if "containers" in predictor else predictor["model"]
    return container["livenessProbe"]


def run_exec_probe(command: list[str], ports: int | dict[int, int]) -> tuple[int, float]:
    """An exec probe's command run with this Python (the image's is `python`) and the pod's ports moved to free ones
    here (8080 is not the tests' to use): ``ports`` maps each pod port to this machine's, or is REST_PORT's alone.
    (exit code, seconds)."""
    moved = ports if isinstance(ports, dict) else {REST_PORT: ports}
    script = re.sub(r"\b\d{4,5}\b", lambda m: str(moved.get(int(m.group()), m.group())), command[-1])
    started = time.monotonic()
    done = subprocess.run([sys.executable, *command[1:-1], script], capture_output=True, timeout=30)
    return done.returncode, time.monotonic() - started


class LiveRoute:
    """A stand-in server's REST port: /v2/health/live answers ``status`` (or nothing, ``hang``); other paths 404."""

    def __init__(self, status: int = 200, hang: bool = False):
        route = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if route.hang:
                    route.release.wait(30)
                self.send_response(route.status if self.path == "/v2/health/live" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.status, self.hang, self.release = status, hang, threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
