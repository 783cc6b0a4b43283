"""`POST /classify/` through the adapter, beside TorchServe called directly and the seed-style server.

    python -m benchmarks.bench_adapter [--duration 8] [--concurrency 1 4 16] [--weights PATH] [--running-torchserve]

One run starts, on free loopback ports, a TorchServe (this checkout's archive of --weights; --running-torchserve:
the one already running where the adapter's settings point, as bench_serve), the adapter in front of it (a real uvicorn process) and benchmarks/seed_server.py (the seed's design:
the model in-process, one image per forward pass in the request handler, same weights), then
drives each with the same CIFAR-100 test PNGs at each concurrency and prints images/s and
p50/p99 latency, and the targets:
  * adapter p50 - direct TorchServe p50 at concurrency 1 < 3 ms (what the adapter costs);
  * adapter images/s at concurrency 16 >= 4x the seed-style server's (issue 19), p50 at 1 no higher.
The Open Inference Protocol path without TorchServe (``make serve-kserve``) is measured beside them
(``--no-kserve`` leaves it out): KServe's own model server on the KServe bundle of the same weights
(handler/kserve_predictor.py, the bundle's default model-config.yaml: the overrides below are
TorchServe's), v2 bodies sent to it directly ("predictor"), and `/classify/` through an adapter in
OIP mode in front of it ("adapter-oip").
The load generator (wrk, see benchmarks/load.py) and any other work share the machine's cores with
the servers: read the figures as ratios measured side by side in one run.

    python -m benchmarks.bench_adapter --before REF [--rounds 3] [--duration 4] [--concurrency 1 16]

compares instead this checkout's adapter with the adapter of git REF (its adapter/, serving/, model/,
frontend/ and handler/model-config.yaml unpacked into a temporary folder), both in front of the same TorchServe, alternating
them point by point for --rounds rounds: images/s, p50 and the adapter process's CPU time per
request (what each request costs the adapter itself).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import httpx

from adapter.run import running_adapter
from benchmarks.bench_serve import (
    add_load_arguments, add_running_torchserve_argument, cifar_png_payloads, machine, print_table,
    refuse_settings_with_running_torchserve, served_engine_name, torchserve_from_arguments, torchserve_target)
from benchmarks.bench_kserve import v2_bodies
from benchmarks.load import (HttpTarget, LoadResult, exit_on_sigterm, measure_targets, multipart_image_bodies,
                             print_failures, ratio)
from benchmarks.side_by_side import side_by_side
from serving.kserve import KServePredictor, build_bundle
from serving.process import free_port, popen_exited, stop_popen, wait_until_ready
from serving import cli
from serving.settings import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]
SEED_START_TIMEOUT_S = 120


def classify_target(base_url: str, payloads: list[bytes]) -> HttpTarget:
    """The seed's client call: multipart field `image`; a non-200 or an answer without "prediction"
    counts as an error."""
    bodies, content_type = multipart_image_bodies(payloads, "image")
    return HttpTarget(f"{base_url}/classify/", bodies, headers=lambda: {"Content-Type": content_type},
                      expect='"prediction"')


@contextmanager
def seed_server(weights: Path, log_file: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "SEED_WEIGHTS": str(weights)}
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.seed_server:app", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(lambda: _answers(f"{base}/docs"), SEED_START_TIMEOUT_S, "The seed server",
                         logs=[log_file], exited=popen_exited(process), interval=0.3)
        yield base
    finally:
        stop_popen(process)


@contextmanager
def torchserve_and_adapter(root: Path, args) -> Iterator[tuple]:
    """A TorchServe with the benchmark's settings (or the running one: --running-torchserve) and the adapter in front
    of it, as `make serve-adapter` runs it (access log included): (its TorchServeInstance, the adapter)."""
    ts = torchserve_from_arguments(root / "torchserve", args)
    try:
        with running_adapter(ts.adapter_env(), root / "adapter.log") as adapter:
            yield ts, adapter
    finally:
        ts.stop()


@contextmanager
def kserve_path(weights: Path, payloads: list[bytes], root: Path) -> Iterator[dict[str, HttpTarget]]:
    """KServe's own model server on the bundle of ``weights`` and an adapter in OIP mode in front of it
    (``make serve-kserve``'s path): their targets, "predictor" (v2 bodies) and "adapter-oip"."""
    predictor = KServePredictor(root / "predictor", build_bundle(weights, root / "dist-kserve", quiet=True))
    try:
        predictor.start(600)  # the first start on a machine builds the engine
        env = {"OIP_URL": predictor.url, "TS_KEY_FILE": str(root / "no-key-file.json")}
        with running_adapter(env, root / "adapter-oip.log") as adapter:
            yield {"predictor": HttpTarget(f"{predictor.url}/v2/models/{MODEL_NAME}/infer", v2_bodies(payloads),
                                           expect='"outputs"', headers=lambda: {"Content-Type": "application/json"}),
                   "adapter-oip": classify_target(adapter.base_url, payloads)}
    finally:
        predictor.stop()


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1.0)
        return True
    except httpx.HTTPError:
        return False


