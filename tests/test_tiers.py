"""The test tiers and the missing-data path: `make test-unit` selects only tests that need no server,
browser or data set, `make test` leaves the bench tier to `make test-bench`, and a run that needs CIFAR-100 without
it stops at once saying how to get it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_in_subprocess(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFAR100_DATA": str(tmp_path / "no-data")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unit_tier_selects_no_server_browser_or_data_test(tmp_path):
    done = pytest_in_subprocess(tmp_path, "-m", "not integration", "--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    selected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    assert "tests/test_model.py" in selected and "tests/test_java.py" in selected
    # Modules whose every test needs TorchServe, the browser or the data.
    for module in ("test_serving.py", "test_page.py", "test_training.py", "test_ddp.py", "test_benchmarks.py",
                   "test_shipped_model_served.py"):
        assert f"tests/{module}" not in selected, done.stdout
    # Mixed modules keep their pure tests only.
    ids = done.stdout
    assert "test_bad_weights_file_gets_one_clear_error" in ids and "test_known_answer_figures" not in ids
    assert "test_metrics_file_describes_the_shipped_weights" in ids and "test_shipped_top1" not in ids


def test_missing_data_stops_the_run_at_once_with_how_to_get_it(tmp_path):
    done = pytest_in_subprocess(tmp_path, "tests/test_evaluate.py")
    assert done.returncode == 4, done.stdout[-3000:]
    out = done.stdout + done.stderr
    assert f"CIFAR-100 not found under {tmp_path / 'no-data'}" in out and "`make data`" in out
    assert "CIFAR100_DATA" in out and "make test-unit" in out
    assert " passed" not in out and " failed" not in out


def test_missing_chromium_stops_the_run_at_once_with_the_install_hint(tmp_path):
    env = {**os.environ, "CHROMIUM": str(tmp_path / "no-chromium")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_page.py"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 4, out[-3000:]
    assert f"Chromium at {tmp_path / 'no-chromium'}" in out and "sudo make install-system" in out
    assert " passed" not in out and " skipped" not in out


def test_a_hung_test_fails_at_the_ini_timeout_and_the_run_goes_on(tmp_path):
    ini = (ROOT / "pytest.ini").read_text()
    assert "\ntimeout = 600\n" in ini  # the setting this test shortens
    (tmp_path / "pytest.ini").write_text(ini.replace("\ntimeout = 600\n", "\ntimeout = 2\n"))
    (tmp_path / "test_hangs.py").write_text("import time\n\n"
                                            "def test_hangs():\n    time.sleep(120)\n\n"
                                            "def test_after_it():\n    pass\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
                           "--rootdir", str(tmp_path), str(tmp_path / "test_hangs.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=100)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "1 failed, 1 passed" in out, out[-3000:]
    assert "Timeout (>2.0s)" in out and "time.sleep(120)" in out  # said so, with where it hung
    assert time.monotonic() - started < 60


def test_training_without_data_names_make_data(tmp_path, capsys):
    from training import train as train_module

    assert train_module.main(["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 not found" in err and "`make data`" in err and "CIFAR100_DATA" in err


def test_a_shell_that_moved_the_services_ports_runs_the_tests_unchanged(tmp_path):
    """README has a user export TS_INFERENCE_PORT (and the others) to move `make serve`; the tests that
    compare config.properties with the shipped ports then failed in that shell (18380 != 8080)."""
    from conftest import MOVED_BY_THE_USER

    moved = {variable: str(18300 + number) for number, variable in enumerate(MOVED_BY_THE_USER)}
    moved["OIP_URL"], moved["ADAPTER_HOST"] = "http://127.0.0.1:18399", "0.0.0.0"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "tests/test_settings.py::test_config_properties_ports_are_the_settings_ports"],
                          cwd=ROOT, env={**os.environ, **moved}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.integration  # the collected modules ask for CIFAR-100 and wrk (their pytestmark)
def test_make_test_leaves_the_benchmarks_own_runs_to_make_test_bench():
    """CI's `make test` must end within its 30 minutes: the benchmarks run end to end with servers of their own
    (pytest.ini's `bench` marker) are `make test-bench`'s, while bench_serve's run on the session's TorchServe and the
    load generator's tests stay in `make test`."""
    def selected(target: str) -> set[str]:
        done = subprocess.run(["make", "-s", "--no-print-directory", target, "PYTEST_ARGS=--collect-only -q -p "
                               "no:cacheprovider tests/test_benchmarks.py tests/test_kserve.py"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return {line.split("::")[1] for line in done.stdout.splitlines() if line.startswith("tests/")}

    bench, rest = selected("test-bench"), selected("test")
    assert not bench & rest and all(name.startswith("test_bench_") for name in bench), bench
    assert {"test_bench_fairness_prints_the_probe_beside_each_kind_of_load",
            "test_bench_kserve_prints_each_target_and_the_ratios"} <= bench, bench
    assert {"test_bench_serve_prints_both_columns_and_the_two_ratios", "test_wrk_measures_answered_requests"} <= rest


@pytest.mark.integration  # test_training.py asks for CIFAR-100
def test_make_test_runs_the_training_modules_in_a_side_lane_but_their_clock_tests():
    """`make test` runs tests/lanes.py: the side lane (nice 19) takes the modules in SIDE_MODULES (test_training.py
    among them), less their tests marked wall_clock, and the main lane the rest; each test in exactly one."""
    done = subprocess.run(["make", "-s", "--no-print-directory", "test", "PYTEST_ARGS=--collect-only -q -p "
                           "no:cacheprovider tests/test_training.py tests/test_process.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    main_out, header, side_out = done.stdout.partition("make test's side lane")
    assert header, done.stdout[-3000:]
    main, side = ({line for line in out.splitlines() if line.startswith("tests/")} for out in (main_out, side_out))
    assert main and side and not main & side
    assert all(test.startswith("tests/test_training.py::") for test in side), side
    clock_tests = {f"tests/test_training.py::{name}" for name in (
        "test_time_budget_run_fits_its_budget_across_a_resume_and_ends_annealed",
        "test_a_larger_time_budget_given_on_resume_continues_a_finished_run")}
    assert clock_tests <= main and "tests/test_process.py::test_a_port_is_handed_out_once" in main, main


def test_either_lane_failing_fails_make_test_and_a_lane_with_nothing_selected_does_not():
    from lanes import NO_TESTS_COLLECTED, combined

    assert combined(0, NO_TESTS_COLLECTED) == combined(NO_TESTS_COLLECTED, 0) == 0
    assert combined(NO_TESTS_COLLECTED, NO_TESTS_COLLECTED) == NO_TESTS_COLLECTED
    assert combined(0, 1) == combined(1, 0) == combined(1, NO_TESTS_COLLECTED) == 1
    done = subprocess.run([sys.executable, "tests/lanes.py", "--collect-only", "-q", "tests/test_no_such_module.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]  # pytest's usage error, from both lanes
    assert done.stdout.count("file or directory not found") >= 1, done.stdout[-3000:]
