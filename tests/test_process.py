"""serving/process.py, the one way services are started and stopped, on real processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving import process as ports_module
from serving.process import (PidFile, ServiceStartError, command_line_with, free_port, free_ports, log_ends, log_tails,
                             popen_exited, port_in_use, stop_popen, stop_process, wait_until_ready)

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_is_handed_out_once():
    # Servers started side by side each pick ports before any binds them: without the process's memory of the ports
    # it gave, one comes twice ~35 times in 1,000 picks (among ~14,000 ephemeral ports; ~22,000 below them).
    ports = [free_port() for _ in range(1000)] + free_ports(100)
    assert len(set(ports)) == len(ports)


def test_ports_are_picked_below_the_ephemeral_range_where_no_connection_takes_them(tmp_path, monkeypatch):
    first_ephemeral = int(ports_module.EPHEMERAL_RANGE_FILE.read_text().split()[0])
    ports = free_ports(200)
    if first_ephemeral - ports_module.LOWEST_PICKED_PORT >= 1000:  # Linux's default range starts at 32768
        assert all(ports_module.LOWEST_PICKED_PORT <= port < first_ephemeral for port in ports), ports
    # Where the range leaves no room below it (or cannot be read), the OS picks: still free and distinct.
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("10500\t60999\n")
    monkeypatch.setattr(ports_module, "EPHEMERAL_RANGE_FILE", narrow)
    assert ports_module.unclaimed_ports() is None
    ports = free_ports(20)
    assert len(set(ports)) == 20 and not any(port_in_use(port) for port in ports)
    monkeypatch.setattr(ports_module, "EPHEMERAL_RANGE_FILE", tmp_path / "absent")
    assert ports_module.unclaimed_ports() is None and len(set(free_ports(5))) == 5


def test_pid_file_counts_only_a_live_process_that_is_ours(tmp_path):
    pid_file = PidFile(tmp_path / "x.pid", command_line_with(["sleep-marker-42"]))
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


def sleeper(*args: str, named: str | None = None, tmp_path=None, child: bool = False) -> subprocess.Popen:
    """A process that sleeps with ``args`` on its command line; ``named``: run through a link of that name (its
    process name, as a JVM's is "java"); ``child``: it has a child of its own (a JVM's helper, a worker)."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "time.sleep(60)") if child else "import time; time.sleep(60)"
    program = sys.executable
    if named is not None:
        program = str(tmp_path / named)
        os.symlink(sys.executable, program)
    process = subprocess.Popen([program, "-c", code, *args])
    # Linux wakes the parent as the child's exec swaps its memory, before the new program's arguments are set up:
    # its command line can read empty for a moment (a loaded CI host saw a sleeper not yet "ours").
    wait_until_ready(lambda: psutil.Process(process.pid).cmdline()[3:] == list(args), 30, "the command line",
                     interval=0.01)
    if child:
        wait_until_ready(lambda: psutil.Process(process.pid).children(), 30, "the child", interval=0.05)
    return process


def test_a_stale_torchserve_pid_file_naming_another_java_program_leaves_it_alone(tmp_path):
    """TorchServe's pid file outlives a crash or a kill -9, and its pid goes to another program. Any process
    named "java" counted as the server: `status` said running, `stop` killed that program and its children,
    `start` started nothing and waited out its timeout. Only TorchServe's main class run with this instance's
    config counts now: not a stranger, nor another instance's server."""
    from serving.torchserve import TorchServeInstance

    main_class = "org.pytorch.serve.ModelServer"

    ts = TorchServeInstance(tmp_path / "ts")
    ts.tmp_dir.mkdir(parents=True)
    stranger = sleeper("-jar", "stranger.jar", named="java", tmp_path=tmp_path, child=True)
    other_instance = sleeper(main_class, "-f", str(tmp_path / "other" / "logs" / "config.properties"))
    started = [stranger, other_instance]
    try:
        helper = psutil.Process(stranger.pid).children()[0]
        for process in (stranger, other_instance):
            ts.pid_file.write_text(f"{process.pid}")
            assert ts.java_pid() is None and not ts.is_running()
            assert f"pid {process.pid}" in ts.pid_record.stranger()
            assert ts.stop() is False
            assert process.poll() is None
        assert helper.is_running()
        # This instance's server (stop also finds it by its command line when no pid file names it yet).
        ours = sleeper("-Dmodel_server_home=x", "-cp", "y", main_class, "--python", "z", "-f", str(ts.config_path))
        started.append(ours)
        ts.pid_file.write_text(f"{ours.pid}")
        assert ts.java_pid() == ours.pid and ts.pid_record.stranger() is None
        assert ts.stop(timeout=5) is True and ours.wait(5) is not None  # (reaped by stop: no status to see)
        # Stopped before `torchserve --start` wrote the pid file: found by its command line.
        launching = sleeper(main_class, "-f", str(ts.config_path))
        started.append(launching)
        assert not ts.pid_file.exists()
        assert ts.stop(timeout=5) is True and launching.wait(5) is not None
        assert stranger.poll() is None and other_instance.poll() is None
    finally:
        for process in started:
            stop_popen(process, timeout=5)
        helper.kill()


