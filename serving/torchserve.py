"""Start, wait for, and stop a TorchServe instance serving cifar100.mar.

    python -m serving.torchserve start [--timeout 600]   # make serve-torchserve (default: model-config.yaml's
                                                         # startupTimeout, 600)
    python -m serving.torchserve stop                    # make stop-torchserve
    python -m serving.torchserve status

Both commands are idempotent. ``make serve-torchserve`` runs the instance described by the repo's
config.properties (ports 8080/8081/8082) from the repo root, so key_file.json lands there and logs
go to logs/. Tests and benchmarks use the same class with their own directory and free ports:

    ts = TorchServeInstance.on_free_ports(workdir)   # a per-instance copy of config.properties
    ts.start(); ts.wait_ready(); ...; ts.stop()

Each instance gets its own TMPDIR/TEMP (TorchServe keeps its pid file, worker sockets and the
unpacked model there, so two instances sharing one would trample each other). Readiness is a
worker with status READY in ``GET /models/cifar100`` on the management API: /ping answers
Healthy before the model is loaded, and stays Healthy while a worker crash-loops.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from serving import settings
from serving.java import java_problem
from serving.keys import KeyFile, KeyFileError
from serving.process import (NOT_RUNNING, RUNNING, PidFile, ServiceStartError, changed_since_started,
                             command_line_with, free_ports, log_tail, port_in_use, stop_process, wait_until_ready)
from serving import cli
from serving.archive import ArchiveError, startup_timeout_s

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = settings.MODEL_NAME
MAR_FILE = f"{MODEL_NAME}.mar"
BASE_CONFIG = REPO / "config.properties"
LOG_CONFIG = REPO / "serving" / "log4j2.xml"
DEFAULT_MODEL_STORE = REPO / "model_store"
DEFAULT_PORTS = settings.TORCHSERVE_PORTS
# Compiled engines (handler/engine.py), kept across worker and server restarts; one folder per
# checkout, shared by every instance started from it (the tests' too: only the first one compiles).
DEFAULT_ENGINE_CACHE = REPO / ".cache" / "engines"
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"  # on the command line of TorchServe's Java process
# What TorchServe 0.12 writes to ts_log.log each time a worker dies loading the model (corrupt archive, handler
# that fails to import or initialize); it then retries forever, so this many since a start is a failed start.
LOAD_FAILED_LINE = "Load model failed: "
LOAD_FAILURES_ENV, LOAD_FAILURES_DEFAULT = "TS_START_LOAD_FAILURES", 3


class TorchServeError(ServiceStartError):
    """TorchServe did not start or become ready; the message carries the tail of its log."""


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


@dataclass
class TorchServeInstance:
    """One TorchServe server: its directory (key_file.json, config, logs/, tmp/) and ports."""

    workdir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    model_store: Path = DEFAULT_MODEL_STORE
    model_name: str = MODEL_NAME
    log_dir: Path | None = None
    extra_properties: dict[str, str] = field(default_factory=dict)
    # log4j2 configuration for Java's logs; None: TorchServe's built-in one (see serving/log4j2.xml)
    log_config: Path | None = LOG_CONFIG
    # A start (or a rollout's READY wait) fails after this many failed loads of the model (TS_START_LOAD_FAILURES).
    load_failures_to_give_up: int = LOAD_FAILURES_DEFAULT

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        self.log_dir = Path(self.log_dir or self.workdir / "logs").resolve()
        self.tmp_dir = self.log_dir / "tmp"  # pid file, worker sockets, unpacked model
        self.key_file = KeyFile(self.workdir / "key_file.json")
        self.ts_log_offset: int | None = None  # ts_log.log's size when this object last started the server

    @classmethod
    def on_free_ports(cls, workdir: Path, **kwargs) -> "TorchServeInstance":
        return cls(workdir, dict(zip(DEFAULT_PORTS, free_ports(len(DEFAULT_PORTS)))), **kwargs)

    # ---- addresses --------------------------------------------------------------------------
    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    def adapter_env(self) -> dict[str, str]:
        """The environment that points an adapter (adapter/config.py) at this instance."""
        return {"TS_INFERENCE_URL": self.inference_url, "TS_MANAGEMENT_URL": self.management_url,
                "TS_MODEL_NAME": self.model_name, "TS_KEY_FILE": str(self.key_file.path)}

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model_name}"

    @property
    def config_path(self) -> Path:
        return self.log_dir / "config.properties"

    @property
    def pid_file(self) -> Path:
        return self.tmp_dir / ".model_server.pid"

    @property
    def ts_log(self) -> Path:
        return self.log_dir / "ts_log.log"

    # ---- lifecycle --------------------------------------------------------------------------
    def address_properties(self) -> dict[str, str]:
        """The config.properties keys that place this instance: its ports and its model store."""
        return {"inference_address": self.inference_url, "management_address": self.management_url,
                "metrics_address": self.metrics_url,
                "grpc_inference_port": str(self.ports["grpc_inference"]),
                "grpc_management_port": str(self.ports["grpc_management"]),
                "model_store": str(self.model_store)}

    def base_properties(self) -> dict[str, str]:
        """Every other key, as in the repo's config.properties, with the model to load."""
        return {**read_properties(BASE_CONFIG),
                "load_models": MAR_FILE if self.model_name == MODEL_NAME else f"{self.model_name}={MAR_FILE}"}

    def write_config(self) -> Path:
        """config.properties with this instance's ports and paths (and extra_properties last)."""
        props = {**self.base_properties(), **self.address_properties(), **self.extra_properties}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return self.config_path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, TMPDIR=str(self.tmp_dir), TEMP=str(self.tmp_dir),
                   LOG_LOCATION=str(self.log_dir), METRICS_LOCATION=str(self.log_dir))
        # The workers must import handler/ and model/ from the archive, not from a checkout that
        # happens to be on PYTHONPATH (as it is under pytest).
        env.pop("PYTHONPATH", None)
        # Idle OpenMP threads sleep instead of spinning, so they do not steal the cores Java and the
        # other worker need (benchmarks/RESULTS.md). Read by libgomp at torch's import; an operator's own wins.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Compiled engines and inductor's own caches persist, so a restarted worker loads, not compiles.
        cache = Path(env.setdefault(settings.ENGINE_CACHE_ENV, str(DEFAULT_ENGINE_CACHE)))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        return env

    @property
    def pid_record(self) -> PidFile:
        """The pid file TorchServe writes, counting only this instance's server: TorchServe's main class run
        with this instance's config (-f). "java" alone matched any Java program that got the pid of a server
        that died without removing the file: `stop` killed it, `start` started nothing."""
        return PidFile(self.pid_file, command_line_with([JAVA_MAIN_CLASS], ["-f", str(self.config_path)]))

    def java_pid(self) -> int | None:
        """The running server's (Java) pid, from its pid file; None when it is not running."""
        return self.pid_record.pid()

    def is_running(self) -> bool:
        return self.java_pid() is not None

    def command(self) -> list[str]:
        """The `torchserve --start` command line that launches this instance."""
        torchserve = Path(sys.executable).with_name("torchserve")
        cmd = [str(torchserve if torchserve.exists() else "torchserve"), "--start", "--ncs",
               "--ts-config", str(self.config_path), "--model-store", str(self.model_store)]
        if self.log_config is not None:
            cmd += ["--log-config", str(self.log_config)]
        return cmd

    def check_can_start(self) -> None:
        """Refuse at once what would make the READY wait fail only after its deadline."""
        if (problem := java_problem()) is not None:
            raise TorchServeError(problem)
        # Java would fail to bind and its worker would look like it "exited while starting".
        busy = [f"{port} ({name}, {settings.TORCHSERVE_PORT_ENV[name]})" for name, port in self.ports.items()
                if port_in_use(port)]
        if busy:
            raise TorchServeError(f"port {', '.join(busy)} already in use by another process: stop it, or move "
                                  "TorchServe with the variable named (make serve / make stop take them too)")
        if not (self.model_store / MAR_FILE).is_file():
            raise TorchServeError(f"{self.model_store / MAR_FILE} not found: run `make archive` first")

    def start(self) -> None:
        """Start TorchServe in the background (no-op when this instance already runs)."""
        if self.is_running():
            return
        self.check_can_start()
        self.write_config()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)  # a stale one would look like a live server
        cmd = self.command()
        self.ts_log_offset = self.ts_log_size()  # ts_log.log is appended to: only this start's lines count
        launcher_log = self.log_dir / "torchserve_launcher.log"
        with open(launcher_log, "wb") as out:  # this start's lines only
            # `torchserve --start` returns once Java is launched; Java writes key_file.json into its cwd.
            # Java keeps the launcher's stdout/stderr: a file, never a pipe (a pipe would never close).
            result = subprocess.run(cmd, cwd=self.workdir, env=self._env(), stdout=out,
                                    stderr=subprocess.STDOUT, timeout=60)
        if result.returncode != 0:
            raise TorchServeError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{log_tail(launcher_log)}")

    def worker_statuses(self, timeout: float = 5.0) -> list[dict]:
        """The model's workers as the management API describes them (needs the management key)."""
        r = httpx.get(f"{self.management_url}/models/{self.model_name}", headers=self.key_file.header("management"),
                      timeout=timeout)
        r.raise_for_status()
        return r.json()[0].get("workers", [])

    def ts_log_size(self) -> int:
        try:
            return self.ts_log.stat().st_size
        except OSError:
            return 0

    def load_failures(self, since: int, version: str | None = None) -> int:
        """How many times a worker of this model (of ``version`` only, if given) failed to load it, by ts_log.log's
        lines after byte ``since`` (from the start when the log was rolled over since)."""
        try:
            with open(self.ts_log, "rb") as log:
                log.seek(since if self.ts_log_size() >= since else 0)
                text = log.read().decode(errors="replace")
        except OSError:
            return 0
        worker = f"-{self.model_name}_{version} " if version is not None else f"-{self.model_name}_"
        return sum(1 for line in text.splitlines()
                   if f"{LOAD_FAILED_LINE}{self.model_name}," in line and worker in line)

    def load_failed(self, since: int, version: str | None = None, when: str = "this start") -> str | None:
        """Why the model will not load (for a start's error), once it failed load_failures_to_give_up times since
        byte ``since`` of ts_log.log; None before."""
        failures = self.load_failures(since, version)
        if failures < self.load_failures_to_give_up:
            return None
        return (f"the model failed to load {failures} times since {when} "
                f"(\"{LOAD_FAILED_LINE.strip()}\" in {self.ts_log}; a corrupt archive, or a handler that fails "
                f"to import or start: {self.log_dir / 'model_log.log'} "
                f"has the worker's traceback)")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until a worker is READY; on failure raise with the tail of the server's logs. Fails early when the
        model fails to load repeatedly (TorchServe retries a crashing worker without end)."""
        last = "not started"
        since = self.ts_log_offset if self.ts_log_offset is not None else self.ts_log_size()

        def ready() -> bool:
            nonlocal last
            try:
                workers = self.worker_statuses()
            except (httpx.HTTPError, KeyFileError, ValueError, IndexError) as err:
                last = f"{type(err).__name__}: {err}"
                return False
            last = f"workers: {[w.get('status') for w in workers]}"
            return any(w.get("status") == "READY" for w in workers)

        def exited() -> str | None:
            if self.pid_file.exists() and not self.is_running():
                return "its pid file names no live server"
            return self.load_failed(since)

        try:
            wait_until_ready(ready, timeout, f"TorchServe's {self.model_name} worker", interval=0.5,
                             logs=[self.log_dir / "model_log.log", self.ts_log,
                                   self.log_dir / "torchserve_launcher.log"], exited=exited)
        except ServiceStartError as err:
            raise TorchServeError(f"{err} (last seen: {last})") from None
        self.ts_log_offset = None  # ready: a later wait counts the failures from its own call on

    def _java_by_command_line(self) -> int | None:
        """This instance's server found among the processes by its command line (its main class with this
        instance's config): `torchserve --start` writes the pid file only after Java is up, and a stop in
        between (Ctrl-C while it starts) left Java and its workers running."""
        is_ours = command_line_with([JAVA_MAIN_CLASS], ["-f", str(self.config_path)])
        for process in psutil.process_iter():
            try:
                if is_ours(process):
                    return process.pid
            except psutil.Error:
                continue
        return None

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server and its workers (Java's shutdown hook stops them; a wedged one is killed);
        True if one was running. Idempotent."""
        pid = self.java_pid() or self._java_by_command_line()
        stopped = pid is not None and stop_process(pid, timeout, children=True)
        self.pid_file.unlink(missing_ok=True)
        if stopped:
            (self.workdir / "key_file.json").unlink(missing_ok=True)
        return stopped

    def archive_newer_than_server(self) -> bool:
        """The archive in the model store was rebuilt after the running server loaded it."""
        return changed_since_started(self.model_store / MAR_FILE, self.java_pid())

    def curl_example(self) -> str:
        """The shell lines a user runs to classify a shipped example picture (the key comes from key_file.json)."""
        return (f"KEY=$(python3 -c \"import json; print(json.load(open('{self.key_file.path}'))['inference']['key'])\")\n"
                f"curl -H \"Authorization: Bearer $KEY\" -T {REPO / 'frontend' / 'examples' / 'test-00042.png'} "
                f"{self.predictions_url}")


