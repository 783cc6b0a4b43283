"""The serving benchmarks' load generator: wrk, driven by benchmarks/wrk_post.lua.

Why wrk and not a Python client: the load generator shares the machine's cores with the servers it
measures, so its own CPU per request is taken from them: wrk takes about a sixth of what the
previous aiohttp client did (benchmarks/RESULTS.md). wrk comes from Debian (`make install-system`).

Each request is a POST of one of a fixed set of bodies, in rotation, keeping `concurrency`
connections busy (a closed loop: a connection sends its next request when its answer came back).
An answer counts as an error when its status is 400 or more, when the connection fails, when it
came after REQUEST_TIMEOUT_S, or when its body lacks the target's `expect` string. A point without
a good answer also counts the requests still waiting at its end as errors (in a point with answers,
the up to `concurrency` requests in flight at its end are the closed loop's normal state: wrk stops
without waiting for them), and has no latency (NaN p50/p99).
"""
from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LUA_SCRIPT = Path(__file__).with_name("wrk_post.lua")
# A request slower than this counts as an error (wrk's own default is 2 s).
REQUEST_TIMEOUT_S = 30


class LoadGeneratorError(RuntimeError):
    pass


def wrk_path() -> str:
    path = shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").exists() else None)
    if path is None:
        raise LoadGeneratorError("wrk not found: the serving benchmarks use it as load generator "
                                 "(`make install-system`, or `apt-get install wrk`)")
    return path


@dataclass
class LoadResult:
    concurrency: int
    images: int        # answered well
    seconds: float
    p50_ms: float      # NaN: no good answer
    p99_ms: float
    errors: int = 0
    unanswered: int = 0  # of the errors: requests still waiting at the end of a point that got no answer

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when the denominator is 0 or NaN (a point that answered nothing):
    printed as "nan", never as a huge or zero figure that would read as a target met."""
    return numerator / denominator if denominator and not math.isnan(denominator) else float("nan")


def print_failures(results: dict[str, list[LoadResult]]) -> None:
    """The run's failed requests (results: each target's points), and each point without a good answer
    (its p50/p99 and the ratios with it are nan); silent when all went well."""
    failed = sum(r.errors for points in results.values() for r in points)
    if failed:
        print(f"{failed} requests failed during the run (counted in the errors column)")
    for name, points in results.items():
        for r in points:
            if r.images == 0:
                print(f"NO GOOD ANSWER from {name} at concurrency {r.concurrency} in {r.seconds:.1f} s ({r.errors} "
                      f"errors, {r.unanswered} of them unanswered at the end): its p50/p99 and ratios are nan")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# The Open Inference Protocol's gRPC inference call (what GrpcTarget calls unless told otherwise).
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class _BodyFiles:
    """A target's ``bodies`` written once as files (0000.body, 0001.body, ...) for its load generator to read."""

    def body_dir(self, parent: Path) -> Path:
        if self._body_dir is None:
            self._body_dir = Path(tempfile.mkdtemp(prefix="bodies-", dir=parent))
            for i, body in enumerate(self.bodies):
                (self._body_dir / f"{i:04d}.body").write_bytes(body)
        return self._body_dir


@dataclass
class HttpTarget(_BodyFiles):
    """Where to POST and what: `bodies` in rotation, with `headers` (a function, called before each
    run, so a key read from a key file that was renewed meanwhile is the current one)."""

    url: str
    bodies: list[bytes]
    headers: Callable[[], dict[str, str]] = dict
    expect: str = ""
    _body_dir: Path | None = field(default=None, repr=False)


@dataclass
class GrpcTarget(_BodyFiles):
    """A gRPC server (``host:port``) and the serialized request messages to call ``method`` with, in rotation
    (benchmarks/grpc_load.py sends them: wrk speaks no HTTP/2)."""

    target: str
    bodies: list[bytes]
    method: str = MODEL_INFER
    _body_dir: Path | None = field(default=None, repr=False)


