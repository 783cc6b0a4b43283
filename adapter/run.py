"""Start or stop the adapter in the background: `python -m adapter.run start|stop|status|serve`.

`start` launches `serve` (ADAPTER_HOST:ADAPTER_PORT, default 127.0.0.1:8000 from serving/settings.py)
detached, with its pid in logs/adapter.pid and its log in logs/adapter.log (rotated at ADAPTER_LOG_MAX_BYTES, keeping
ADAPTER_LOG_BACKUPS old files; what the process prints outside logging, such as a crash at start-up,
goes to logs/adapter.stderr.log), waits until it answers, and prints the page's URL. Both commands
are idempotent: starting a running adapter or stopping a stopped one is fine; a running adapter that
was started in front of another model server (logs/adapter.model-server: `make serve` after
`make serve-kserve`, or the other way round) is restarted in front of this one, saying so. `status` exits 0
when it runs, 3 when it does not (as TorchServe's, serving/process.py). `serve` runs uvicorn
in the foreground with the adapter's HTTP limits (adapter/protocol.py: head deadline, header
limits, keep-alive timeout, JSON for parser refusals).
ADAPTER_LOG_DIR moves the pid and log files (default logs/ in the repository).
The adapter's own settings (TorchServe URLs, key file, limits) come from the environment: see
adapter/config.py.
"""
from __future__ import annotations

import ctypes
import logging.config
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from serving import settings as shared
from serving.process import (NOT_RUNNING, RUNNING, PidFile, ServiceStartError, command_line_with, free_port,
                             log_ends, popen_exited, port_in_use, stop_popen, stop_process, wait_until_ready)
from serving.rotating_log import stderr_file
from serving import cli

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = Path(os.environ.get("ADAPTER_LOG_DIR", REPO / "logs"))
LOG_FILE = (LOG_DIR / "adapter.log").absolute()
# Ours: `serve` with this checkout's log file (spawn's command line). "adapter.run serve" alone matched another
# checkout's adapter, or any program that mentions it, given the pid of ours after a crash: stop killed it.
PID_FILE = PidFile(LOG_DIR / "adapter.pid", command_line_with(["-m", "adapter.run", "serve"], ["--log-file", str(LOG_FILE)]))
# Beside the pid file: the model server the running adapter was started in front of (model_server()).
MODEL_SERVER_FILE = LOG_DIR / "adapter.model-server"
START_TIMEOUT_S = 60.0  # generous: a busy 2-core machine imports FastAPI slowly
STOP_TIMEOUT_S = 10.0  # SIGTERM: uvicorn finishes the requests in flight, then exits; SIGKILL after this


def _address() -> tuple[str, int]:
    """(ADAPTER_HOST, ADAPTER_PORT); ValueError naming the variable for a port that is no port number."""
    port = shared.ports_from_env(os.environ, {"adapter": shared.ADAPTER_PORT}, {"adapter": "ADAPTER_PORT"})["adapter"]
    return os.environ.get("ADAPTER_HOST", shared.ADAPTER_HOST), port


def _answers(url: str, statuses: tuple[int, ...] = (200,)) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code in statuses
    except httpx.HTTPError:
        return False


def model_server() -> str | None:
    """The model server this environment puts the adapter in front of (adapter/config.py's choice:
    OIP_URL when set, else TorchServe's inference API); None for settings the adapter refuses."""
    from .config import ConfigError, Settings

    try:
        settings = Settings.from_env()
    except ConfigError:
        return None
    return f"the OIP server at {settings.oip_url}" if settings.oip_url else f"TorchServe at {settings.inference_url}"


def _model_state(base: str) -> str:
    try:
        response = httpx.get(f"{base}/health", timeout=5.0)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return "model status unknown"
    return "model ready" if response.status_code == 200 else f"model not ready: {body.get('error')}"


