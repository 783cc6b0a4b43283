"""Serving speed: TorchServe against the same model + preprocessing called in-process with batching.

    python -m benchmarks.bench_serve [--duration 8] [--concurrency 1 4 16] [--batch-size 8 --max-batch-delay 5]
                                     [--running-torchserve]

For each concurrency it prints images/s and p50/p99 latency of
  * in-process: decode the PNGs, stack a batch of `concurrency` images, normalize, forward, top-k
    (what a perfectly batching server could do at best; its latency is one batch's time);
  * torchserve: real HTTP requests (raw PNG bodies) to a TorchServe started for the run (this
    checkout's archive, free loopback ports; --running-torchserve: the one already running where the
    adapter's settings point, by default `make serve`'s, with its own settings), sent by wrk
    (benchmarks/load.py says why wrk).
and the ratios the project aims at: TorchServe at concurrency 16 >= 80% of in-process images/s;
TorchServe's p50 at concurrency 1 within 5 ms of the in-process single-image latency.

The load generator shares the machine's cores with the server, and so does any other work on
the machine: read the figures as side-by-side ratios of one run, not absolute capacity.

Other columns (e.g. the /classify/ adapter): describe them as a load.HttpTarget and add them to the
targets that load.measure_targets drives (bench_adapter does).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.load import (SERVER_WARMUP_S, HttpTarget, LoadResult, exit_on_sigterm, percentile, print_failures,
                             ratio, run_wrk, warm_up)
from handler.preprocessing import decode_image, image_to_tensor, normalize
from model.shipped import SHIPPED_WEIGHTS
from serving.archive import build_archive
from serving.keys import KeyFile
from serving import cli
from serving.settings import ENGINE_CACHE_ENV, MODEL_CONFIG, read_model_config
from serving.torchserve import DEFAULT_ENGINE_CACHE, TorchServeInstance
from training.engines import in_process_engine


def in_process_load(model, payloads: list[bytes], batch: int, duration_s: float) -> LoadResult:
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
    return LoadResult(batch, images, time.perf_counter() - start_all, percentile(latencies, 50),
                      percentile(latencies, 99))


ENGINE_CACHE = os.environ.get(ENGINE_CACHE_ENV) or DEFAULT_ENGINE_CACHE


def benchmark_model_config(root: Path, batch_size: int | None = None, max_batch_delay: int | None = None,
                           cpu_threads: int | None = None, workers: int | None = None, engine: str | None = None,
                           flip_tta: bool | None = None, lone_image_threads: int | None = None) -> Path:
    """handler/model-config.yaml, or a copy under `root` with these settings in place of its own
    (batching, workers, the worker's engine and torch threads)."""
    if all(v is None for v in (batch_size, max_batch_delay, cpu_threads, workers, engine, flip_tta,
                               lone_image_threads)):
        return MODEL_CONFIG
    import yaml

    settings = read_model_config()
    settings["batchSize"] = batch_size if batch_size is not None else settings["batchSize"]
    settings["maxBatchDelay"] = max_batch_delay if max_batch_delay is not None else settings["maxBatchDelay"]
    if cpu_threads is not None:
        settings.setdefault("handler", {})["cpu_threads"] = cpu_threads
    if workers is not None:
        settings["minWorkers"] = settings["maxWorkers"] = workers
    if engine is not None:
        settings.setdefault("handler", {})["engine"] = engine
    if flip_tta is not None:
        settings.setdefault("handler", {})["flip_tta"] = flip_tta
    if lone_image_threads is not None:
        settings.setdefault("handler", {})["lone_image_threads"] = lone_image_threads
    config = root / "model-config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(settings))
    return config


def start_benchmark_torchserve(root: Path, weights: Path = SHIPPED_WEIGHTS, batch_size: int | None = None,
                               max_batch_delay: int | None = None, cpu_threads: int | None = None,
                               properties: dict[str, str] | None = None,
                               workers: int | None = None, engine: str | None = None,
                               flip_tta: bool | None = None,
                               lone_image_threads: int | None = None) -> TorchServeInstance:
    """A TorchServe on free ports under `root`, optionally with other settings than the repo's:
    model-config.yaml's (benchmark_model_config), config.properties keys."""
    config = benchmark_model_config(root, batch_size, max_batch_delay, cpu_threads, workers, engine, flip_tta,
                                    lone_image_threads)
    build_archive(weights, root / "model_store", quiet=True, model_config=config)
    ts = TorchServeInstance.on_free_ports(root, model_store=root / "model_store", extra_properties=properties or {})
    started = time.perf_counter()
    try:
        ts.start()
        ts.wait_ready(600)  # the first start on a machine compiles the engine
    except BaseException:  # Ctrl-C or SIGTERM (exit_on_sigterm) during the start too: Java is not left behind
        ts.stop()
        raise
    print(f"TorchServe READY {time.perf_counter() - started:.1f} s after its start (engine cache: {ENGINE_CACHE})")
    return ts


class RunningTorchServe:
    """The TorchServe already running where the adapter's settings point (adapter/config.py: TS_INFERENCE_URL,
    TS_MANAGEMENT_URL, TS_MODEL_NAME, TS_KEY_FILE; by default `make serve`'s): what --running-torchserve measures,
    in the place of a started TorchServeInstance (what the benchmarks use of one). Neither started nor stopped here."""

    def __init__(self) -> None:
        from adapter.config import Settings

        settings = Settings.from_env()
        self.inference_url, self.management_url = settings.inference_url, settings.management_url
        self.model_name = settings.model_name
        self.key_file = KeyFile(settings.key_file)

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model_name}"

    def adapter_env(self) -> dict[str, str]:
        """Nothing: an adapter started beside it reads the same settings from the environment."""
        return {}

    def java_pid(self) -> int | None:
        """The process listening on its inference port on this machine (TorchServe's Java), or None."""
        import psutil
        from urllib.parse import urlsplit

        port = urlsplit(self.inference_url).port
        return next((c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid), None)

    def stop(self) -> None:
        """Leaves it running: it is not the benchmark's."""


