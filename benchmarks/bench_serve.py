"""Serving speed: TorchServe against the same model + preprocessing called in-process with batching.

    python -m benchmarks.bench_serve [--duration 8] [--concurrency 1 4 16] [--batch-size 8 --max-batch-delay 5]

For each concurrency it prints images/s and p50/p99 latency of
  * in-process: decode the PNGs, stack a batch of `concurrency` images, normalize, forward, top-k
    (what a perfectly batching server could do at best; its latency is one batch's time);
  * torchserve: real HTTP requests (raw PNG bodies) to a TorchServe started for the run.
and the ratios the project aims at: TorchServe at concurrency 16 >= 80% of in-process images/s;
TorchServe's p50 at concurrency 1 within 5 ms of the in-process single-image latency.

The load generator shares the machine's cores with the server, and so does any other work on
the machine: read the figures as side-by-side ratios of one run, not absolute capacity.

Other columns (e.g. the /classify/ adapter): write an ``async def request(payload: bytes)`` that
raises on a failed answer, and add it to the ``targets`` dict in ``main``; ``run_load`` drives it.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from handler.cifar100_handler import serving_model  # noqa: E402
from handler.preprocessing import decode_image, image_to_tensor, normalize  # noqa: E402
from serving.archive import DEFAULT_WEIGHTS, MODEL_CONFIG, build_archive  # noqa: E402
from serving.torchserve import TorchServeInstance  # noqa: E402

Request = Callable[[bytes], Awaitable[None]]


@dataclass
class LoadResult:
    concurrency: int
    images: int
    seconds: float
    latencies_ms: list[float]
    errors: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run_load(request: Request, payloads: list[bytes], concurrency: int, duration_s: float,
                   warmup_s: float = 1.0) -> LoadResult:
    """Keep `concurrency` requests in flight for duration_s (after a warm-up); time each one."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup_s + duration_s
    measure_from = time.perf_counter() + warmup_s

    async def client(offset: int):
        nonlocal errors
        i = offset
        while (start := time.perf_counter()) < stop_at:
            try:
                await request(payloads[i % len(payloads)])
                if start >= measure_from:
                    latencies.append((time.perf_counter() - start) * 1000)
            except Exception:  # noqa: BLE001 - counted and reported, the run goes on
                errors += 1
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return LoadResult(concurrency, len(latencies), duration_s, latencies, errors)


def in_process_load(model: torch.nn.Module, payloads: list[bytes], batch: int, duration_s: float) -> LoadResult:
    """The same decode + preprocessing + forward + top-k, `batch` images at a time, no server."""
    latencies: list[float] = []
    images = 0
    i = 0
    start_all = time.perf_counter()
    with torch.inference_mode():
        for warm in (True, False):
            stop_at = time.perf_counter() + (1.0 if warm else duration_s)
            if not warm:
                start_all = time.perf_counter()
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                chunk = [payloads[(i + k) % len(payloads)] for k in range(batch)]
                x = normalize(torch.stack([image_to_tensor(decode_image(p)) for p in chunk]))
                torch.topk(torch.softmax(model(x), dim=1), 5, dim=1)
                if not warm:
                    latencies.append((time.perf_counter() - start) * 1000)
                    images += batch
                i += batch
    return LoadResult(batch, images, time.perf_counter() - start_all, latencies)


def start_benchmark_torchserve(root: Path, weights: Path = DEFAULT_WEIGHTS, batch_size: int | None = None,
                               max_batch_delay: int | None = None, cpu_threads: int | None = None,
                               properties: dict[str, str] | None = None,
                               workers: int | None = None) -> TorchServeInstance:
    """A TorchServe on free ports under `root`, optionally with other settings than the repo's:
    batching and the worker's torch threads (model-config.yaml), config.properties keys."""
    config = MODEL_CONFIG
    if batch_size is not None or max_batch_delay is not None or cpu_threads is not None or workers is not None:
        import yaml

        settings = yaml.safe_load(MODEL_CONFIG.read_text())
        settings["batchSize"] = batch_size if batch_size is not None else settings["batchSize"]
        settings["maxBatchDelay"] = max_batch_delay if max_batch_delay is not None else settings["maxBatchDelay"]
        if cpu_threads is not None:
            settings.setdefault("handler", {})["cpu_threads"] = cpu_threads
        if workers is not None:
            settings["minWorkers"] = settings["maxWorkers"] = workers
        config = root / "model-config.yaml"
        config.write_text(yaml.safe_dump(settings))
    build_archive(weights, root / "model_store", quiet=True, model_config=config)
    ts = TorchServeInstance.on_free_ports(root, model_store=root / "model_store", extra_properties=properties or {})
    ts.start()
    try:
        ts.wait_ready(240)
    except Exception:
        ts.stop()
        raise
    return ts


