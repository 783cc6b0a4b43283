"""`make serve-kserve` and `make stop`: the README's TorchServe-free service (the KServe bundle under
KServe's own model server, the adapter in OIP mode in front, the page), run from the repository root as a
user runs it, on free ports (ADAPTER_PORT, PREDICTOR_HTTP_PORT, PREDICTOR_GRPC_PORT), in a copy of the
checkout (tests/checkout.py): its dist/kserve and logs/ are the copy's, so a service started in this one keeps
running.
"""
from __future__ import annotations

import socket
from pathlib import Path

import httpx
import psutil
import pytest

from model.shipped import SHIPPED_WEIGHTS
from serving.process import port_in_use
from serving.settings import PREDICTOR_ARGS_ENV, PREDICTOR_PORT_ENV, TORCHSERVE_PORT_ENV
from checkout import Commands, user_in_a_copy
from serving_helpers import ReferenceModel

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "frontend" / "examples" / "test-00042.png"  # CIFAR-100 test image 42
MAKE_TIMEOUT_S = 600
pytestmark = pytest.mark.integration  # KServe's model server, the adapter


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Commands:
    """A user's shell in a copy of the checkout, with free ports for the adapter and KServe's server."""
    return user_in_a_copy(tmp_path_factory.mktemp("checkout"), ["ADAPTER_PORT", *PREDICTOR_PORT_ENV.values(),
                                                                *TORCHSERVE_PORT_ENV.values()], MAKE_TIMEOUT_S)


# Options of KServe's model server for `make serve-kserve` (the defaults otherwise).
PREDICTOR_ARGS = "--log_max_bytes 5000000 --log_backups 2"


@pytest.fixture(scope="module")
def served(user):
    user.env[PREDICTOR_ARGS_ENV] = PREDICTOR_ARGS
    try:
        yield user.make("serve-kserve")
    finally:
        user.make("stop")


def test_make_serve_kserve_answers_through_kserves_server_without_torchserve(served, user):
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    adapter = f"http://127.0.0.1:{user.env['ADAPTER_PORT']}"
    assert f"{adapter}/" in served.stdout
    health = httpx.get(f"{adapter}/health", timeout=30)
    assert health.status_code == 200 and health.json()["backend"] == "oip", health.text
    r = httpx.post(f"{adapter}/classify/", files={"image": ("test-00042.png", EXAMPLE.read_bytes(), "image/png")},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["index"] == int(ReferenceModel(SHIPPED_WEIGHTS).probs_of_bytes(EXAMPLE.read_bytes()).argmax())
    assert user.status("serving.kserve", "predictor") == 0
    assert user.status("serving.torchserve") == 3  # no TorchServe, no Java
    # gRPC is served too, on its own port.
    assert port_in_use(int(user.env[PREDICTOR_PORT_ENV["grpc"]]))
    assert (user.root / "logs" / "predictor.log").is_file() and (user.root / "dist" / "kserve").is_dir()  # the copy's
    pid = int((user.root / "logs" / "kserve-predictor.pid").read_text().split()[0])
    assert psutil.Process(pid).cmdline()[-4:] == PREDICTOR_ARGS.split()  # PREDICTOR_ARGS reached it
    # The predictor stops a request whose client left: the adapter holds nothing after giving one up.
    assert "a request given up on held 0 s more" in (user.root / "logs" / "adapter.log").read_text()


def test_make_stop_stops_kserves_server_and_the_adapter(served, user):
    assert served.returncode == 0
    stopped = user.make("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "Adapter stopped" in stopped.stdout and "KServe's model server stopped" in stopped.stdout
    assert user.status("adapter.run") == 3 and user.status("serving.kserve", "predictor") == 3
    for variable in ("ADAPTER_PORT", *PREDICTOR_PORT_ENV.values()):
        assert not port_in_use(int(user.env[variable])), variable


def test_a_busy_predictor_port_is_named_with_its_variable(user):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        done = user.python("serving.kserve", "predictor", "start", timeout=120,
                           **{PREDICTOR_PORT_ENV["grpc"]: str(port)})
    assert done.returncode == 1
    assert str(port) in done.stderr and "already in use" in done.stderr and "PREDICTOR_GRPC_PORT" in done.stderr