def add_running_torchserve_argument(parser: argparse.ArgumentParser, note: str) -> None:
    """--running-torchserve (RunningTorchServe), the same in each benchmark that has it; `note`, in parentheses at
    the end of its help: what becomes of the options that shape the TorchServe the benchmark would start."""
    parser.add_argument("--running-torchserve", action="store_true",
                        help="measure the TorchServe already running where the adapter's settings point "
                        "(TS_INFERENCE_URL, TS_KEY_FILE, ...; by default make serve's) instead of starting one "
                        f"({note})")


def refuse_settings_with_running_torchserve(parser: argparse.ArgumentParser, args: argparse.Namespace,
                                            own_options: dict[str, str] | None = None) -> None:
    """--running-torchserve with any of TORCHSERVE_SETTING_OPTIONS or the benchmark's ``own_options`` (option -> its
    args name) given: a usage error, as they would shape only a TorchServe the benchmark starts."""
    options = {**TORCHSERVE_SETTING_OPTIONS, **(own_options or {})}
    given = [option for option, name in options.items() if getattr(args, name) not in (None, [])]
    if args.running_torchserve and given:
        parser.error(f"--running-torchserve measures that TorchServe with its own settings: {', '.join(given)} "
                     "would not reach it")


def model_config_from_arguments(root: Path, args: argparse.Namespace) -> Path:
    """benchmark_model_config with add_load_arguments' model-config.yaml settings (and bench_adapter's --flip-tta)."""
    flip_tta = getattr(args, "flip_tta", None)
    return benchmark_model_config(root, args.batch_size, args.max_batch_delay, args.cpu_threads, args.workers,
                                  args.engine, None if flip_tta is None else flip_tta == "on", args.lone_image_threads)


def torchserve_from_arguments(root: Path, args: argparse.Namespace) -> TorchServeInstance | RunningTorchServe:
    """start_benchmark_torchserve with every TorchServe setting of add_load_arguments (and bench_adapter's
    --flip-tta): one place, so that no benchmark quietly ignores one of them; with --running-torchserve (refused
    beside those settings: refuse_settings_with_running_torchserve) the one running instead, started by nobody here."""
    if getattr(args, "running_torchserve", False):
        ts = RunningTorchServe()
        print(f"TorchServe: the one running at {ts.inference_url}, with its own settings")
        return ts
    flip_tta = getattr(args, "flip_tta", None)
    return start_benchmark_torchserve(root, args.weights, args.batch_size, args.max_batch_delay, args.cpu_threads,
                                      ts_properties(args.ts_property), args.workers, args.engine,
                                      None if flip_tta is None else flip_tta == "on",
                                      lone_image_threads=args.lone_image_threads)


def torchserve_target(ts: TorchServeInstance | RunningTorchServe, payloads: list[bytes]) -> HttpTarget:
    """Raw PNG bodies to the predictions API, with the current inference key."""
    return HttpTarget(ts.predictions_url, payloads, expect='"prediction"',
                      headers=lambda: {**ts.key_file.header("inference"), "Content-Type": "image/png"})


