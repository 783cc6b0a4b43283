"""Phone photos through `POST /classify/`: shrunk where they enter (the adapter's default) against
today's path (SHRINK_UPLOADS=0: the whole file crosses adapter -> Java -> worker).

    python -m benchmarks.bench_photos [--duration 8] [--concurrency 1 4] [--weights PATH] [--running-torchserve]

One run starts a TorchServe (this checkout's archive; --running-torchserve: the one already running on this
machine where the adapter's settings point, as bench_serve) and two adapters in front of it, one with
shrinking and one without, and drives each with 12 MP JPEGs (4032x3024 photo-like pictures at
quality 95, ~4.3 MB each, like a phone's) through wrk, the points interleaved; a third row sends
what the page uploads for the same photos (shrunk in the browser: ~30 KB). Besides
photos/s and p50/p99 it reads each process's own CPU counters (psutil: the adapter, TorchServe's
Java, its workers; wrk's from this process's children) around each point and prints the CPU per
photo. Targets: at least 60 photos/s at concurrency 4 on 2 cores, and at most 35 ms of CPU per photo
over all processes. The load generator and any other work share the cores: read the figures as a
side-by-side comparison of one run.
"""
from __future__ import annotations

import io
import resource
import sys
import tempfile
from pathlib import Path

import psutil

from adapter.run import running_adapter
from benchmarks.bench_decode import photo_like
from benchmarks.bench_serve import (add_load_arguments, add_running_torchserve_argument, machine,
                                    refuse_settings_with_running_torchserve, torchserve_from_arguments)
from benchmarks.load import HttpTarget, exit_on_sigterm, multipart_image_bodies, print_failures, run_wrk, warm_up
from serving import cli

PHOTO_SIZE = (4032, 3024)
WARMUP_S = 3.0


def phone_photos(count: int = 2) -> list[bytes]:
    out = []
    for seed in range(count):
        buf = io.BytesIO()
        photo_like(*PHOTO_SIZE, seed=seed).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def as_the_page_sends(photo: bytes) -> bytes:
    """What the page uploads for a photo (frontend/app.js): its shorter side at DECODE_MIN_SIDE, JPEG
    at the page's quality; resized here by Pillow, near what the browser's canvas makes."""
    from PIL import Image

    from serving.images import DECODE_MIN_SIDE, PAGE_JPEG_QUALITY

    img = Image.open(io.BytesIO(photo))
    scale = DECODE_MIN_SIDE / min(img.size)
    small = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=round(PAGE_JPEG_QUALITY * 100))
    return buf.getvalue()


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:  # a worker restarted: its time is lost, the row says so by being low
            pass
    return total


def wrk_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(target: HttpTarget, concurrency: int, duration_s: float, workdir: Path,
            groups: dict[str, list[psutil.Process]]) -> dict:
    before = {name: cpu_seconds(procs) for name, procs in groups.items()}
    wrk_before = wrk_cpu_seconds()
    result = run_wrk(target, concurrency, duration_s, workdir)
    photos = max(result.images, 1)
    cpu = {name: (cpu_seconds(procs) - before[name]) * 1000 / photos for name, procs in groups.items()}
    cpu["wrk"] = (wrk_cpu_seconds() - wrk_before) * 1000 / photos
    return {"result": result, "cpu_ms": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_photos", __doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.set_defaults(warmup=WARMUP_S, concurrency=[1, 4])
    add_running_torchserve_argument(parser, "on this machine: its Java's CPU is read; the options that set a started "
                                    "one's are refused")
    args = parser.parse_args(argv)
    refuse_settings_with_running_torchserve(parser, args)

    photos = phone_photos()
    bodies, content_type = multipart_image_bodies(photos, "image", "image/jpeg")
    page_bodies, _ = multipart_image_bodies([as_the_page_sends(p) for p in photos], "image", "image/jpeg")
    rows: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        tmp = Path(tmp)
        ts = torchserve_from_arguments(tmp / "torchserve", args)
        try:
            java_pid = ts.java_pid()
            if java_pid is None:
                raise SystemExit(f"no TorchServe listens at {ts.inference_url} on this machine: its CPU is measured")
            env = ts.adapter_env()
            with running_adapter(env, tmp / "shrinking.log") as shrinking, \
                    running_adapter({**env, "SHRINK_UPLOADS": "0"}, tmp / "whole.log") as whole:
                java = psutil.Process(java_pid)
                targets = {"whole file (SHRINK_UPLOADS=0)": (whole, bodies),
                           "shrunk in the adapter": (shrinking, bodies),
                           "shrunk by the page": (shrinking, page_bodies)}
                for name, (adapter, sent) in targets.items():
                    target = HttpTarget(f"{adapter.base_url}/classify/", sent, expect='"prediction"',
                                        headers=lambda: {"Content-Type": content_type})
                    targets[name] = (target, psutil.Process(adapter.process.pid))
                warm_up({name: target for name, (target, _) in targets.items()}, args.concurrency, tmp, args.warmup)
                for concurrency in args.concurrency:
                    for name, (target, adapter_process) in targets.items():
                        workers = java.children(recursive=True)
                        groups = {"adapter": [adapter_process], "java": [java], "workers": workers}
                        rows.setdefault(name, {})[concurrency] = measure(target, concurrency, args.duration, tmp, groups)
        finally:
            ts.stop()

    print(f"12 MP JPEG photos ({len(photos)}, {sum(map(len, photos)) / len(photos) / 1e6:.1f} MB each) through "
          f"/classify/ on {machine()}; {args.duration:g} s per point")
    print(f"{'path':<30} {'conc':>4} {'photos/s':>9} {'p50 ms':>8} {'p99 ms':>8}   CPU ms per photo: "
          f"{'adapter':>7} {'java':>6} {'workers':>7} {'wrk':>5} {'total':>6}")
    for name, by_concurrency in rows.items():
        for concurrency, row in by_concurrency.items():
            r, cpu = row["result"], row["cpu_ms"]
            print(f"{name:<30} {concurrency:>4} {r.images_per_s:>9.1f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f}   "
                  f"{'':>17}{cpu['adapter']:>7.1f} {cpu['java']:>6.1f} {cpu['workers']:>7.1f} {cpu['wrk']:>5.1f} "
                  f"{sum(cpu.values()):>6.1f}" + (f"  ({r.errors} errors)" if r.errors else ""))
    print_failures({name: [row["result"] for row in by_concurrency.values()] for name, by_concurrency in rows.items()})
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
