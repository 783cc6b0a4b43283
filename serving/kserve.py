"""The KServe bundle (``make kserve-bundle``), and running it locally exactly as KServe runs it.

KServe's TorchServe runtime mounts ``storageUri`` at /mnt/models and expects

    dist/kserve/config/config.properties     TorchServe's settings, read by TorchServe and by KServe's wrapper
    dist/kserve/model-store/cifar100.mar     the same archive as `make archive` (WEIGHTS= picks others)

and starts ``torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties`` with ``TS_SERVICE_ENVELOPE`` = ``kserve`` (v1) or
``kservev2`` (v2). The envelopes answer only the first request of a batch (pytorch/serve #2158), so
the config sets ``enable_envvars_config=false``: TorchServe ignores the variable, and the handler
reads v1/v2 bodies itself (handler/protocols.py) with batching intact.

The same bundle also runs without TorchServe, under KServe's own Python model server
(handler/kserve_predictor.py; ``KServePredictor`` below starts it as its container would).

    python -m serving.kserve [--weights PATH] [--out dist/kserve] [--force]
    python -m serving.kserve predictor start|stop|status [--bundle dist/kserve]

``predictor start`` runs KServe's model server on the bundle in the background, as `make serve-kserve`
does (ports: PREDICTOR_HTTP_PORT / PREDICTOR_GRPC_PORT, 8085 / 8086; logs/predictor.log, rotated as the
predictor's --log_max_bytes / --log_backups say, and logs/predictor.stderr.log, this start's own output;
logs/kserve-predictor.pid; its other options from PREDICTOR_ARGS); ``stop`` stops it (`make stop` too).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
import psutil
import yaml

from model.shipped import SHIPPED_WEIGHTS
from serving.archive import MODEL_NAME, ArchiveError, build_archive, model_config_path, weights_version
from serving.process import (NOT_RUNNING, RUNNING, PidFile, ServiceStartError, changed_since_started, command_line_with,
                             free_ports, log_ends, popen_exited, port_in_use, stop_popen, stop_process,
                             wait_until_ready)
from serving.rotating_log import stderr_file
from serving.settings import (ENGINE_CACHE_ENV, MODEL_CONFIG, PREDICTOR_ARGS_ENV, PREDICTOR_PORT_ENV, PREDICTOR_PORTS,
                              ports_from_env, read_model_config)
from serving.torchserve import (BASE_CONFIG, DEFAULT_ENGINE_CACHE, MAR_FILE, TorchServeError, TorchServeInstance,
                               read_properties)
from serving import cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "dist" / "kserve"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri's contents
MANIFEST = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
LOG_DIR = REPO / "logs"
PREDICTOR_START_TIMEOUT_S = 300.0  # the first start on a machine compiles the engine
PREDICTOR_STOP_TIMEOUT_S = 30.0    # SIGTERM: KServe finishes the requests in flight (its grace period), then exits
PREDICTOR_MODULE = "handler.kserve_predictor"
# The options `predictor start` gives its server itself (not PREDICTOR_ARGS'), and what chooses them.
PREDICTOR_OWN_OPTIONS = {"--model_dir": "the --bundle option", "--host": "127.0.0.1, this machine only",
                         "--http_port": PREDICTOR_PORT_ENV["http"], "--grpc_port": PREDICTOR_PORT_ENV["grpc"],
                         "--log_file": "logs/predictor.log"}
# KServe's wrapper (port 8080, the pod's only served port) calls TorchServe on 8085 for inference
# and management alike; only the wrapper calls it, so it listens on the pod's loopback. Prometheus
# scrapes the metrics port from outside the container.
POD_ADDRESSES = {"inference_address": "http://127.0.0.1:8085", "management_address": "http://127.0.0.1:8085",
                 "metrics_address": "http://0.0.0.0:8082", "grpc_inference_port": "7070",
                 "grpc_management_port": "7071"}
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}  # TS_SERVICE_ENVELOPE per protocolVersion, as KServe sets it
# Keys of the repo's config.properties that describe a local machine, not the pod.
LOCAL_ONLY = {"model_store", "load_models", "token_expiration_min", "default_workers_per_model"}


# model-config.yaml's settings a snapshot entry carries (TorchServe's Model.setModelState reads them).
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")


def model_snapshot(version: str, model_config: Path = MODEL_CONFIG) -> dict:
    """The ``model_snapshot`` KServe's wrapper reads (model names) and TorchServe loads: batching,
    workers and their timeouts as in model-config.yaml. A snapshot's values replace the archive's, and
    a key it lacks gets TorchServe's default, not the archive's (0.12: 120 s for startupTimeout and
    responseTimeout), so every one of SNAPSHOT_KEYS is copied."""
    cfg = read_model_config(model_config)
    settings = {key: cfg[key] for key in SNAPSHOT_KEYS}
    return {"name": "startup.cfg", "modelCount": 1,
            "models": {MODEL_NAME: {version: {"defaultVersion": True, "marName": MAR_FILE, **settings}}}}


def bundle_properties(version: str, model_config: Path = MODEL_CONFIG) -> dict[str, str]:
    props = {k: v for k, v in read_properties(BASE_CONFIG).items() if k not in LOCAL_ONLY}
    props.update(POD_ADDRESSES)
    props.update({
        "model_store": f"{MOUNT}/model-store",
        # TS_SERVICE_ENVELOPE (set by KServe) must stay unread: its envelopes break batching.
        "enable_envvars_config": "false",
        # KServe authenticates at its ingress; the wrapper sends no TorchServe token.
        "disable_token_authorization": "true",
        # No registration in the pod (no token there): a new version is a new InferenceService
        # revision (canaryTrafficPercent, deploy/kserve/inferenceservice-canary.yaml), not make rollout.
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "metrics_mode": "prometheus",
        "enable_metrics_api": "true",
        "model_snapshot": json.dumps(model_snapshot(version, model_config), separators=(",", ":")),
    })
    return props


def build_bundle(weights: Path = SHIPPED_WEIGHTS, out: Path = DEFAULT_OUT, force: bool = False,
                 quiet: bool = False, model_config: Path = MODEL_CONFIG) -> Path:
    """Write ``out/config/config.properties`` and ``out/model-store/cifar100.mar``; return ``out``.
    ``model_config`` replaces handler/model-config.yaml (the benchmarks try other settings)."""
    out = Path(out).resolve()
    build_archive(Path(weights), out / "model-store", force=force, quiet=quiet, model_config=model_config)
    props = bundle_properties(weights_version(Path(weights).resolve()), model_config)
    config = out / "config" / "config.properties"
    config.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by `make kserve-bundle` (serving/kserve.py) for KServe's TorchServe runtime.\n"
              "# enable_envvars_config=false: TS_SERVICE_ENVELOPE is ignored, the handler reads v1/v2 bodies\n"
              "# itself and keeps batching. Token auth off: KServe authenticates at its ingress.\n")
    config.write_text(header + "".join(f"{k}={v}\n" for k, v in props.items()))
    if not quiet:
        print(f"KServe bundle in {out}: config/config.properties, model-store/{MAR_FILE}\n"
              f"  copy it where the InferenceService's storageUri points (README, 'KServe').")
    return out


def pod_environment(manifest: Path = MANIFEST) -> dict[str, str]:
    """The predictor container's env from deploy/kserve/inferenceservice.yaml (threads, OpenMP)."""
    spec = yaml.safe_load(Path(manifest).read_text())
    return {e["name"]: str(e["value"]) for e in spec["spec"]["predictor"]["model"].get("env", [])}


