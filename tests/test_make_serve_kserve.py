"""`make serve-kserve` and `make stop`: the README's TorchServe-free service (the KServe bundle under
KServe's own model server, the adapter in OIP mode in front, the page), run from the repository root as a
user runs it, on free ports (ADAPTER_PORT, PREDICTOR_HTTP_PORT, PREDICTOR_GRPC_PORT). It uses the
repository's dist/kserve and logs/ as the make target does, so the default service must not be running.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serving.archive import DEFAULT_WEIGHTS
from serving.process import free_ports, port_in_use
from serving.settings import PREDICTOR_PORT_ENV, TORCHSERVE_PORT_ENV
from serving_helpers import ReferenceModel

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "frontend" / "examples" / "test-00042.png"  # CIFAR-100 test image 42
MAKE_TIMEOUT_S = 600
pytestmark = pytest.mark.integration  # KServe's model server, the adapter


def status(args: list[str], env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, "-m", *args, "status"], cwd=REPO, env=env, capture_output=True,
                          timeout=60).returncode


def make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", target], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=MAKE_TIMEOUT_S)


@pytest.fixture(scope="module")
def env():
    ports = free_ports(3 + len(TORCHSERVE_PORT_ENV))
    env = {**os.environ, "ADAPTER_PORT": str(ports[0]), PREDICTOR_PORT_ENV["http"]: str(ports[1]),
           PREDICTOR_PORT_ENV["grpc"]: str(ports[2]),
           **{variable: str(port) for variable, port in zip(TORCHSERVE_PORT_ENV.values(), ports[3:])}}
    env.pop("PYTHONPATH", None)  # as a user's shell
    for args in (["adapter.run"], ["serving.kserve", "predictor"]):
        if status(args, env) == 0:
            pytest.fail(f"`python -m {' '.join(args)} status`: the repository's own service is running; "
                        "`make stop` it before running these tests (they use its logs/)")
    return env


@pytest.fixture(scope="module")
def served(env):
    try:
        yield make("serve-kserve", env)
    finally:
        make("stop", env)


def test_make_serve_kserve_answers_through_kserves_server_without_torchserve(served, env):
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    adapter = f"http://127.0.0.1:{env['ADAPTER_PORT']}"
    assert f"{adapter}/" in served.stdout
    health = httpx.get(f"{adapter}/health", timeout=30)
    assert health.status_code == 200 and health.json()["backend"] == "oip", health.text
    r = httpx.post(f"{adapter}/classify/", files={"image": ("test-00042.png", EXAMPLE.read_bytes(), "image/png")},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["index"] == int(ReferenceModel(DEFAULT_WEIGHTS).probs_of_bytes(EXAMPLE.read_bytes()).argmax())
    assert status(["serving.kserve", "predictor"], env) == 0
    assert status(["serving.torchserve"], env) == 3  # no TorchServe, no Java
    # gRPC is served too, on its own port.
    assert port_in_use(int(env[PREDICTOR_PORT_ENV["grpc"]]))


def test_make_stop_stops_kserves_server_and_the_adapter(served, env):
    assert served.returncode == 0
    stopped = make("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    assert "Adapter stopped" in stopped.stdout and "KServe's model server stopped" in stopped.stdout
    assert status(["adapter.run"], env) == 3 and status(["serving.kserve", "predictor"], env) == 3
    for variable in ("ADAPTER_PORT", *PREDICTOR_PORT_ENV.values()):
        assert not port_in_use(int(env[variable])), variable


def test_a_busy_predictor_port_is_named_with_its_variable(env):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "serving.kserve", "predictor", "start"], cwd=REPO,
                              env={**env, PREDICTOR_PORT_ENV["grpc"]: str(port)}, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert str(port) in done.stderr and "already in use" in done.stderr and "PREDICTOR_GRPC_PORT" in done.stderr
