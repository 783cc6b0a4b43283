"""Shared fixtures.

``torchserve`` (session scope): one real TorchServe (Java + a Python worker) serving this
checkout's handler and the shipped default weights, on free loopback ports, with its own
directory (key_file.json, logs, TMPDIR/TEMP). See tests/torchserve_fixture.py for what the
returned object offers. A test that stops or restarts it must leave it READY again
(``ts.start(); ts.wait_ready()`` in a ``finally``); the fixture ``torchserve_ready`` checks that
before each test that asks for it, restarting the server if an earlier test left it down.

Test tiers: a test is marked ``integration`` when it needs more than Python and this checkout,
that is when it uses (directly or through another fixture) TorchServe (Java), the headless browser
or the CIFAR-100 data (``cifar100_data_dir``), or when its module says ``pytestmark =
pytest.mark.integration``. ``make test-unit`` runs the others (``-m "not integration"``: ~5 min on 2 cores,
no Java, no Chromium, no data); ``make test`` runs both, but the tests marked ``bench`` (a benchmark run end to end
with servers of its own), which ``make test-bench`` runs: CI's ``make test`` must end within 30 minutes; it runs
in two lanes at once (``--lane``, tests/lanes.py: the modules that compute in-process at nice 19 beside the rest).
When selected tests need the data, Java, Chromium, wrk or npm's axe-core and one is missing, the run stops at once
(a failure, never a skip) and says how to get it (tests/system_parts.py).
"""
from __future__ import annotations

import os

import pytest

import background
import lanes
from cifar100_data import data_dir, missing_data_message
from system_parts import AXE, missing_parts, wrk_problem
from torchserve_fixture import HTTP_TIMEOUT_S, READY_TIMEOUT_S, start_test_torchserve, weights_under_test
from serving.settings import PREDICTOR_PORT_ENV, TORCHSERVE_PORT_ENV

# The variables README has a user export to move `make serve` (TorchServe's, the predictor's, the adapter's
# ports): the tests start every server on free ports of their own, and expect the shipped defaults elsewhere.
MOVED_BY_THE_USER = (*TORCHSERVE_PORT_ENV.values(), *PREDICTOR_PORT_ENV.values(), "ADAPTER_HOST", "ADAPTER_PORT",
                     "METRICS_PORT", "OIP_URL")
for _variable in MOVED_BY_THE_USER:
    os.environ.pop(_variable, None)

# Fixtures that make a test an integration test (a test using any fixture built on them is one too).
INTEGRATION_FIXTURES = {"torchserve", "kserve_ts", "kserve_predictor", "browser", "cifar100_data_dir", "wrk"}
BENCH_TIMEOUT_S = 1200  # make test-bench runs benchmarks end to end, servers and all: longer than pytest.ini's timeout


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("bench") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(BENCH_TIMEOUT_S))
    # The modules that ask for a background computation run last, whole (their module-scoped servers started once),
    # in their order: asked for early, its result held the run up (test_calibration waited 40 s for the test
    # split's logits once the bench tier had left `make test`, whose 140 s of tests had given them their time).
    waiting = {getattr(item, "module", None) for item in items
               if background.COMPUTATIONS.keys() & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: getattr(item, "module", None) in waiting)  # stable: each module's order kept
    lane = config.getoption("lane")
    if lane != "all":  # make test's two lanes (tests/lanes.py)
        kept, others = [], []
        for item in items:
            (kept if lanes.lane_of(item) == lane else others).append(item)
        if others:
            config.hook.pytest_deselected(items=others)
            items[:] = kept


def pytest_addoption(parser):
    parser.addoption("--lane", choices=("all", "main", "side"), default="all",
                     help="only the tests of make test's main or side lane (tests/lanes.py); all: every test")