class KServeTorchServe(TorchServeInstance):
    """TorchServe from a KServe bundle, started with KServe's runtime command line and environment.

    Only the ports and the /mnt/models paths of the bundle's config are substituted (free loopback
    ports, the bundle's real folder); TMPDIR/TEMP and the working directory are the instance's own.
    """

    def __init__(self, workdir: Path, bundle: Path = DEFAULT_OUT, protocol: str = "v2", ports: dict | None = None):
        inference, metrics, grpc_inference, grpc_management = free_ports(4) if ports is None else ports
        super().__init__(workdir, {"inference": inference, "management": inference, "metrics": metrics,
                                   "grpc_inference": grpc_inference, "grpc_management": grpc_management},
                         model_store=Path(bundle) / "model-store", log_config=None)
        self.bundle = Path(bundle).resolve()
        self.protocol = protocol

    @property
    def v2_infer_url(self) -> str:
        return f"{self.inference_url}/v2/models/{self.model_name}/infer"

    @property
    def v1_predict_url(self) -> str:
        return f"{self.inference_url}/v1/models/{self.model_name}:predict"

    def base_properties(self) -> dict[str, str]:
        return read_properties(self.bundle / "config" / "config.properties")  # the bundle's, not the repo's

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, TMPDIR=str(self.tmp_dir), TEMP=str(self.tmp_dir),
                   TS_SERVICE_ENVELOPE=ENVELOPES[self.protocol], **pod_environment())
        env.pop("PYTHONPATH", None)  # the workers import handler/ and model/ from the archive
        env.setdefault(ENGINE_CACHE_ENV, str(DEFAULT_ENGINE_CACHE))  # compiled engines: the tests' shared folder
        return env

    def command(self) -> list[str]:
        # KServe's runtime (config/runtimes/kserve-torchserve.yaml): these two options, nothing else.
        torchserve = super().command()[0]
        return [torchserve, "--start", f"--model-store={self.model_store}", f"--ts-config={self.config_path}"]

    def check_can_start(self) -> None:
        if not (self.model_store / MAR_FILE).is_file():
            raise TorchServeError(f"{self.model_store / MAR_FILE} not found: run `make kserve-bundle` first")

    def worker_statuses(self, timeout: float = 5.0) -> list[dict]:
        # Token auth is off inside the pod, as for KServe's wrapper: no key.
        r = httpx.get(f"{self.management_url}/models/{self.model_name}", timeout=timeout)
        r.raise_for_status()
        return r.json()[0].get("workers", [])


