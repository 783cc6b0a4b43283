"""tests/background.py: a computation that fails in the background fails the test that asks for it, with its
output, and leaves nothing behind; one still running at the session's end is ended."""
from __future__ import annotations

import signal

import psutil
import pytest

import background


@background.computation("a_failing_computation")
def fails_for_want_of_data(data_dir: str):
    raise FileNotFoundError(f"no CIFAR-100 in {data_dir}")


def test_a_failed_background_computation_fails_the_asker_with_its_output():
    """The child found this module's function by the name it was registered under, ran it, and its error is told."""
    computation = background.Background("a_failing_computation", "/nonexistent")
    try:
        with pytest.raises(AssertionError, match=r"(?s)a_failing_computation in the background failed \(1\).*"
                                                 r"FileNotFoundError: no CIFAR-100 in /nonexistent"):
            computation.result()
    finally:
        computation.stop()
    assert not computation.folder.exists()


def test_a_computation_left_running_is_ended_at_the_lowest_priority_it_ran_at():
    computation = background.Background("shipped_test_split_logits", "/nonexistent")
    child = psutil.Process(computation.process.pid)
    try:
        for _ in range(100):  # its first line lowers its priority
            if child.nice() == 19:
                break
            psutil.wait_procs([child], timeout=0.05)
        assert child.nice() == 19
    finally:
        computation.stop()
    # Killed (it would have failed on its own, ~2 s later: no data there).
    assert computation.process.returncode == -signal.SIGKILL and not computation.folder.exists()