@contextmanager
def adapter_at_ref(ref: str, settings_env: dict[str, str], root: Path) -> Iterator[tuple[str, int]]:
    """The adapter of git ``ref`` on a free port: (base URL, pid)."""
    code = root / f"adapter-{ref}"
    code.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "adapter", "serving", "model", "handler/model-config.yaml",
                              "frontend"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    port, log_file = free_port(), root / f"adapter-{ref}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(root / f"adapter-{ref}.stderr.log", "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "adapter.run", "serve", "--host", "127.0.0.1", "--port",
                                    str(port), "--log-file", str(log_file)], cwd=code, env={**env, **settings_env},
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(lambda: _answers(f"{base}/health"), SEED_START_TIMEOUT_S, f"The adapter of {ref}",
                         logs=[log_file], exited=popen_exited(process), interval=0.3)
        yield base, process.pid
    finally:
        stop_popen(process)


def compare_before_after(args) -> int:
    """This checkout's adapter against git ``args.before``'s, alternated, with CPU per request."""
    import psutil

    from benchmarks.load import run_wrk, warm_up

    payloads = cifar_png_payloads()
    with tempfile.TemporaryDirectory(prefix="bench-adapter-before-after-") as tmp:
        tmp = Path(tmp)
        ts = torchserve_from_arguments(tmp / "torchserve", args)
        try:
            env = ts.adapter_env()
            with adapter_at_ref(args.before, env, tmp) as (old_base, old_pid), \
                    running_adapter(env, tmp / "adapter.log") as new:
                names = {f"before ({args.before})": (old_base, old_pid), "after (this checkout)": (new.base_url, new.process.pid)}
                targets = {name: classify_target(base, payloads) for name, (base, _) in names.items()}
                warm_up(targets, args.concurrency, tmp, args.warmup)
                points = {name: {c: [] for c in args.concurrency} for name in names}
                for round_ in range(args.rounds):
                    for c in args.concurrency:
                        order = list(names) if round_ % 2 == 0 else list(reversed(names))
                        for name in order:
                            process = psutil.Process(names[name][1])
                            cpu = process.cpu_times()
                            result = run_wrk(targets[name], c, args.duration, tmp)
                            after = process.cpu_times()
                            spent = (after.user + after.system) - (cpu.user + cpu.system)
                            points[name][c].append((result, spent / max(1, result.images + result.errors)))
        finally:
            ts.stop()
    print(f"adapter before/after on {machine()}: {args.rounds} rounds x {args.duration:g} s per point, alternated")
    print(f"{'adapter (medians)':<28}{'conc':>5}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}")
    medians = {}
    for name in points:
        for c, runs in points[name].items():
            ips = sorted(r.images_per_s for r, _ in runs)[len(runs) // 2]
            p50 = sorted(r.p50_ms for r, _ in runs)[len(runs) // 2]
            p99 = sorted(r.p99_ms for r, _ in runs)[len(runs) // 2]
            cpu_us = sorted(cpu for _, cpu in runs)[len(runs) // 2] * 1e6
            medians[name, c] = (ips, p50, cpu_us)
            print(f"{name:<28}{c:>5}{ips:>10.0f}{p50:>9.2f}{p99:>9.2f}{cpu_us:>12.0f}"
                  f"{sum(r.errors for r, _ in runs):>8}   CPU us/req by round: {[round(cpu * 1e6) for _, cpu in runs]}")
    old, new = list(points)
    for c in args.concurrency:
        (ips0, p500, cpu0), (ips1, p501, cpu1) = medians[old, c], medians[new, c]
        print(f"concurrency {c}: after/before images/s {ratio(ips1, ips0):.3f}, p50 {p501 - p500:+.2f} ms, "
              f"adapter CPU per request {cpu1 - cpu0:+.0f} us ({ratio(cpu1, cpu0):.3f}x)")
    print_failures({name: [r for runs in by_c.values() for r, _ in runs] for name, by_c in points.items()})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_adapter", "The /classify/ adapter vs direct TorchServe vs the seed-style server.")
    add_load_arguments(parser)
    parser.add_argument("--before", metavar="REF", help="compare with the adapter of this git ref instead")
    parser.add_argument("--rounds", type=int, default=3, help="--before: alternated rounds per point (medians)")
    parser.add_argument("--flip-tta", choices=["on", "off"], help="override model-config.yaml's handler.flip_tta")
    parser.add_argument("--no-kserve", dest="kserve", action="store_false",
                        help="leave out KServe's own model server and the adapter in OIP mode in front of it")
    add_running_torchserve_argument(parser, "with its own settings: the options that set a started one's are "
                                    "refused, --before too; --weights: the other servers'")
    args = parser.parse_args(argv)
    refuse_settings_with_running_torchserve(parser, args, {"--flip-tta": "flip_tta", "--before": "before"})
    if args.before:
        return compare_before_after(args)

    payloads = cifar_png_payloads()
    concurrencies = args.concurrency
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        tmp = Path(tmp)
        with side_by_side(torchserve_and_adapter(tmp, args), seed_server(args.weights, tmp / "seed.log"),
                          kserve_path(args.weights, payloads, tmp) if args.kserve else nullcontext({})) as (
                (ts, adapter), seed_base, oip_targets):
            engine = served_engine_name(ts, payloads[0])
            targets = {
                "torchserve": torchserve_target(ts, payloads),
                "adapter": classify_target(adapter.base_url, payloads),
                "seed-style": classify_target(seed_base, payloads),
                **oip_targets,
            }
            rows = measure_targets(targets, concurrencies, args.duration, tmp, args.warmup)

    print(f"/classify/ benchmark on {machine()}: weights {args.weights}; {args.duration:g} s per point; "
          f"{len(payloads)} CIFAR-100 test PNGs")
    print(f"engine: {engine} (handler.engine); flip TTA: {args.flip_tta or 'as model-config.yaml says'}")
    print_table(rows, concurrencies)
    for line in target_lines(rows, min(concurrencies), max(concurrencies)):
        print(line)
    print_failures({name: list(by_c.values()) for name, by_c in rows.items()})
    return 0


def target_lines(rows: dict[str, dict[int, LoadResult]], lo: int, hi: int) -> list[str]:
    """The targets' lines: nan where a point they compare got no good answer (load.print_failures names it)."""
    seed, adapter = rows["seed-style"], rows["adapter"]
    lines = [f"adapter p50 - torchserve p50 at concurrency {lo}: "
             f"{adapter[lo].p50_ms - rows['torchserve'][lo].p50_ms:+.2f} ms (target < 3 ms)",
             f"adapter / seed-style images/s at concurrency {hi}: "
             f"{ratio(adapter[hi].images_per_s, seed[hi].images_per_s):.2f}x (target >= 4x)",
             f"adapter p50 / seed-style p50 at concurrency {lo}: "
             f"{adapter[lo].p50_ms:.2f} / {seed[lo].p50_ms:.2f} ms (target: no higher)"]
    if "adapter-oip" in rows:
        oip = rows["adapter-oip"]
        lines.append(f"without TorchServe: adapter-oip / seed-style images/s at concurrency {hi}: "
                     f"{ratio(oip[hi].images_per_s, seed[hi].images_per_s):.2f}x; "
                     f"adapter-oip p50 / seed-style p50 at concurrency {lo}: "
                     f"{oip[lo].p50_ms:.2f} / {seed[lo].p50_ms:.2f} ms")
    return lines


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
