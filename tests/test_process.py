"""serving/process.py, the one way services are started and stopped, on real processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from serving.process import (PidFile, ServiceStartError, command_line_has, free_ports, popen_exited, stop_popen,
                             stop_process, wait_until_ready)

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_pid_file_counts_only_a_live_process_that_is_ours(tmp_path):
    pid_file = PidFile(tmp_path / "x.pid", command_line_has("sleep-marker-42"))
    assert pid_file.pid() is None  # no file
    ours = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", "sleep-marker-42"])
    try:
        pid_file.write(ours.pid)
        assert pid_file.pid() == ours.pid
        pid_file.write(os.getpid())  # alive, but another program (a reused pid)
        assert pid_file.pid() is None
        pid_file.write(ours.pid)
    finally:
        stop_popen(ours, timeout=5)
    assert pid_file.pid() is None  # gone
    pid_file.remove()
    assert not pid_file.path.exists()


def test_stop_sends_term_then_kill_after_the_timeout(tmp_path):
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=out)
    wait_until_ready(lambda: "up" in log.read_text(), 30, "the child", exited=popen_exited(stubborn), interval=0.05)
    started = time.monotonic()
    assert stop_process(stubborn.pid, timeout=1.0)
    assert time.monotonic() - started >= 1.0 and not psutil.pid_exists(stubborn.pid)  # killed, and reaped
    assert not stop_process(stubborn.pid)  # already gone: nothing to stop


def test_stop_popen_keeps_the_childs_exit_status(tmp_path):
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=out)
    wait_until_ready(lambda: "up" in log.read_text(), 30, "the child", exited=popen_exited(stubborn), interval=0.05)
    stop_popen(stubborn, timeout=0.5)
    assert stubborn.returncode == -9  # SIGTERM ignored, so SIGKILL
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_popen(polite)
    assert polite.returncode == -15


def test_wait_until_ready_reports_the_exit_and_the_log_tail(tmp_path):
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        crashing = subprocess.Popen([sys.executable, "-c", "import sys; print('bad setting X'); sys.exit(2)"],
                                    stdout=out)
    with pytest.raises(ServiceStartError, match=r"(?s)exited while starting \(code 2\).*bad setting X"):
        wait_until_ready(lambda: False, 30, "The service", logs=[log], exited=popen_exited(crashing))


def test_wait_until_ready_gives_up_at_its_deadline(tmp_path):
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="did not become ready within 0.3 s"):
        wait_until_ready(lambda: False, 0.3, "The service", logs=[tmp_path / "absent.log"])
    assert time.monotonic() - started < 5
