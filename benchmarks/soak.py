"""The long runs against hostile and heavy clients (`make soak`), with the figures they produce.

    python -m benchmarks.soak [--requests 20000] [--concurrency 32] [--slow-seconds 150]
                              [--idle 1000] [--big 64] [--weights PATH]

One run starts, on free loopback ports, a TorchServe (this checkout's archive and config.properties,
so Java runs under its -Xmx) and the adapter in front of it (default settings), then:
  1. big uploads: --big concurrent 9.9 MB uploads to /classify/ (a real JPEG padded after its end
     marker); prints each status count and the peak and idle RSS of the adapter, Java and the
     workers (sampled every 20 ms);
  2. soak: --requests CIFAR-100 test PNGs at --concurrency; prints statuses, errors, img/s and p50/p99
     of the answers that hold a prediction, and the RSS of each process before and after (a leak shows
     as growth) with their pids (a restarted worker, whose leak went with it, shows as a new pid);
  3. slow clients, for --slow-seconds: one client sends a 5 MB upload at 10 KB/s, --idle clients
     send their headers and the start of a body and then nothing, and a well-behaved client
     classifies one image a second; prints when the slow and idle ones were answered and with what,
     what the well-behaved one got, and the adapter's open files over time.
Clients come from several loopback source addresses, as separate users would (the adapter gives each
address a share, adapter/limits.py): the big uploads from 8, the soak from 4, the slow and idle
clients from one (ATTACKER) and the well-behaved client from another.
"""
from __future__ import annotations

import asyncio
import io
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import aiohttp
import psutil

from adapter.run import running_adapter
from benchmarks.bench_serve import cifar_png_payloads, machine, start_benchmark_torchserve
from benchmarks.load import exit_on_sigterm
from model.shipped import SHIPPED_WEIGHTS
from serving import cli

BIG_UPLOAD_BYTES = 9_900_000
MB = 1024 * 1024
ATTACKER, WELL_BEHAVED = "127.0.0.2", "127.0.0.3"


def user_address(i: int, users: int) -> str:
    """The source address of client i of `users` separate ones (127.0.0.10, 127.0.0.11, ...)."""
    return f"127.0.0.{10 + i % users}"


def connector(source: str, limit: int = 100, force_close: bool = False) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(local_addr=(source, 0), limit=limit, force_close=force_close)


