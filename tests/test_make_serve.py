"""The README's own commands: `make serve` and `make stop`, run from the repository root as a user
runs them, on free ports (ADAPTER_PORT and TorchServe's TS_*_PORT variables).

They serve a copy of the shipped weights whose calibration.json was fitted on other weights (the
sha256 mismatch path): `make serve` warns and names `python -m training.calibrate`, and the
answers are the plain softmax, never "unsure". They run in a copy of the checkout (tests/checkout.py):
its logs/, key_file.json and model_store/ are the copy's, so a service started in this one keeps running.
A busy port is refused at once, naming the port and the variable that moves it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from serving.process import port_in_use
from serving.settings import CALIBRATION_FILE, TORCHSERVE_PORT_ENV
from checkout import Commands, user_in_a_copy
from ctrl_c import sigint_as_in_a_terminal, stopped_by
from serving_helpers import ReferenceModel

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "frontend" / "examples" / "test-00042.png"  # CIFAR-100 test image 42
MAKE_TIMEOUT_S = 600  # archive + TorchServe READY on a busy 2-core machine
pytestmark = pytest.mark.integration  # Java, TorchServe, the adapter


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Commands:
    """A user's shell in a copy of the checkout, with free ports for the adapter and TorchServe."""
    return user_in_a_copy(tmp_path_factory.mktemp("checkout"), ["ADAPTER_PORT", *TORCHSERVE_PORT_ENV.values()],
                          MAKE_TIMEOUT_S)


@pytest.fixture(scope="module")
def miscalibrated_weights(tmp_path_factory) -> Path:
    """The shipped weights beside a calibration.json fitted on other weights."""
    folder = tmp_path_factory.mktemp("weights")
    weights = folder / "CIFAR100_model.pth"
    shutil.copy(SHIPPED_WEIGHTS, weights)
    record = json.loads((SHIPPED_WEIGHTS_DIR / CALIBRATION_FILE).read_text())
    record["weights_sha256"] = "0" * 64
    (folder / CALIBRATION_FILE).write_text(json.dumps(record))
    return weights


@pytest.fixture(scope="module")
def served(user, miscalibrated_weights):
    """`make serve WEIGHTS=...` (run once), then `make stop` whatever happens."""
    try:
        yield user.make("serve", f"WEIGHTS={miscalibrated_weights}")
    finally:
        user.make("stop")


