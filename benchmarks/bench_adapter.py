"""`POST /classify/` through the adapter, beside TorchServe called directly and the seed-style server.

    python -m benchmarks.bench_adapter [--duration 8] [--concurrency 1 4 16] [--weights PATH]

One run starts, on free loopback ports, a TorchServe (this checkout's archive of --weights), the
adapter in front of it (a real uvicorn process) and benchmarks/seed_server.py (the seed's design:
the model in-process, one image per forward pass in the request handler, same weights), then
drives each with the same CIFAR-100 test PNGs at each concurrency and prints images/s and
p50/p99 latency, and the two targets:
  * adapter p50 - direct TorchServe p50 at concurrency 1 < 3 ms (what the adapter costs);
  * adapter images/s at concurrency 16 >= 2x the seed-style server's.
The load generator (wrk, see benchmarks/load.py) and any other work share the machine's cores with
the servers: read the figures as ratios measured side by side in one run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from adapter.run import running_adapter
from benchmarks.bench_serve import (
    add_load_arguments, cifar_png_payloads, machine, print_table, served_engine_name, start_benchmark_torchserve,
    torchserve_target, ts_properties)
from benchmarks.load import HttpTarget, measure_targets, multipart_image_bodies
from serving.process import free_port, popen_exited, stop_popen, wait_until_ready

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


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1.0)
        return True
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The /classify/ adapter vs direct TorchServe vs the seed-style server.")
    add_load_arguments(parser)
    args = parser.parse_args(argv)

    payloads = cifar_png_payloads()
    concurrencies = args.concurrency
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        tmp = Path(tmp)
        ts = start_benchmark_torchserve(tmp / "torchserve", args.weights, args.batch_size, args.max_batch_delay,
                                        args.cpu_threads, ts_properties(args.ts_property), args.workers, args.engine)
        try:
            engine = served_engine_name(ts, payloads[0])
            # The adapter as `make serve-adapter` runs it, access log included.
            adapter_env = {"TS_INFERENCE_URL": ts.inference_url, "TS_MANAGEMENT_URL": ts.management_url,
                           "TS_MODEL_NAME": ts.model_name, "TS_KEY_FILE": str(ts.key_file.path)}
            with running_adapter(adapter_env, tmp / "adapter.log") as adapter, \
                    seed_server(args.weights, tmp / "seed.log") as seed_base:
                targets = {
                    "torchserve": torchserve_target(ts, payloads),
                    "adapter": classify_target(adapter.base_url, payloads),
                    "seed-style": classify_target(seed_base, payloads),
                }
                rows = measure_targets(targets, concurrencies, args.duration, tmp)
        finally:
            ts.stop()

    print(f"/classify/ benchmark on {machine()}: weights {args.weights}; {args.duration:g} s per point; "
          f"{len(payloads)} CIFAR-100 test PNGs")
    print(f"engine: {engine} (handler.engine)")
    print_table(rows, concurrencies)
    lo, hi = min(concurrencies), max(concurrencies)
    overhead = rows["adapter"][lo].p50_ms - rows["torchserve"][lo].p50_ms
    ratio = rows["adapter"][hi].images_per_s / max(rows["seed-style"][hi].images_per_s, 1e-9)
    print(f"adapter p50 - torchserve p50 at concurrency {lo}: {overhead:+.2f} ms (target < 3 ms)")
    print(f"adapter / seed-style images/s at concurrency {hi}: {ratio:.2f}x (target >= 4x)")
    print(f"adapter p50 / seed-style p50 at concurrency {lo}: "
          f"{rows['adapter'][lo].p50_ms:.2f} / {rows['seed-style'][lo].p50_ms:.2f} ms (target: no higher)")
    failed = sum(r.errors for by_c in rows.values() for r in by_c.values())
    if failed:
        print(f"{failed} requests failed during the run (counted in the errors column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
