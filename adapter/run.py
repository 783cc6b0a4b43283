"""Start or stop the adapter in the background: `python -m adapter.run start|stop|status`.

`start` launches uvicorn (ADAPTER_HOST:ADAPTER_PORT, default 127.0.0.1:8000) detached, with its pid in
logs/adapter.pid and its output in logs/adapter.log, waits until it answers, and prints the page's
URL. Both commands are idempotent: starting a running adapter or stopping a stopped one is fine.
ADAPTER_LOG_DIR moves the pid and log files (default logs/ in the repository).
The adapter's own settings (TorchServe URLs, key file, limits) come from the environment: see
adapter/config.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = Path(os.environ.get("ADAPTER_LOG_DIR", REPO / "logs"))
PID_FILE = LOG_DIR / "adapter.pid"
LOG_FILE = LOG_DIR / "adapter.log"
START_TIMEOUT_S = 60.0  # generous: a busy 2-core machine imports FastAPI slowly
STOP_TIMEOUT_S = 10.0


class AdapterStartError(RuntimeError):
    """The adapter process exited or did not answer; the message carries its log's tail."""


def _address() -> tuple[str, int]:
    return os.environ.get("ADAPTER_HOST", "127.0.0.1"), int(os.environ.get("ADAPTER_PORT", "8000"))


def _running_pid() -> int | None:
    """The pid in the pid file if that process is alive and is our uvicorn, else None."""
    try:
        pid = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return None
    # The pid may have been reused by another program since the file was written.
    return pid if b"adapter.app:create_app" in cmdline else None


def _answers(url: str, statuses: tuple[int, ...] = (200,)) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code in statuses
    except httpx.HTTPError:
        return False


def _model_state(base: str) -> str:
    try:
        response = httpx.get(f"{base}/health", timeout=5.0)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return "model status unknown"
    return "model ready" if response.status_code == 200 else f"model not ready: {body.get('error')}"


def spawn(host: str, port: int, log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """uvicorn serving the adapter on host:port, detached from the caller's terminal and session."""
    command = [sys.executable, "-m", "uvicorn", "adapter.app:create_app", "--factory",
               "--host", host, "--port", str(port)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=REPO, start_new_session=True)  # survives the shell (make) that started it


def wait_until_up(base: str, process: subprocess.Popen, log_file: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Return once the adapter at `base` answers; raise AdapterStartError if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise AdapterStartError(f"The adapter exited at start (code {process.returncode}); {log_file}:\n{tail}")
        # /health answers 503 while TorchServe is down: the adapter is up all the same.
        if _answers(f"{base}/health", statuses=(200, 503)):
            return
        time.sleep(0.2)
    raise AdapterStartError(f"The adapter did not answer within {timeout:g} s; see {log_file}.")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class AdapterProcess:
    base_url: str
    process: subprocess.Popen
    log_file: Path


@contextmanager
def running_adapter(settings_env: dict[str, str], log_file: Path, host: str = "127.0.0.1",
                    port: int | None = None, start_timeout: float = START_TIMEOUT_S) -> Iterator[AdapterProcess]:
    """An adapter process on a free port with these settings (tests, benchmarks); stopped on exit."""
    port = port or free_port(host)
    process = spawn(host, port, Path(log_file), env={**os.environ, **settings_env})
    try:
        wait_until_up(f"http://{host}:{port}", process, Path(log_file), start_timeout)
        yield AdapterProcess(f"http://{host}:{port}", process, Path(log_file))
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start() -> int:
    host, port = _address()
    base = f"http://{host}:{port}"
    if _running_pid():
        print(f"Adapter already running (pid {_running_pid()}): page at {base}/ ({_model_state(base)})")
        return 0
    if _answers(f"{base}/", statuses=tuple(range(100, 600))):
        print(f"Something else already answers at {base}/; set ADAPTER_PORT to another port.", file=sys.stderr)
        return 1
    process = spawn(host, port, LOG_FILE)
    PID_FILE.write_text(f"{process.pid}\n")
    try:
        wait_until_up(base, process, LOG_FILE)
    except AdapterStartError as err:
        if process.poll() is None:
            process.terminate()
        PID_FILE.unlink(missing_ok=True)
        print(err, file=sys.stderr)
        return 1
    print(f"Adapter running (pid {process.pid}, log {LOG_FILE}): page at {base}/ ({_model_state(base)})")
    return 0


def stop() -> int:
    pid = _running_pid()
    if pid is None:
        PID_FILE.unlink(missing_ok=True)
        print("Adapter not running.")
        return 0
    os.kill(pid, signal.SIGTERM)  # uvicorn finishes the requests in flight, then exits
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    PID_FILE.unlink(missing_ok=True)
    print(f"Adapter stopped (pid {pid}).")
    return 0


def status() -> int:
    host, port = _address()
    pid = _running_pid()
    if pid is None:
        print("Adapter not running.")
        return 1
    print(f"Adapter running (pid {pid}): page at http://{host}:{port}/ ({_model_state(f'http://{host}:{port}')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapter.run", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    return {"start": start, "stop": stop, "status": status}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