def test_a_stale_adapter_pid_file_naming_another_adapter_or_program_leaves_it_alone(tmp_path):
    """adapter.run's pid file counted any command line holding "adapter.run serve": another checkout's adapter
    or any program mentioning it was reported running and then killed. Ours is `-m adapter.run serve` with
    this checkout's --log-file (ADAPTER_LOG_DIR)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    other_checkout = sleeper("-m", "adapter.run", "serve", "--log-file", str(tmp_path / "elsewhere" / "adapter.log"))
    mentions = sleeper("adapter.run serve", "--log-file", str(logs / "adapter.log"))
    ours = sleeper("-m", "adapter.run", "serve", "--host", "127.0.0.1", "--log-file", str(logs / "adapter.log"))
    env = {**os.environ, "ADAPTER_LOG_DIR": str(logs), "ADAPTER_PORT": str(free_ports(1)[0])}

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "adapter.run", command], env=env, capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    try:
        for process in (other_checkout, mentions):
            (logs / "adapter.pid").write_text(f"{process.pid}\n")
            status = run("status")
            assert status.returncode == 3 and "Adapter not running." in status.stdout, status
            stop = run("stop")
            assert "Adapter not running." in stop.stdout, stop
            assert f"names pid {process.pid}" in stop.stderr and "left alone" in stop.stderr, stop
            assert process.poll() is None
        (logs / "adapter.pid").write_text(f"{ours.pid}\n")
        stop = run("stop")
        assert f"Adapter stopped (pid {ours.pid})." in stop.stdout, stop
        assert ours.wait(15) == -15
    finally:
        for process in (other_checkout, mentions, ours):
            stop_popen(process, timeout=5)


def test_stop_sends_term_then_kill_after_the_timeout(tmp_path):
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=out)
    wait_until_ready(lambda: "up" in log.read_text(), 30, "the child", exited=popen_exited(stubborn), interval=0.05)
    started = time.monotonic()
    assert stop_process(stubborn.pid, timeout=1.0)
    assert time.monotonic() - started >= 1.0 and not psutil.pid_exists(stubborn.pid)  # killed, and reaped
    assert not stop_process(stubborn.pid)  # already gone: nothing to stop


def test_stop_returns_once_the_process_ended_though_its_parent_has_not_reaped_it():
    """A process of another parent (an adapter started by a supervisor that waits for it later) is a zombie once
    it ended: stop counted it alive and waited its whole timeout, then the kill's 5 s."""
    parent = sleeper(child=True)
    try:
        child = psutil.Process(parent.pid).children()[0]
        started = time.monotonic()
        assert stop_process(child.pid, timeout=30)
        assert time.monotonic() - started < 10 and child.status() == psutil.STATUS_ZOMBIE
    finally:
        stop_popen(parent, timeout=5)


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


def test_wait_until_ready_shows_only_what_the_logs_got_since_the_start(tmp_path):
    """An appended log's earlier runs are not this start's: from `since` on only (all of it once rotated)."""
    log = tmp_path / "service.log"
    log.write_text("earlier run\n" * 20)
    since = log_ends([log, tmp_path / "absent.log"])
    with open(log, "a") as out:
        crashing = subprocess.Popen([sys.executable, "-c", "import sys; print('bad setting X'); sys.exit(2)"],
                                    stdout=out)
    with pytest.raises(ServiceStartError) as err:
        wait_until_ready(lambda: False, 30, "The service", logs=[log], exited=popen_exited(crashing), since=since)
    assert "bad setting X" in str(err.value) and "earlier run" not in str(err.value), str(err.value)
    log.write_text("rotated\n")
    assert log_tails([log], since=since) == f"{log}:\nrotated"


def test_wait_until_ready_gives_up_at_its_deadline(tmp_path):
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="did not become ready within 0.3 s"):
        wait_until_ready(lambda: False, 0.3, "The service", logs=[tmp_path / "absent.log"])
    assert time.monotonic() - started < 5