START_ATTEMPTS = 3  # a start on ports picked free here, when one of them was taken before the server bound it


class KServePredictor:
    """KServe's own Python model server on a bundle (handler/kserve_predictor.py), no TorchServe:
    started as its container would be, REST and gRPC (the Open Inference Protocol's two transports) on
    free ports."""

    def __init__(self, workdir: Path, bundle: Path = DEFAULT_OUT, port: int | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 grpc_port: int | None = None, detached: bool = False):
        self.workdir, self.bundle = Path(workdir), Path(bundle).resolve()
        self.ports_picked_here = port is None and grpc_port is None
        spare = free_ports(2)
        self._listen_on(port or spare[0], grpc_port or spare[1])
        self.log = (self.workdir / "predictor.log").absolute()
        self.extra_args, self.env = list(extra_args or []), dict(env or {})
        self.process: subprocess.Popen | None = None
        self.log_since: dict[Path, int] = {}
        self.detached = detached  # a service of its own (predictor start): outlives this process and its shell

    def _listen_on(self, port: int, grpc_port: int) -> None:
        self.port, self.grpc_port = port, grpc_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", PREDICTOR_MODULE, f"--model_dir={self.bundle}", "--host=127.0.0.1",
                f"--http_port={self.port}", f"--grpc_port={self.grpc_port}", f"--log_file={self.log}",
                *self.extra_args]

    @property
    def pid_record(self) -> PidFile:
        """logs/kserve-predictor.pid (``predictor start``'s), counting only this server: KServe's model server run
        on this bundle and this REST port. Any command line with handler.kserve_predictor counted: a predictor
        killed outright left the file, its pid went to another checkout's or another port's predictor, and
        `make stop-kserve` killed that one."""
        return PidFile(LOG_DIR / "kserve-predictor.pid",
                       command_line_with(["-m", PREDICTOR_MODULE], [f"--model_dir={self.bundle}"],
                                         [f"--http_port={self.port}"]))

    def started_with(self, process: psutil.Process) -> list[str] | None:
        """When `process` is this checkout's KServe model server on another REST port or bundle (the one pid file
        names whichever `predictor start` ran last): the settings it was started with, as given to this command;
        else None. Its file is kept: removed, nothing could stop that server any more. `predictor start`'s is
        started in the checkout, in a session of its own (a test's or a benchmark's server is not)."""
        try:
            if (not command_line_with(["-m", PREDICTOR_MODULE])(process) or os.getsid(process.pid) != process.pid
                    or Path(process.cwd()).resolve() != REPO):
                return None
            given = dict(arg[2:].split("=", 1) for arg in process.cmdline() if arg.startswith("--") and "=" in arg)
        except (psutil.Error, OSError):
            return None
        settings = []
        if given.get("http_port") != str(self.port):
            settings.append(f"{PREDICTOR_PORT_ENV['http']}={given.get('http_port')}")
        if given.get("model_dir") != str(self.bundle):
            settings.append(f"--bundle {given.get('model_dir')}")
        return settings or None

    def start(self, timeout: float = 300.0) -> "KServePredictor":
        for _ in range(START_ATTEMPTS - 1):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return self
            except ServiceStartError as err:
                # Free ports picked here may be taken before the server binds them, seconds later (26 tests lost
                # their predictor so once; free_ports now picks where the OS does not, but not everywhere): again.
                if not (self.ports_picked_here and "address already in use" in str(err)):
                    raise
            self._listen_on(*free_ports(2))
        self.spawn()
        self.wait_ready(timeout)
        return self

    def spawn(self) -> subprocess.Popen:
        """The server's process, started (not ready yet: wait_ready)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.setdefault(ENGINE_CACHE_ENV, str(DEFAULT_ENGINE_CACHE))
        env.setdefault("TMPDIR", str(self.workdir))
        self.log_since = log_ends([self.log])  # the log is appended to: a failed start shows its own lines only
        # Its logging rotates predictor.log itself (--log_file); what it prints outside logging (an error before
        # logging is set up, a library's warnings) goes to predictor.stderr.log, this start's only.
        with open(stderr_file(self.log), "wb") as out:
            self.process = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=self.detached)
        return self.process

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Return once it answers; ServiceStartError when it exits first or stays silent ``timeout`` s."""
        wait_until_ready(self.ready, timeout, "KServe's model server", [stderr_file(self.log), self.log],
                         popen_exited(self.process), since=self.log_since)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v2/models/{MODEL_NAME}/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_popen(self.process)


