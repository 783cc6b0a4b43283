"""Background services, one way: free ports, pid files, readiness with a deadline, TERM then KILL.

Used by adapter/run.py, serving/torchserve.py (and serving/kserve.py through it), the benchmarks and
the tests. No torch here (the adapter imports it). ``status`` commands exit with the LSB codes:
RUNNING (0) or NOT_RUNNING (3); a failed start or a bad setting is another non-zero code.
"""
from __future__ import annotations

import collections
import random
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import psutil

RUNNING = 0      # LSB init-script `status`: the service runs
NOT_RUNNING = 3  # LSB init-script `status`: the service is not running


class ServiceStartError(RuntimeError):
    """A service exited while starting or did not become ready in time; the message carries its log's tail."""


# Ports this process handed out lately: a port is bound only when its server starts, so the OS could give it again to
# another caller meanwhile (servers started side by side); never again while remembered.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)
_HANDING_OUT = threading.Lock()
_PICKS = random.Random()  # its own: a test's random.seed() must not make two processes pick alike
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED_PORT = 10_000  # under it: the well-known defaults (8080, 8000...) and what operators choose by hand


def unclaimed_ports() -> range | None:
    """The ports from LOWEST_PICKED_PORT up to the kernel's ephemeral range: no outgoing connection's local port and no
    bind to port 0 is ever one of them, so a port picked there stays free until its server binds it (Java's seconds
    later; a CI run lost a module's server so, session 62). None where the range starts too low to leave 1,000."""
    try:
        first_ephemeral = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(LOWEST_PICKED_PORT, first_ephemeral) if first_ephemeral - LOWEST_PICKED_PORT >= 1000 else None


def _bound_to_a_free_port(host: str, candidates: range | None) -> socket.socket:
    """A socket bound to a port free now: one of candidates at random, else (none found, or None) one the OS picks."""
    for _ in range(64 if candidates is not None else 0):
        s = socket.socket()
        try:
            s.bind((host, _PICKS.choice(candidates)))
            return s
        except OSError:  # in use
            s.close()
    s = socket.socket()
    s.bind((host, 0))
    return s


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports on `host` that are free right now (all held until all are picked), below the ephemeral range
    where it leaves room (unclaimed_ports), none of them one this process was given in its last 4,096 picks."""
    sockets, ports = [], []
    candidates = unclaimed_ports()
    with _HANDING_OUT:
        try:
            while len(ports) < n:
                sockets.append(_bound_to_a_free_port(host, candidates))
                port = sockets[-1].getsockname()[1]
                if port not in _HANDED_OUT:  # (a port handed out before is held too, so the next pick differs)
                    ports.append(port)
                    _HANDED_OUT.append(port)
            return ports
        finally:
            for s in sockets:
                s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something listens on host:port (a bind with SO_REUSEADDR fails only for a listener, not for
    connections of a stopped server still in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 40, since: int = 0) -> str:
    """The last lines of a log file from byte `since` on (all of it when it is shorter: rotated since), or a note
    that there is none."""
    try:
        with open(path, "rb") as log:
            log.seek(since if since <= log.seek(0, 2) else 0)
            return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def log_ends(paths: Iterable[Path]) -> dict[Path, int]:
    """Each existing log's size now: what a start about to begin must not show as its own (log_tails' `since`)."""
    return {Path(path): Path(path).stat().st_size for path in paths if Path(path).is_file()}


def log_tails(paths: Iterable[Path], lines: int = 15, since: dict[Path, int] | None = None) -> str:
    """`path:` + its last lines for each non-empty log, for an error message; a log in `since` from that byte on
    (an appended log's earlier runs above a start's own reason buried it)."""
    since = since or {}
    parts = [f"{path}:\n{text}" for path in paths
             if Path(path).is_file() and (text := log_tail(path, lines, since.get(Path(path), 0)))]
    return "\n".join(parts) or "(the logs are empty)"


class PidFile:
    """A pid file whose pid counts only while that process is alive and is still ours: `is_ours(process)`
    checks it (a pid is reused by other programs once its process is gone)."""

    def __init__(self, path: Path, is_ours: Callable[[psutil.Process], bool]):
        self.path = Path(path)
        self.is_ours = is_ours

    def live_process(self) -> psutil.Process | None:
        """The live process the file names, whoever's it is."""
        try:
            process = psutil.Process(int(self.path.read_text().split()[0]))
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return process
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return None

    def pid(self) -> int | None:
        """The live, matching process's pid, else None."""
        process = self.live_process()
        try:
            return process.pid if process is not None and self.is_ours(process) else None
        except psutil.Error:
            return None

    def stranger(self) -> str | None:
        """When the file names a live process that is not ours (the pid reused after ours died without removing
        the file: a crash, kill -9): that process, described for a message; else None. It is left alone."""
        process = self.live_process()
        try:
            if process is None or self.is_ours(process):
                return None
            return f"pid {process.pid} ({' '.join(process.cmdline())[:120] or process.name()})"
        except psutil.Error:
            return None

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def changed_since_started(path: Path, pid: int | None) -> bool:
    """Whether ``path`` was written after process ``pid`` started (the process loaded an older one)."""
    try:
        return pid is not None and path.stat().st_mtime > psutil.Process(pid).create_time()
    except (OSError, psutil.Error):
        return False