def test_make_serve_answers_classify_uncalibrated_and_says_so(served, user, miscalibrated_weights):
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    assert "was fitted on other weights: serving uncalibrated probabilities" in served.stderr
    assert f"python -m training.calibrate {miscalibrated_weights}" in served.stderr
    assert f"http://127.0.0.1:{user.env['ADAPTER_PORT']}/" in served.stdout
    r = httpx.post(f"http://127.0.0.1:{user.env['ADAPTER_PORT']}/classify/",
                   files={"image": ("test-00042.png", EXAMPLE.read_bytes(), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    plain = ReferenceModel(miscalibrated_weights).probs_of_bytes(EXAMPLE.read_bytes())
    calibrated = ReferenceModel(SHIPPED_WEIGHTS).probs_of_bytes(EXAMPLE.read_bytes())
    assert answer["index"] == int(plain.argmax())
    assert answer["probability"] == pytest.approx(float(plain.max()), abs=2e-4)
    assert abs(float(calibrated.max()) - float(plain.max())) > 0.01  # the check above tells them apart
    assert answer["unsure"] is False  # no threshold without a calibration
    # The copy's own service: its logs and archive, none of this checkout's.
    assert (user.root / "logs" / "adapter.log").is_file() and (user.root / "model_store" / "cifar100.mar").is_file()


def test_make_serve_again_is_idempotent_and_status_says_running(served, user):
    assert served.returncode == 0
    again = user.make("serve", f"WEIGHTS={SHIPPED_WEIGHTS}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "TorchServe was already running" in again.stdout and "Adapter already running" in again.stdout
    # Other weights than those served: the archive was rebuilt, the running server keeps the old one.
    assert "keeps serving the model it loaded" in again.stderr and "make rollout" in again.stderr
    assert "changed handler or model-config.yaml" in again.stderr and "make stop && make serve" in again.stderr
    assert user.status("adapter.run") == 0 and user.status("serving.torchserve") == 0


def test_make_stop_stops_both_and_says_so(served, user):
    assert served.returncode == 0
    stopped = user.make("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "Adapter stopped" in stopped.stdout and "TorchServe stopped." in stopped.stdout
    assert user.status("adapter.run") == 3 and user.status("serving.torchserve") == 3
    assert not port_in_use(int(user.env["ADAPTER_PORT"])) and not port_in_use(int(user.env["TS_INFERENCE_PORT"]))
    again = user.make("stop")
    assert again.returncode == 0 and "Adapter not running." in again.stdout
    assert "TorchServe was not running." in again.stdout
    # One stop that fails (here a bad setting) fails `make stop` (it exited 0: `make stop && make serve` went on),
    # after the others were tried.
    failed = subprocess.run(["make", "--no-print-directory", "stop"], cwd=user.root, capture_output=True, text=True,
                            env={**user.env, "TS_INFERENCE_PORT": "abc"}, timeout=user.make_timeout_s)
    assert failed.returncode != 0 and "TS_INFERENCE_PORT='abc'" in failed.stderr, failed.stderr
    assert "Adapter not running." in failed.stdout and "KServe's model server not running." in failed.stdout


@pytest.mark.parametrize("module, variable", [("serving.torchserve", "TS_MANAGEMENT_PORT"),
                                              ("adapter.run", "ADAPTER_PORT")])
def test_a_busy_port_is_named_with_its_cause(user, module, variable):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        done = user.python(module, "start", timeout=120, **{variable: str(port)})
    assert done.returncode == 1
    assert f"{port}" in done.stderr and "already in use" in done.stderr and variable in done.stderr, done.stderr


@pytest.fixture
def user_with_a_corrupt_archive(tmp_path) -> Commands:
    """A copy of the checkout whose model_store/cifar100.mar is random bytes (the review's: its worker crash-loops)."""
    user = user_in_a_copy(tmp_path, list(TORCHSERVE_PORT_ENV.values()), MAKE_TIMEOUT_S)
    (user.root / "model_store").mkdir(exist_ok=True)
    (user.root / "model_store" / "cifar100.mar").write_bytes(os.urandom(5000))
    try:
        yield user
    finally:
        user.python("serving.torchserve", "stop")


def test_a_model_that_cannot_load_fails_the_start_early_and_leaves_nothing_running(user_with_a_corrupt_archive):
    """It waited the whole startupTimeout (600 s) while the worker crash-looped, and left Java holding the ports."""
    user = user_with_a_corrupt_archive
    started = time.monotonic()
    done = user.python("serving.torchserve", "start", timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "Load model failed" in done.stderr and str(user.root / "logs" / "ts_log.log") in done.stderr
    assert "was stopped" in done.stderr
    assert user.status("serving.torchserve") == 3
    assert not any(port_in_use(int(user.env[variable])) for variable in TORCHSERVE_PORT_ENV.values())


def test_ctrl_c_while_torchserve_starts_stops_it_without_a_traceback(user_with_a_corrupt_archive):
    user = user_with_a_corrupt_archive
    # Only the interrupt may end the wait (the failed loads would, 3 of them within ~4 s: before the signal, once).
    env = {**user.env, "TS_START_LOAD_FAILURES": "1000"}
    start = subprocess.Popen([sys.executable, "-m", "serving.torchserve", "start"], cwd=user.root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        ts_log = user.root / "logs" / "ts_log.log"

        def loading_fails() -> bool:  # Java is up and past its start, and the READY wait polls
            return port_in_use(int(user.env["TS_MANAGEMENT_PORT"])) and ts_log.is_file() \
                and "Load model failed" in ts_log.read_text(errors="replace")
        while not loading_fails():
            assert time.monotonic() < deadline and start.poll() is None, start.communicate()
            time.sleep(0.2)
        start.send_signal(signal.SIGINT)
        try:
            _, err = start.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            start.kill()
            pytest.fail(f"still running 120 s after Ctrl-C: {start.communicate()}")
    finally:
        if start.poll() is None:
            start.kill()
    assert start.returncode in stopped_by(signal.SIGINT) and err.startswith("error: interrupted") and "Traceback" not in err, err
    assert "was stopped" in err
    assert user.status("serving.torchserve") == 3
    assert not any(port_in_use(int(user.env[variable])) for variable in TORCHSERVE_PORT_ENV.values())