def default_instance() -> TorchServeInstance:
    """The instance `make serve-torchserve` runs: ports from config.properties, run from the repo root."""
    props = read_properties(BASE_CONFIG)
    ports = dict(DEFAULT_PORTS)
    for name in ("inference", "management", "metrics"):
        ports[name] = int(props[f"{name}_address"].rsplit(":", 1)[1])
    for name in ("grpc_inference", "grpc_management"):
        ports[name] = int(props.get(f"{name}_port", ports[name]))
    try:
        ports = settings.torchserve_ports(os.environ, ports)  # TS_INFERENCE_PORT=... moves one
    except ValueError as err:
        raise TorchServeError(str(err)) from None
    failures = os.environ.get(LOAD_FAILURES_ENV, "").strip() or str(LOAD_FAILURES_DEFAULT)
    if not failures.isdigit() or int(failures) < 1:
        raise TorchServeError(f"{LOAD_FAILURES_ENV}={failures!r}: needs a whole number of 1 or more")
    store = Path(props.get("model_store", "model_store"))
    return TorchServeInstance(REPO, ports, model_store=store if store.is_absolute() else REPO / store,
                              log_dir=REPO / "logs", load_failures_to_give_up=int(failures))


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("serving.torchserve", "Run TorchServe for the CIFAR-100 model.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for a READY worker (default: the startupTimeout of TS_MODEL_CONFIG, "
                             "else of handler/model-config.yaml)")
    args = parser.parse_args(argv)
    try:
        # (read for a start only: stop and status work whatever TS_MODEL_CONFIG names)
        timeout = args.timeout if args.timeout is not None or args.command != "start" else startup_timeout_s()
    except ArchiveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ts = default_instance()
        if (stranger := ts.pid_record.stranger()) is not None:
            print(f"note: {ts.pid_file} names {stranger}, which is not this TorchServe (ours stopped without "
                  "removing the file; the pid was reused): that process is left alone", file=sys.stderr)
        if args.command == "start":
            already = ts.is_running()
            try:
                ts.start()
                ts.wait_ready(timeout)
            except (TorchServeError, KeyboardInterrupt) as err:
                # A server this command started and that is not ready would hold the ports (the next start
                # says "already running"); one that was already running is the operator's: left alone.
                stopped = not already and ts.stop(timeout=10)  # no model loaded: nothing to finish
                why = str(err) if isinstance(err, TorchServeError) else "interrupted while TorchServe started"
                note = "\nthe TorchServe this command started was stopped (it held the ports)." if stopped else ""
                print(f"error: {why}{note}", file=sys.stderr)
                return 130 if isinstance(err, KeyboardInterrupt) else 1
            if already and ts.archive_newer_than_server():
                print(f"warning: TorchServe was already running and keeps serving the model it loaded at its start; "
                      f"{ts.model_store / MAR_FILE} was rebuilt since. Other weights: `make rollout WEIGHTS=...` "
                      "swaps them in; the same weights with a changed handler or model-config.yaml (same version, "
                      "nothing for a rollout to swap): `make stop && make serve WEIGHTS=...`.", file=sys.stderr)
            print(f"TorchServe {'was already running' if already else 'is ready'}: model {ts.model_name} at "
                  f"{ts.predictions_url}\n  management {ts.management_url}, Prometheus metrics "
                  f"{ts.metrics_url}/metrics, logs in {ts.log_dir}\n  keys in {ts.key_file.path}. Try:\n"
                  f"{ts.curl_example()}")
        elif args.command == "stop":
            print("TorchServe stopped." if ts.stop() else "TorchServe was not running.")
        else:
            pid = ts.java_pid()
            print(f"TorchServe running (pid {pid})" if pid else "TorchServe not running")
            return RUNNING if pid else NOT_RUNNING
    except TorchServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