def pytest_collection_finish(session):
    """Stop before running anything when the selected tests need CIFAR-100 or a part that
    `make install-system` / `make install` provides, and it is not there."""
    needed = set().union(*(getattr(item, "fixturenames", ()) for item in session.items))
    problems = missing_parts(needed)
    if "cifar100_data_dir" in needed and (message := missing_data_message(data_dir())) is not None:
        problems.append(message)
    if problems:
        pytest.exit("\n".join(problems), returncode=pytest.ExitCode.USAGE_ERROR)
    if not session.config.option.collectonly:  # on the core the tests leave idle, until a test asks
        background.start(needed & background.COMPUTATIONS.keys(), str(data_dir()))


def pytest_unconfigure(config):
    background.stop_all()


@pytest.fixture(autouse=True)
def torch_threads_given_back():
    """A test that sets torch's thread count (a benchmark's rounds, an engine at a worker's one thread)
    gives it back: it leaked, and the test-split pass run after it took 103 s on one core, not 58 s."""
    import sys

    torch = sys.modules.get("torch")  # torch only where a test brought it in (the adapter's need none)
    before = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != before:
        # Imported by this test: torch's default, one thread per core (as here, where each core runs one).
        torch.set_num_threads(before or int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory):
    ts = start_test_torchserve(tmp_path_factory.mktemp("torchserve"))
    yield ts
    ts.stop()


@pytest.fixture
def torchserve_ready(torchserve):
    """The session's TorchServe, brought back up first if an earlier test left it stopped."""
    if not torchserve.is_running():
        torchserve.start()
    torchserve.wait_ready(READY_TIMEOUT_S)
    return torchserve


@pytest.fixture(scope="module")
def reference():
    """The shipped network in-process, as the served answers must be (tests/serving_helpers.py)."""
    from serving_helpers import ReferenceModel  # torch: only for the tests that ask

    return ReferenceModel(weights_under_test())


@pytest.fixture(scope="module")
def client():
    """A plain HTTP client with a deadline on every call."""
    import httpx

    with httpx.Client(timeout=httpx.Timeout(HTTP_TIMEOUT_S, connect=10.0)) as c:
        yield c


@pytest.fixture(scope="session")
def wrk():
    """wrk, the benchmarks' load generator (checked before the run: tests/system_parts.py)."""
    assert wrk_problem() is None, wrk_problem()


@pytest.fixture(scope="session")
def axe_script():
    """axe-core's script for the page's accessibility audit (npm ci; checked before the run)."""
    assert AXE.is_file(), AXE
    return AXE


@pytest.fixture(scope="session")
def cifar100_data_dir():
    """The folder holding cifar-100-python/ (tests/cifar100_data.py says where it is looked for)."""
    return data_dir()


@pytest.fixture(scope="session")
def cifar100_test_split(cifar100_data_dir):
    """(uint8 images [10000, 3, 32, 32], labels [10000]) of the CIFAR-100 *test* split (never trained on)."""
    from training.data import load_split

    return load_split(cifar100_data_dir, train=False)


@background.computation("shipped_test_split_logits")
def served_logits_on_the_test_split(data_dir: str):
    from model.shipped import SHIPPED_WEIGHTS
    from training.calibrate import logits_on_test_split

    return logits_on_test_split(SHIPPED_WEIGHTS, data_dir)


@pytest.fixture(scope="session")
def shipped_test_split_logits(cifar100_data_dir):
    """(plain logits, flip-TTA logits, labels) of the shipped weights' served network on the whole test
    split, computed once for every test that needs them (one pass over 20,000 images: ~1 min on 2 cores), in the
    background from the session's start (tests/background.py)."""
    return background.result("shipped_test_split_logits", str(cifar100_data_dir))


@background.computation("nncf_cpu_extension")
def compile_nncf_cpu_extension(data_dir: str) -> bool:
    """~20 s of g++ on a fresh machine, at training.quantize's first use; later loads find it built in torch's
    extension cache, or wait on its lock while it builds."""
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader

    QuantizedFunctionsCPULoader.load()
    return True


@pytest.fixture(scope="session")
def nncf_cpu_extension():
    """NNCF's quantization functions compiled (training.quantize's first use builds them), in the background."""
    return background.result("nncf_cpu_extension", str(data_dir()))