def served_engine_name(ts: TorchServeInstance | RunningTorchServe, payload: bytes) -> str:
    """The forward pass TorchServe's workers chose (each answer names it: handler/engine.py)."""
    import httpx

    r = httpx.post(ts.predictions_url, content=payload, timeout=60,
                   headers={**ts.key_file.header("inference"), "Content-Type": "image/png"})
    r.raise_for_status()
    return r.json()["engine"]


def cifar_png_payloads(n: int = 256) -> list[bytes]:
    """CIFAR-100 test-split images as PNG bytes (what a client would upload)."""
    import io

    from PIL import Image

    from training.data import default_data_dir, load_split

    images, _ = load_split(default_data_dir(), train=False)
    out = []
    for img in images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def machine() -> str:
    """The CPU the figures were measured on (they differ several-fold between CPUs)."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores{gpu}"


def print_table(rows: dict[str, dict[int, LoadResult]], concurrencies: list[int]) -> None:
    print(f"{'target':<14}{'conc':>5}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, by_c in rows.items():
        for c in concurrencies:
            r = by_c[c]
            print(f"{name:<14}{c:>5}{r.images_per_s:>10.1f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
                  f"{r.errors:>8}")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every serving benchmark shares (bench_adapter uses them too)."""
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=SERVER_WARMUP_S,
                        help="seconds of unmeasured load per target and concurrency before the measured points "
                        "(0: none, the servers measured cold)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--batch-size", type=int, help="override model-config.yaml's batchSize")
    parser.add_argument("--max-batch-delay", type=int, help="override model-config.yaml's maxBatchDelay (ms)")
    parser.add_argument("--cpu-threads", type=int, help="override the worker's torch threads (handler.cpu_threads)")
    parser.add_argument("--workers", type=int, help="override model-config.yaml's minWorkers/maxWorkers")
    parser.add_argument("--engine", help="override model-config.yaml's handler.engine (handler/engine.py)")
    parser.add_argument("--lone-image-threads", type=int,
                        help="override the threads a one-image forward pass may use (handler.lone_image_threads)")
    parser.add_argument("--ts-property", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.properties key for the benchmark's TorchServe (repeatable)")


# add_load_arguments' options that shape the TorchServe started for the run (torchserve_from_arguments), by attribute.
TORCHSERVE_SETTING_OPTIONS = {"--batch-size": "batch_size", "--max-batch-delay": "max_batch_delay",
                              "--cpu-threads": "cpu_threads", "--workers": "workers", "--engine": "engine",
                              "--lone-image-threads": "lone_image_threads", "--ts-property": "ts_property"}


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
    parser = cli.Parser("benchmarks.bench_serve", "TorchServe vs in-process throughput and latency.")
    add_load_arguments(parser)
    add_running_torchserve_argument(parser, "with its own settings: the options that set a started one's are "
                                    "refused; --weights: the in-process column's only")
    args = parser.parse_args(argv)
    refuse_settings_with_running_torchserve(parser, args)

    payloads = cifar_png_payloads()
    print(f"{machine()}; torch threads {torch.get_num_threads()}; weights {args.weights}; {args.duration:.0f} s per point")
    rows: dict[str, dict[int, LoadResult]] = {"in-process": {}, "torchserve": {}}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ts = torchserve_from_arguments(Path(tmp), args)
        try:
            engine = served_engine_name(ts, payloads[0])
            # In-process runs the engine the workers serve, built from the same cache (the same code).
            model = in_process_engine(args.weights, engine)
            print(f"engine: {engine} (handler.engine in model-config.yaml; TorchServe and in-process alike)")
            targets = {"torchserve": torchserve_target(ts, payloads)}
            warm_up(targets, args.concurrency, Path(tmp), args.warmup)
            # Each concurrency's two points back to back (TorchServe idles meanwhile): the machine is
            # shared, and its speed was seen to drift by 10% within minutes, which a ratio of points
            # measured minutes apart would carry.
            for c in args.concurrency:
                rows["in-process"][c] = in_process_load(model, payloads, c, args.duration)
                rows["torchserve"][c] = run_wrk(targets["torchserve"], c, args.duration, Path(tmp))
        finally:
            ts.stop()
    print_table(rows, args.concurrency)
    base, served = rows["in-process"], rows["torchserve"]
    hi, lo = max(args.concurrency), min(args.concurrency)
    print(f"torchserve / in-process images/s at concurrency {hi}: "
          f"{ratio(served[hi].images_per_s, base[hi].images_per_s):.2f} (target >= 0.80)")
    print(f"torchserve p50 - in-process p50 at concurrency {lo}: "
          f"{served[lo].p50_ms - base[lo].p50_ms:+.2f} ms (target <= 5 ms)")
    print_failures({"torchserve": list(served.values())})
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