def spawn(host: str, port: int, log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The adapter (`serve`) on host:port, detached from the caller's terminal and session."""
    command = [sys.executable, "-m", "adapter.run", "serve", "--host", host, "--port", str(port),
               "--log-file", str(log_file)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(stderr_file(log_file), "wb") as out:  # this start's output only: no stale lines above an error
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=REPO, start_new_session=True)  # survives the shell (make) that started it


def wait_until_up(base: str, process: subprocess.Popen, log_file: Path, timeout: float = START_TIMEOUT_S,
                  since: dict[Path, int] | None = None) -> None:
    """Return once the adapter at `base` answers; raise ServiceStartError if it exits or stays silent, with its
    output (a bad setting's reason) first and the log from `since` (log_ends before spawn) on: earlier runs'
    access lines buried the reason."""
    # /health answers 503 while TorchServe is down: the adapter is up all the same.
    wait_until_ready(lambda: _answers(f"{base}/health", statuses=(200, 503)), timeout, "The adapter",
                     logs=[stderr_file(log_file), log_file], exited=popen_exited(process), since=since)


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
    since = log_ends([log_file])
    process = spawn(host, port, Path(log_file), env={**os.environ, **settings_env})
    try:
        wait_until_up(f"http://{host}:{port}", process, Path(log_file), start_timeout, since)
        yield AdapterProcess(f"http://{host}:{port}", process, Path(log_file))
    finally:
        stop_popen(process, STOP_TIMEOUT_S)


def _taken_metrics_address() -> tuple[str, int] | None:
    """(METRICS_HOST, METRICS_PORT) when the metrics get a port of their own and something listens there."""
    from .config import ConfigError, Settings

    try:
        settings = Settings.from_env()
    except ConfigError:  # serve says what is wrong
        return None
    if settings.metrics and settings.metrics_port and port_in_use(settings.metrics_port, settings.metrics_host):
        return settings.metrics_host, settings.metrics_port
    return None


def _say_if_stranger() -> None:
    if (stranger := PID_FILE.stranger()) is not None:
        print(f"Note: {PID_FILE.path} names {stranger}, which is not this adapter (ours stopped without removing "
              "the file; the pid was reused): that process is left alone.", file=sys.stderr)


def start() -> int:
    host, port = _address()
    base = f"http://{host}:{port}"
    wanted = model_server()
    _say_if_stranger()
    if pid := PID_FILE.pid():
        try:
            running_for = MODEL_SERVER_FILE.read_text().strip()
        except OSError:
            running_for = "a model server it did not record"
        if wanted is None or running_for == wanted:
            print(f"Adapter already running (pid {pid}): page at {base}/ ({_model_state(base)})")
            return 0
        print(f"Adapter running (pid {pid}) in front of {running_for}: restarting it in front of {wanted}.")
        stop_process(pid, STOP_TIMEOUT_S)
        PID_FILE.remove()
    if port_in_use(port, host):
        print(f"Port {port} on {host} is already in use by another process: stop it, or set ADAPTER_PORT "
              "to another port (and ADAPTER_HOST to listen elsewhere).", file=sys.stderr)
        return 1
    if (metrics_address := _taken_metrics_address()) is not None:
        print(f"Port {metrics_address[1]} on {metrics_address[0]} is already in use by another process: stop it, "
              "or set METRICS_PORT to another port (METRICS_HOST to listen elsewhere; unset: /metrics on the "
              "adapter's own port).", file=sys.stderr)
        return 1
    since = log_ends([LOG_FILE])
    process = spawn(host, port, LOG_FILE)
    try:
        PID_FILE.write(process.pid)
        MODEL_SERVER_FILE.write_text(f"{wanted}\n")
        wait_until_up(base, process, LOG_FILE, since=since)
    except (ServiceStartError, KeyboardInterrupt) as err:  # (Ctrl-C: what this command started is stopped too)
        stop_popen(process, STOP_TIMEOUT_S)
        PID_FILE.remove()
        MODEL_SERVER_FILE.unlink(missing_ok=True)
        interrupted = isinstance(err, KeyboardInterrupt)
        print("error: interrupted while the adapter started; it was stopped" if interrupted else err, file=sys.stderr)
        return 130 if interrupted else 1
    print(f"Adapter running (pid {process.pid}, log {LOG_FILE}): page at {base}/ ({_model_state(base)})")
    return 0


def stop() -> int:
    _say_if_stranger()
    pid = PID_FILE.pid()
    if pid is not None:
        stop_process(pid, STOP_TIMEOUT_S)
    PID_FILE.remove()
    MODEL_SERVER_FILE.unlink(missing_ok=True)
    print(f"Adapter stopped (pid {pid})." if pid else "Adapter not running.")
    return 0


def status() -> int:
    _say_if_stranger()
    host, port = _address()
    pid = PID_FILE.pid()
    if pid is None:
        print("Adapter not running.")
        return NOT_RUNNING
    print(f"Adapter running (pid {pid}): page at http://{host}:{port}/ ({_model_state(f'http://{host}:{port}')})")
    return RUNNING


def logging_config(log_file: Path | None, settings) -> dict:
    """uvicorn's and the adapter's logs into one rotating file (or the console without a file)."""
    if log_file is None:
        handler = {"class": "logging.StreamHandler", "formatter": "plain"}
    else:
        handler = {"class": "serving.rotating_log.RotatingLog", "formatter": "plain",
                   "filename": str(log_file), "maxBytes": settings.log_max_bytes,
                   "backupCount": settings.log_backups, "encoding": "utf-8"}
    quiet = {"handlers": ["out"], "level": "INFO", "propagate": False}
    return {"version": 1, "disable_existing_loggers": False,
            # adapter/edge.py's access lines bare (one JSON object each); the rest plain.
            "formatters": {"plain": {"()": "adapter.edge.AccessLogFormatter",
                                     "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": {"out": handler},
            "loggers": {"uvicorn": quiet, "uvicorn.access": quiet, "adapter": quiet},
            "root": {"handlers": ["out"], "level": "WARNING"}}


def _return_freed_memory_to_the_os() -> None:
    """glibc raises its mmap threshold after large blocks are freed, so later 10 MB uploads land on
    the heap and stay in the process's RSS after they are gone; a fixed threshold keeps every block
    over 256 KB in its own mapping, unmapped when freed (benchmarks/RESULTS.md, "Hostile and heavy clients")."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def _enough_open_files(settings) -> None:
    """Raise the soft limit on open files to what MAX_OPEN_CONNECTIONS needs (client connections, the
    pool to TorchServe, logs and a margin), or refuse to start when the hard limit is below it."""
    from serving.process import ensure_open_files

    from .config import ConfigError

    try:
        ensure_open_files(settings.max_open_connections + settings.max_connections + 128)
    except ValueError as err:
        raise ConfigError(f"MAX_OPEN_CONNECTIONS={settings.max_open_connections} {err}") from None


def serve(host: str, port: int, log_file: Path | None) -> int:
    """The adapter in the foreground: uvicorn with the adapter's protocol, limits and log."""
    import uvicorn

    from .app import create_app
    from .config import ConfigError, Settings
    from .protocol import protocol_class

    try:
        settings = Settings.from_env()
        settings.check()
    except ConfigError as err:
        print(f"adapter: bad setting: {err}", file=sys.stderr)
        return 2
    try:
        _enough_open_files(settings)
    except ConfigError as err:
        print(f"adapter: {err}", file=sys.stderr)
        return 2
    _return_freed_memory_to_the_os()
    # The log is set up before the app is made (its start-up warnings, e.g. "no page", belong in it),
    # so uvicorn is given none to set up again.
    logging.config.dictConfig(logging_config(log_file, settings))
    app = create_app(settings)
    # X-Forwarded-For names the client only when it comes from a trusted proxy (uvicorn's default
    # trusts 127.0.0.1: any local program could then pick its own address and share).
    # uvicorn's access log is off: adapter/edge.py writes one JSON line per request instead.
    protocol = protocol_class(settings, app.state.refused_before_app,
                              app.state.metrics.connection_reset if app.state.metrics else None)
    if app.state.metrics:
        app.state.metrics.watch_connections(protocol.open_connections)
    config = uvicorn.Config(app, host=host, port=port, http=protocol,
                            timeout_keep_alive=settings.keepalive_timeout_s, access_log=False,
                            ws="none",  # no WebSocket routes: upgrades are answered 501 (adapter/protocol.py)
                            proxy_headers=bool(settings.trusted_proxies),
                            forwarded_allow_ips=",".join(settings.trusted_networks()) or None,
                            log_config=None)
    uvicorn.Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("adapter.run", __doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "serve"])
    parser.add_argument("--host", help="serve: address (default ADAPTER_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="serve: port (default ADAPTER_PORT or 8000)")
    parser.add_argument("--log-file", type=Path, help="serve: rotating log file (default: the console)")
    args = parser.parse_args(argv)
    if args.command != "serve" and (args.host or args.port or args.log_file):
        # start/stop/status find the adapter by its settings: an address given here would be ignored.
        parser.error(f"--host, --port and --log-file are for serve; {args.command} reads ADAPTER_HOST and "
                     f"ADAPTER_PORT (e.g. ADAPTER_PORT=8001 {cli.module_command('adapter.run', 'start')})")
    try:
        host, port = _address()
    except ValueError as err:  # a bare int() gave a traceback without the name, and took 0 or 70000
        print(f"adapter: bad setting: {err}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:
            return serve(args.host or host, args.port or port, args.log_file)
        except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down cleanly, then raised it again; no traceback
            return 130
    return {"start": start, "stop": stop, "status": status}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