def load_client(max_connections: int) -> aiohttp.ClientSession:
    """The load generator's pooled keep-alive HTTP client.

    aiohttp rather than httpx: the load generator shares the 2 cores with the servers it measures,
    and measured side by side against the same TorchServe at concurrency 16, httpx's AsyncClient
    took ~5.5 ms of CPU per request, aiohttp's ~0.6 ms: with httpx the client alone ate a quarter
    of the machine and the figures measured the client.
    """
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                 timeout=aiohttp.ClientTimeout(total=60))


def torchserve_request(ts: TorchServeInstance, client: aiohttp.ClientSession) -> Request:
    async def request(payload: bytes) -> None:
        async with client.post(ts.predictions_url, data=payload,
                               headers={**ts.key_file.header("inference"), "Content-Type": "image/png"}) as r:
            await r.read()
            r.raise_for_status()
    return request


def cifar_png_payloads(n: int = 256) -> list[bytes]:
    """CIFAR-100 test-split images as PNG bytes (what a client would upload)."""
    import io
    import os

    from PIL import Image

    from training.data import DATA_ENV, load_split

    root = os.environ.get(DATA_ENV) or next(
        (d for d in (str(REPO.parent / "shared" / "data"), str(REPO / "data")) if Path(d, "cifar-100-python").is_dir()),
        "data")
    images, _ = load_split(root, train=False)
    out = []
    for img in images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def print_table(rows: dict[str, dict[int, LoadResult]], concurrencies: list[int]) -> None:
    print(f"{'target':<14}{'conc':>5}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, by_c in rows.items():
        for c in concurrencies:
            r = by_c[c]
            print(f"{name:<14}{c:>5}{r.images_per_s:>10.1f}{r.percentile(50):>9.2f}{r.percentile(99):>9.2f}"
                  f"{r.errors:>8}")


# A freshly started TorchServe answers slowly while the JVM compiles its hot paths, and each load
# shape has its own: measured, conc-1 p50 fell from 23.5 ms in the first seconds to 16.7 ms after
# 10 s of load, and 8 s of concurrency-16 load still left the JIT compiler (the "C2 CompilerThread")
# with half of Java's CPU during the next concurrency-1 run. So every served target gets this much
# unmeasured load at each concurrency of the run before its points are measured.
SERVER_WARMUP_S = 4.0


async def warm_up(request: Request, payloads: list[bytes], concurrencies: list[int],
                  seconds: float = SERVER_WARMUP_S) -> None:
    for concurrency in concurrencies:
        await run_load(request, payloads, concurrency, seconds, warmup_s=0.0)


async def _serve_columns(targets: dict[str, Request], payloads, concurrencies, duration_s):
    for request in targets.values():
        await warm_up(request, payloads, concurrencies)
    return {name: {c: await run_load(req, payloads, c, duration_s) for c in concurrencies}
            for name, req in targets.items()}


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every serving benchmark shares (bench_adapter uses them too)."""
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--batch-size", type=int, help="override model-config.yaml's batchSize")
    parser.add_argument("--max-batch-delay", type=int, help="override model-config.yaml's maxBatchDelay (ms)")
    parser.add_argument("--cpu-threads", type=int, help="override the worker's torch threads (handler.cpu_threads)")
    parser.add_argument("--workers", type=int, help="override model-config.yaml's minWorkers/maxWorkers")
    parser.add_argument("--ts-property", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.properties key for the benchmark's TorchServe (repeatable)")


def ts_properties(pairs: list[str]) -> dict[str, str]:
    """--ts-property KEY=VALUE options as a dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--ts-property wants KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TorchServe vs in-process throughput and latency.")
    add_load_arguments(parser)
    args = parser.parse_args(argv)

    payloads = cifar_png_payloads()
    model = serving_model(torch.load(args.weights, map_location="cpu", weights_only=True))
    print(f"torch threads {torch.get_num_threads()}; weights {args.weights}; {args.duration:.0f} s per point")
    rows = {"in-process": {c: in_process_load(model, payloads, c, args.duration) for c in args.concurrency}}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ts = start_benchmark_torchserve(Path(tmp), args.weights, args.batch_size, args.max_batch_delay,
                                        args.cpu_threads, ts_properties(args.ts_property), args.workers)
        try:
            async def serve():
                async with load_client(max(args.concurrency) * 2) as client:
                    targets: dict[str, Request] = {"torchserve": torchserve_request(ts, client)}
                    return await _serve_columns(targets, payloads, args.concurrency, args.duration)
            rows.update(asyncio.run(serve()))
        finally:
            ts.stop()
    print_table(rows, args.concurrency)
    base, served = rows["in-process"], rows["torchserve"]
    hi, lo = max(args.concurrency), min(args.concurrency)
    print(f"torchserve / in-process images/s at concurrency {hi}: "
          f"{served[hi].images_per_s / base[hi].images_per_s:.2f} (target >= 0.80)")
    print(f"torchserve p50 - in-process p50 at concurrency {lo}: "
          f"{served[lo].percentile(50) - base[lo].percentile(50):+.2f} ms (target <= 5 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