def predictor_ports() -> tuple[int, int]:
    """(REST, gRPC) ports of the local predictor: PREDICTOR_HTTP_PORT / PREDICTOR_GRPC_PORT, else 8085 / 8086;
    ValueError for a value that is no port number."""
    ports = ports_from_env(os.environ, PREDICTOR_PORTS, PREDICTOR_PORT_ENV)
    return ports["http"], ports["grpc"]


def predictor_args(environ: Mapping[str, str]) -> list[str]:
    """PREDICTOR_ARGS, split as a shell would: more options for ``predictor start``'s server. ValueError for text
    that does not split, or for an option that ``predictor start`` gives itself (also abbreviated, as argparse
    takes it): the bundle, address, ports and log have their own settings, and its pid file knows the server
    by them."""
    text = environ.get(PREDICTOR_ARGS_ENV, "")
    try:
        args = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"{PREDICTOR_ARGS_ENV}={text!r}: {err}") from None
    for arg in args:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and (own := next(
                (option for option in PREDICTOR_OWN_OPTIONS if option.startswith(name)), None)) is not None:
            raise ValueError(f"{PREDICTOR_ARGS_ENV}: {arg}: `predictor start` sets {own} itself "
                             f"({PREDICTOR_OWN_OPTIONS[own]})")
    return args


def _started_otherwise(command: str, pid: int, settings: list[str], http: int) -> int:
    """`command` while this checkout's server runs on other settings: said, and its pid file kept. Status: not
    running on this port (3); stop and start fail (a start would write its own pid over that server's)."""
    variables, options = ([x for x in settings if x.startswith("--") == option] for option in (False, True))
    retry = " ".join([*variables, cli.module_command("serving.kserve", "predictor", command), *options])
    said = (f"the KServe model server running here (pid {pid}) was started with {' and '.join(settings)}: "
            f"{'ask' if command == 'status' else command} with that ({retry})")
    if command == "status":
        print(f"KServe's model server not running on port {http}; {said}.")
        return NOT_RUNNING
    print(f"error: {said}; {LOG_DIR / 'kserve-predictor.pid'} is kept.", file=sys.stderr)
    return 1


