"""`make test`'s two lanes: one pytest command line run twice at once, `--lane main` and, at nice 19, `--lane side`.

The side lane holds the modules in SIDE_MODULES: they train or score networks, build engines or archives on the CPU,
start no server and judge nothing by the clock; their tests marked `wall_clock` (a time budget's fit, a plan made
from a speed measured) stay in the main lane, as nice 19 leaves them the CPU only when the rest do not want it. The rest of the
suite waits on servers, browsers and deadlines about half its time (on a 2-core AMD EPYC Zen 1, session 62: 31
CPU minutes in 30.8 of wall time), and the side lane takes that idle CPU, as tests/background.py's computations do.

    python tests/lanes.py PYTEST_ARGS...   (what `make test` runs, with -m "not bench")

The main lane's output comes as it runs, the side lane's after it; the run fails if either lane does. A lane that
selects no test (`make test PYTEST_ARGS="-k page"`) is no failure unless both select none (pytest's 5).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

# Modules that compute in-process and start no server (benchmarks/RESULTS.md, sessions 62-63: the main lane is the
# run's length; the side lane ended half-way).
SIDE_MODULES = frozenset({"test_training.py", "test_decoding.py", "test_device_data.py", "test_training_cli.py",
                          "test_engine.py", "test_serving_handler.py", "test_explain_handler.py", "test_calibration.py",
                          "test_evaluate.py", "test_shipped_model.py", "test_model.py", "test_answers.py",
                          "test_background.py"})
NO_TESTS_COLLECTED = 5  # pytest's exit code when nothing was selected


def lane_of(item) -> str:
    """'side' for a test of SIDE_MODULES not marked wall_clock, else 'main'."""
    module = getattr(item, "path", None)
    if module is not None and module.name in SIDE_MODULES and item.get_closest_marker("wall_clock") is None:
        return "side"
    return "main"


def combined(main: int, side: int) -> int:
    """The run's exit code: the first lane's failure, else 0; pytest's 5 only when neither lane selected a test."""
    codes = [code for code in (main, side) if code != NO_TESTS_COLLECTED]
    if not codes:
        return NO_TESTS_COLLECTED
    return next((code for code in codes if code != 0), 0)


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    with tempfile.TemporaryFile("w+b") as side_output:
        side = subprocess.Popen([*pytest, "--lane", "side", *args], stdout=side_output, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.nice(19))
        main_lane = subprocess.Popen([*pytest, "--lane", "main", *args])
        lanes = (main_lane, side)

        def stop(signum, frame):  # CI's or a user's SIGTERM reaches this process alone: pass it on
            for lane in lanes:
                if lane.poll() is None:
                    lane.send_signal(signum)

        signal.signal(signal.SIGTERM, stop)
        codes = []
        for lane in lanes:
            while True:
                try:
                    codes.append(lane.wait())
                    break
                except KeyboardInterrupt:  # Ctrl-C reached both lanes too (one process group): let them end
                    continue
        side_output.seek(0)
        print(f"\n========== make test's side lane (nice 19: {', '.join(sorted(SIDE_MODULES))}) ==========",
              flush=True)
        sys.stdout.buffer.write(side_output.read())
        sys.stdout.flush()
    return combined(*codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