def padded_jpeg(size: int) -> bytes:
    """A real photo-sized JPEG (2000x1500) followed by zeros up to `size` bytes (decoders stop at its
    end marker): what a 9.9 MB upload costs to carry, without a 9.9 MB decode each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((94, 125, 3)) * 255).astype(np.uint8)).resize((2000, 1500))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue() + b"\0" * (size - buf.tell())


class RssSampler:
    """Peak RSS of named groups of processes, sampled in a thread every `interval_s`. Each group is a
    function listing its processes, called at each sample: a worker that restarted is measured, not
    its dead predecessor (whose RSS would read as memory falling)."""

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]], interval_s: float = 0.02):
        self.groups = groups
        self.interval_s = interval_s
        self.peak = {name: 0 for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self, name: str) -> list[psutil.Process]:
        try:
            return self.groups[name]()
        except psutil.Error:  # a parent gone: none of its children to list
            return []

    def pids(self) -> dict[str, list[int]]:
        return {name: sorted(proc.pid for proc in self.processes(name)) for name in self.groups}

    def now(self) -> dict[str, int]:
        out = {}
        for name in self.groups:
            total = 0
            for proc in self.processes(name):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            out[name] = total
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, rss in self.now().items():
                self.peak[name] = max(self.peak[name], rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def fmt_rss(rss: dict[str, int]) -> str:
    return ", ".join(f"{name} {value / MB:.0f} MB" for name, value in rss.items())


def fmt_pids(before: dict[str, list[int]], after: dict[str, list[int]]) -> str:
    """Each group's pids before and after; a changed pid is a restart, the RSS figures' caveat."""
    changed = [name for name in before if before[name] != after[name]]
    text = "; ".join(f"{name} {before[name]} -> {after[name]}" for name in before)
    return text + (f"; RESTARTED: {', '.join(changed)} (a restart hides a leak: its memory went with the old process)"
                   if changed else "")


async def post_image(session: aiohttp.ClientSession, url: str, data: bytes, timeout_s: float = 60.0):
    form = aiohttp.FormData()
    form.add_field("image", data, filename="photo.jpg", content_type="image/jpeg")
    try:
        async with session.post(url, data=form, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            body = await r.read()
            return r.status, body, r.headers.get("Retry-After")
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return type(err).__name__, b"", None


async def big_uploads(base: str, n: int, sampler: RssSampler) -> None:
    data = padded_jpeg(BIG_UPLOAD_BYTES)
    idle, pids_before = sampler.now(), sampler.pids()
    # One connection each, as n separate clients would have, from 8 addresses.
    sessions = [aiohttp.ClientSession(connector=connector(user_address(i, 8), n, force_close=True)) for i in range(8)]
    try:
        with sampler:
            started = time.perf_counter()
            results = await asyncio.gather(*(post_image(sessions[i % 8], f"{base}/classify/", data)
                                             for i in range(n)))
            took = time.perf_counter() - started
    finally:
        for session in sessions:
            await session.close()
    await asyncio.sleep(3)
    after = sampler.now()
    statuses = Counter(status for status, _, _ in results)
    retry_after = Counter(ra for status, _, ra in results if status == 503)
    print(f"\n== {n} concurrent {BIG_UPLOAD_BYTES / 1e6:.1f} MB uploads ({took:.1f} s)")
    print(f"  statuses: {dict(statuses)}; Retry-After on the 503s: {dict(retry_after)}")
    print(f"  idle before: {fmt_rss(idle)}")
    print(f"  peak:        {fmt_rss(sampler.peak)}")
    print(f"  3 s after:   {fmt_rss(after)}")
    print(f"  pids: {fmt_pids(pids_before, sampler.pids())}")


async def soak(base: str, payloads: list[bytes], n: int, concurrency: int, sampler: RssSampler) -> None:
    before, pids_before = sampler.now(), sampler.pids()
    statuses: Counter = Counter()
    answered: list[float] = []  # latencies of the 200s that hold a prediction: refusals are not images
    counter = iter(range(n))

    async def client(session):
        for i in counter:
            started = time.perf_counter()
            status, body, _ = await post_image(session, f"{base}/classify/", payloads[i % len(payloads)])
            if status == 200 and b'"prediction"' in body:
                answered.append(time.perf_counter() - started)
            statuses[status if status != 200 or b'"prediction"' in body else "200 without prediction"] += 1

    started = time.perf_counter()
    sessions = [aiohttp.ClientSession(connector=connector(user_address(i, 4), concurrency)) for i in range(4)]
    try:
        await asyncio.gather(*(client(sessions[i % 4]) for i in range(concurrency)))
    finally:
        for session in sessions:
            await session.close()
    took = time.perf_counter() - started
    await asyncio.sleep(2)
    after, pids_after = sampler.now(), sampler.pids()
    answered.sort()
    errors = n - len(answered)
    print(f"\n== soak: {n} requests at concurrency {concurrency} in {took:.0f} s: {len(answered)} answered with a "
          f"prediction ({len(answered) / took:.0f} img/s)")
    print(f"  statuses: {dict(statuses)}; errors {errors}")
    if answered:
        print(f"  p50 {statistics.median(answered) * 1000:.1f} ms, "
              f"p99 {answered[int(len(answered) * 0.99)] * 1000:.1f} ms (of the answers with a prediction)")
    else:
        print("  p50, p99: none (no answer with a prediction)")
    print(f"  RSS before: {fmt_rss(before)}")
    print(f"  RSS after:  {fmt_rss(after)}")
    print(f"  pids: {fmt_pids(pids_before, pids_after)}")


async def _half_sent(host: str, port: int, total: int, first: bytes, rate_bps: float | None, results: list,
                     name: str, started: float) -> None:
    """An upload declaring `total` body bytes that sends `first` then trickles (rate) or stalls."""
    head = (f"POST /classify/ HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: {total}\r\n\r\n").encode()
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))
    except OSError as err:
        results.append((name, f"connect failed: {err.strerror}", time.monotonic() - started))
        return

    async def trickle():
        writer.write(head + first)
        sent = len(first)
        while rate_bps and sent < total:
            await asyncio.sleep(1.0)
            chunk = b"\0" * int(rate_bps)
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()

    sender = asyncio.create_task(trickle())
    try:
        line = await reader.readline()
        status = line.split(b" ")[1].decode() if line else "closed"
    except (ConnectionError, IndexError):
        status = "reset"
    results.append((name, status, time.monotonic() - started))
    sender.cancel()
    writer.close()


async def slow_clients(base: str, seconds: float, idle: int, payload: bytes, adapter: psutil.Process) -> None:
    host, port = base.removeprefix("http://").split(":")
    port = int(port)
    results: list = []
    started = time.monotonic()
    first = b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + b"\0" * 1000
    tasks = [asyncio.create_task(_half_sent(host, port, 5_000_000, first, 10_000, results, "slow", started))]
    await asyncio.sleep(0.5)
    tasks += [asyncio.create_task(_half_sent(host, port, 1_000_000, first, None, results, "idle", started))
              for _ in range(idle)]
    normal: Counter = Counter()
    fds: list[tuple[float, int]] = []
    async with aiohttp.ClientSession(connector=connector(WELL_BEHAVED)) as session:
        while time.monotonic() - started < seconds:
            status, _, _ = await post_image(session, f"{base}/classify/", payload, timeout_s=10)
            normal[status] += 1
            try:
                fds.append((time.monotonic() - started, adapter.num_fds()))
            except psutil.Error:
                pass
            await asyncio.sleep(1.0)
    for task in tasks:
        task.cancel()
    slow = [(status, t) for name, status, t in results if name == "slow"]
    idle_answers = Counter(status for name, status, _ in results if name == "idle")
    idle_times = sorted(t for name, _, t in results if name == "idle")
    print(f"\n== slow clients for {seconds:.0f} s: a 5 MB upload at 10 KB/s, {idle} stalled uploads, one "
          "well-behaved client a second")
    print(f"  the slow upload: {'answered %s after %.1f s' % slow[0] if slow else 'never answered'}")
    print(f"  stalled uploads answered: {dict(idle_answers)} of {idle}; unanswered {idle - len(idle_times)}"
          + (f"; answered between {idle_times[0]:.1f} and {idle_times[-1]:.1f} s" if idle_times else ""))
    print(f"  the well-behaved client: {dict(normal)}")
    if fds:
        print(f"  adapter's open files: peak {max(n for _, n in fds)}, at the end {fds[-1][1]}")


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.soak", __doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--slow-seconds", type=float, default=150)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--big", type=int, default=64)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # --idle connections need their files
    print(f"machine: {machine()}")
    payloads = cifar_png_payloads(256)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        ts = start_benchmark_torchserve(tmp / "ts", args.weights)
        try:
            env = ts.adapter_env()
            with running_adapter(env, tmp / "adapter.log") as adapter:
                adapter_process, java = psutil.Process(adapter.process.pid), psutil.Process(ts.java_pid())
                groups = {"adapter": lambda: [adapter_process], "java": lambda: [java],
                          "workers": lambda: java.children(recursive=True)}
                if args.big:
                    asyncio.run(big_uploads(adapter.base_url, args.big, RssSampler(groups)))
                if args.requests:
                    asyncio.run(soak(adapter.base_url, payloads, args.requests, args.concurrency, RssSampler(groups)))
                if args.slow_seconds:
                    asyncio.run(slow_clients(adapter.base_url, args.slow_seconds, args.idle, payloads[0],
                                             adapter_process))
        finally:
            ts.stop()
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
