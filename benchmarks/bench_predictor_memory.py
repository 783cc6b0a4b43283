"""KServe's model server under a flood of large bodies: its peak memory with the bound on bodies held
(``--max_body_bytes_held``, handler/kserve_predictor.py) against the same flood with the bound lifted.

    python -m benchmarks.bench_predictor_memory [--clients 64] [--body-mib 11] [--rounds 2]

In KServe's RawDeployment mode nothing in front of the server bounds its connections (Serverless mode's
queue-proxy holds all but containerConcurrency). Each of ``--clients`` threads sends ``--rounds`` v1
bodies of ``--body-mib`` MiB (one image's base64, an image that is not one: refused with 400 once read),
all at once; meanwhile a small CIFAR image is sent every 0.2 s (is anyone else answered?). The server's
resident memory is sampled every 20 ms. Figures printed, nothing asserted.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from benchmarks.bench_serve import cifar_png_payloads, machine
from handler.kserve_predictor import MAX_BODY_BYTES_HELD
from serving import cli
from serving.archive import DEFAULT_WEIGHTS
from serving.kserve import KServePredictor, build_bundle
from serving.settings import MODEL_NAME

UNBOUNDED = 1 << 40  # the bound lifted: what the server did before it had one


def flood(url: str, clients: int, rounds: int, body: bytes, small: bytes) -> tuple[Counter, Counter]:
    """Statuses of the large bodies and of the small requests sent meanwhile."""
    large, small_statuses, done = Counter(), Counter(), threading.Event()

    def send_large(_):
        with httpx.Client(timeout=120) as client:
            for _ in range(rounds):
                try:
                    large[client.post(url, content=body, headers={"content-type": "application/json"}).status_code] += 1
                except httpx.HTTPError as err:
                    large[type(err).__name__] += 1

    def send_small():
        with httpx.Client(timeout=30) as client:
            while not done.wait(0.2):
                try:
                    small_statuses[client.post(url, content=small,
                                               headers={"content-type": "application/json"}).status_code] += 1
                except httpx.HTTPError as err:
                    small_statuses[type(err).__name__] += 1
    watcher = threading.Thread(target=send_small)
    watcher.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send_large, range(clients)))
    done.set()
    watcher.join()
    return large, small_statuses


def peak_rss_during(pid: int, work) -> tuple[float, float, object]:
    """(RSS before, peak RSS during ``work()``) in MB, and its result."""
    process = psutil.Process(pid)
    before = process.memory_info().rss
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.wait(0.02):
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        stop.set()
        sampler.join()
    return before / 1e6, peak[0] / 1e6, result


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_predictor_memory", __doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--body-mib", type=float, default=11.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    raw = os.urandom(int(args.body_mib * 2**20 * 3 / 4) - 64)  # its base64 in a v1 body: ~--body-mib MiB
    body = json.dumps({"instances": [{"data": base64.b64encode(raw).decode()}]}).encode()
    small = json.dumps({"instances": [{"data": base64.b64encode(cifar_png_payloads(1)[0]).decode()}]}).encode()
    print(f"# {machine()}; {args.clients} clients x {args.rounds} bodies of {len(body) / 2**20:.1f} MiB, "
          f"a CIFAR image every 0.2 s beside them")
    print("| --max_body_bytes_held | server RSS before (MB) | peak (MB) | large bodies' statuses | small requests' statuses |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-predictor-memory-") as tmp:
        bundle = build_bundle(args.weights, Path(tmp) / "dist-kserve", quiet=True)
        for held in (MAX_BODY_BYTES_HELD, UNBOUNDED):
            predictor = KServePredictor(Path(tmp) / f"run-{held}", bundle,
                                        extra_args=[f"--max_body_bytes_held={held}"]).start()
            try:
                url = f"{predictor.url}/v1/models/{MODEL_NAME}:predict"
                before, peak, (large, small_statuses) = peak_rss_during(
                    predictor.process.pid, lambda: flood(url, args.clients, args.rounds, body, small))
            finally:
                predictor.stop()
            name = "unbounded" if held == UNBOUNDED else f"{held / 2**20:.0f} MiB"
            print(f"| {name} | {before:.0f} | {peak:.0f} | {dict(sorted(large.items(), key=str))} | "
                  f"{dict(sorted(small_statuses.items(), key=str))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