def predictor_command(argv: list[str]) -> int:
    """``predictor start|stop|status``: KServe's model server on the bundle as a background service."""
    parser = cli.Parser("serving.kserve predictor", "KServe's own model server on the bundle, in the background.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_OUT, help="the KServe bundle (make kserve-bundle)")
    args = parser.parse_args(argv)
    try:  # the settings from the environment: a port that is no number, PREDICTOR_ARGS a start cannot take
        http, grpc = predictor_ports()
        extra_args = predictor_args(os.environ) if args.command == "start" else []
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictor = KServePredictor(LOG_DIR, args.bundle, port=http, grpc_port=grpc, detached=True,
                                extra_args=extra_args, env={"TMPDIR": os.environ.get("TMPDIR", "/tmp")})
    pid_record = predictor.pid_record
    pid = pid_record.pid()
    other = None if pid else pid_record.live_process()
    if other is not None and (settings := predictor.started_with(other)) is not None:
        return _started_otherwise(args.command, other.pid, settings, http)
    if (stranger := pid_record.stranger()) is not None:
        print(f"note: {pid_record.path} names {stranger}, which is not this checkout's KServe model server on "
              f"{args.bundle} and port {http} (ours stopped without removing the file, and the pid was reused): "
              "that process is left alone", file=sys.stderr)
    if args.command == "status":
        print(f"KServe's model server running (pid {pid}): http://127.0.0.1:{http}, gRPC 127.0.0.1:{grpc}"
              if pid else "KServe's model server not running.")
        return RUNNING if pid else NOT_RUNNING
    if args.command == "stop":
        if pid:
            stop_process(pid, PREDICTOR_STOP_TIMEOUT_S)
        pid_record.remove()
        print(f"KServe's model server stopped (pid {pid})." if pid else "KServe's model server not running.")
        return 0
    if pid:
        if changed_since_started(args.bundle / "model-store" / MAR_FILE, pid):
            print(f"warning: KServe's model server was already running and keeps serving the model it loaded at "
                  f"its start; {args.bundle} was rebuilt since (other weights?): `make stop-kserve && make "
                  "serve-kserve WEIGHTS=...` serves them.", file=sys.stderr)
        print(f"KServe's model server already running (pid {pid}): http://127.0.0.1:{http}")
        return 0
    if not (args.bundle / "model-store" / MAR_FILE).is_file():
        print(f"error: no bundle at {args.bundle}: run `make kserve-bundle` first", file=sys.stderr)
        return 1
    for kind, port in (("http", http), ("grpc", grpc)):
        if port_in_use(port):
            print(f"error: port {port} is already in use by another process: stop it, or set "
                  f"{PREDICTOR_PORT_ENV[kind]} to another port", file=sys.stderr)
            return 1
    # Its pid is written at once: a start interrupted in any way leaves no server that status and stop
    # cannot see; one interrupted here (Ctrl-C, a failed start) stops it again.
    pid_record.write(predictor.spawn().pid)
    try:
        predictor.wait_ready(PREDICTOR_START_TIMEOUT_S)
    except BaseException as err:
        predictor.stop()
        pid_record.remove()
        if not isinstance(err, ServiceStartError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"KServe's model server running (pid {predictor.process.pid}, log {predictor.log}): "
          f"http://127.0.0.1:{http} (Open Inference Protocol; gRPC on {grpc}), on this machine only (--host 127.0.0.1)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predictor"]:
        return predictor_command(argv[1:])
    parser = cli.Parser("serving.kserve", "Write KServe's storage layout for the CIFAR-100 model.")
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model-config", type=Path, default=None,
                        help="the model-config.yaml to pack (default: TS_MODEL_CONFIG, else handler/model-config.yaml)")
    parser.add_argument("--force", action="store_true", help="rebuild the archive even when its inputs are unchanged")
    args = parser.parse_args(argv)
    try:
        build_bundle(args.weights, args.out, args.force, model_config=model_config_path(args.model_config))
    except ArchiveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