def model_infer_messages(payloads: list[bytes]) -> list[bytes]:
    """Each image as a serialized gRPC ModelInferRequest of one BYTES element (the file's bytes, no base64)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    from serving.settings import MODEL_NAME

    messages = []
    for payload in payloads:
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(payload)
        messages.append(pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor]).SerializeToString())
    return messages


_RESULT = re.compile(r"^(?:WRK|GRPC)_RESULT (.*)$", re.MULTILINE)


def run_load(target: HttpTarget | GrpcTarget, concurrency: int, duration_s: float, workdir: Path) -> LoadResult:
    """A point of load on ``target``: wrk for HTTP, benchmarks/grpc_load.py for gRPC."""
    if isinstance(target, GrpcTarget):
        return run_grpc(target, concurrency, duration_s, workdir)
    return run_wrk(target, concurrency, duration_s, workdir)


def run_grpc(target: GrpcTarget, concurrency: int, duration_s: float, workdir: Path) -> LoadResult:
    """Keep ``concurrency`` calls in flight against target for duration_s, from a process of its own as wrk."""
    cmd = [sys.executable, "-m", "benchmarks.grpc_load", "--target", target.target, "--method", target.method,
           "--bodies", str(target.body_dir(workdir)), "--concurrency", str(concurrency), "--duration", str(duration_s)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + REQUEST_TIMEOUT_S + 60,
                          cwd=Path(__file__).resolve().parents[1])
    match = _RESULT.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise LoadGeneratorError(f"the gRPC load generator failed ({done.returncode}) against {target.target}:\n"
                                 f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    return load_result(concurrency, {k: int(v) for k, v in (pair.split("=") for pair in match.group(1).split())})


def run_wrk(target: HttpTarget, concurrency: int, duration_s: float, workdir: Path) -> LoadResult:
    """Keep `concurrency` requests in flight against target for duration_s; wrk times each one."""
    header_args = [f"{name}: {value}" for name, value in target.headers().items()]
    cmd = [wrk_path(), "--threads", "1", "--connections", str(concurrency),
           "--duration", f"{max(1, round(duration_s))}s", "--timeout", f"{REQUEST_TIMEOUT_S}s",
           "--script", str(LUA_SCRIPT), target.url, "--",
           str(target.body_dir(workdir)), str(len(target.bodies)), target.expect, *header_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + REQUEST_TIMEOUT_S + 30)
    match = _RESULT.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise LoadGeneratorError(f"wrk failed ({done.returncode}) against {target.url}:\n"
                                 f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    return load_result(concurrency, {k: int(v) for k, v in (pair.split("=") for pair in match.group(1).split())})


def load_result(concurrency: int, fields: dict[str, int]) -> LoadResult:
    """wrk_post.lua's counts as a point. An answer after REQUEST_TIMEOUT_S (wrk counts it as a request
    and as a timeout) is an error, not an image. A point without a good answer has no latency, and the
    requests still waiting at its end are errors too (a hung target)."""
    images = max(0, fields["requests"] - fields["status_errors"] - fields["bad_bodies"] - fields["timeouts"])
    unanswered = 0 if images else max(0, fields["sent"] - fields["requests"] - fields["dropped"])
    errors = (fields["status_errors"] + fields["connect_errors"] + fields["dropped"] + fields["timeouts"]
              + fields["bad_bodies"] + unanswered)
    nan = float("nan")
    return LoadResult(concurrency, images=images, seconds=fields["duration_us"] / 1e6,
                      p50_ms=fields["p50_us"] / 1000 if images else nan,
                      p99_ms=fields["p99_us"] / 1000 if images else nan, errors=errors, unanswered=unanswered)


def exit_on_sigterm() -> None:
    """For a benchmark's main: SIGTERM (`kill PID`, `timeout`) raises SystemExit, as Ctrl-C raises
    KeyboardInterrupt, so that its finally blocks stop the servers it started (a signal to this process
    alone reaches none of them) and remove its temporary folder. A second SIGTERM (GNU timeout signals
    the process, then its group) is ignored, not let to cut that cleanup short."""
    def leave(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


# A freshly started server answers slowly while it warms up (the JVM compiles its hot paths, and
# each load shape has its own; benchmarks/RESULTS.md), so every target gets this much unmeasured
# load at each concurrency of the run before its points are measured.
SERVER_WARMUP_S = 4.0


def warm_up(targets: dict[str, HttpTarget | GrpcTarget], concurrencies: list[int], workdir: Path,
            seconds: float = SERVER_WARMUP_S) -> None:
    """Unmeasured load on every target at each concurrency; none for 0 s (the servers measured cold: wrk's
    shortest point is 1 s)."""
    if seconds <= 0:
        return
    for target in targets.values():
        for concurrency in concurrencies:
            run_load(target, concurrency, seconds, workdir)


def measure_targets(targets: dict[str, HttpTarget | GrpcTarget], concurrencies: list[int], duration_s: float,
                    workdir: Path, warmup_s: float = SERVER_WARMUP_S) -> dict[str, dict[int, LoadResult]]:
    """Warm every target up, then measure each at each concurrency, the targets interleaved at each
    concurrency so that slow drift (other work on the machine) touches them alike."""
    warm_up(targets, concurrencies, workdir, warmup_s)
    rows: dict[str, dict[int, LoadResult]] = {name: {} for name in targets}
    for concurrency in concurrencies:
        for name, target in targets.items():
            rows[name][concurrency] = run_load(target, concurrency, duration_s, workdir)
    return rows


def multipart_image_bodies(payloads: list[bytes], field_name: str = "image",
                           content_type: str = "image/png") -> tuple[list[bytes], str]:
    """Each payload as a multipart/form-data body with one file field, and the Content-Type header
    they share (one fixed boundary, since wrk sends the same headers with every body)."""
    import httpx

    header = "multipart/form-data; boundary=cifar100-benchmark-boundary"
    bodies = [httpx.Request("POST", "http://x/", headers={"Content-Type": header},
                            files={field_name: ("photo.png", payload, content_type)}).read()
              for payload in payloads]
    return bodies, header