def command_line_with(*runs: Sequence[str]) -> Callable[[psutil.Process], bool]:
    """An `is_ours` test: each run of arguments (e.g. ``("--log-file", "/abs/logs/adapter.log")``) appears whole
    and in order in the process's command line. A run naming a path of the instance's own tells it from
    another checkout's copy of the service, or from any program whose command line merely mentions it."""
    def is_ours(process: psutil.Process) -> bool:
        args = process.cmdline()
        return all(any(args[i:i + len(run)] == list(run) for i in range(len(args) - len(run) + 1)) for run in runs)
    return is_ours


def wait_until_ready(is_ready: Callable[[], bool], timeout: float, what: str, logs: Iterable[Path] = (),
                     exited: Callable[[], str | None] | None = None, interval: float = 0.2,
                     since: dict[Path, int] | None = None) -> None:
    """Poll `is_ready()` until it is true; raise ServiceStartError with the logs' tails (from `since`, log_ends
    taken before the start) when `exited()` says why the process is gone (a message; None while it runs) or
    when `timeout` seconds pass."""
    logs = list(logs)
    deadline = time.monotonic() + timeout
    while True:
        if exited is not None and (why := exited()) is not None:
            raise ServiceStartError(f"{what} exited while starting ({why}); {log_tails(logs, since=since)}")
        if is_ready():
            return
        if time.monotonic() >= deadline:
            raise ServiceStartError(f"{what} did not become ready within {timeout:g} s; {log_tails(logs, since=since)}")
        time.sleep(interval)


def popen_exited(process: subprocess.Popen) -> Callable[[], str | None]:
    """An `exited` test for wait_until_ready: the child's exit code once it has ended."""
    return lambda: None if process.poll() is None else f"code {process.returncode}"


def stop_process(pid: int, timeout: float = 10.0, children: bool = False) -> bool:
    """SIGTERM (the process finishes what it holds), then SIGKILL whatever is still alive after
    `timeout` s; with `children`, its descendants are waited for (and killed) too. True if it ran."""
    try:
        process = psutil.Process(pid)
        processes = [process] + (process.children(recursive=True) if children else [])
        process.terminate()
    except psutil.NoSuchProcess:
        return False
    alive = _wait_ended(processes, timeout)
    for straggler in alive:  # wedged (e.g. a worker stuck in a forward pass)
        try:
            straggler.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_ended(alive, 5)
    return True


def _wait_ended(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """psutil.wait_procs (which reaps this process's own children), a zombie counted as ended: one whose parent has
    not reaped it yet (a process another one started, stopped by its pid) was waited for to the timeout, then
    killed, 15 s for nothing. Those still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while True:
        _, alive = psutil.wait_procs(alive, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
        alive = [p for p in alive if not _zombie(p)]
        if not alive or time.monotonic() >= deadline:
            return alive


def _zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_popen(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """stop_process for a child this process started, through Popen (which reaps it and keeps its
    returncode): SIGTERM, then SIGKILL after `timeout` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def ensure_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files to ``needed`` (its connection caps and a margin), or
    ValueError saying so when the hard limit is below it (ulimit -n)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"needs {needed} open files; the limit is {hard} (ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
