"""What a flood of unauthenticated probes (GET /metrics, GET /health) on the users' port costs one user's
classification.

    python -m benchmarks.bench_probes [--duration 10] [--rounds 2] [--connections 6]

One TorchServe (this checkout's archive, free loopback ports) and, per phase, an adapter in front of it with
its default settings (/metrics on the users' port). A lone probe, from its own address, posts a CIFAR-100 test
PNG to /classify/ every 20 ms, one at a time, from the 2nd second of each phase; meanwhile --connections
keep-alive connections from another address ask the phase's route nonstop (quiet: none; /classes: the
cheapest route, what any request costs). Prints, per phase and round, the probe's p50/p90/p99 and the
flood's answers per second.
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from adapter.run import running_adapter
from benchmarks.bench_fairness import PROBE_ADDRESS, _client, summary
from benchmarks.bench_serve import cifar_png_payloads, machine, start_benchmark_torchserve
from benchmarks.load import exit_on_sigterm
from benchmarks.soak import connector
from serving import cli
from serving.archive import DEFAULT_WEIGHTS

FLOOD_ADDRESS = "127.0.0.3"
PROBE_START_S = 2.0


async def _flood(url: str, until: float, statuses: Counter) -> None:
    """One keep-alive connection asking `url` nonstop until `until`."""
    async with aiohttp.ClientSession(connector=connector(FLOOD_ADDRESS, limit=1)) as session:
        while time.monotonic() < until:
            try:
                async with session.get(url) as r:
                    await r.read()
                    statuses[r.status] += 1
            except aiohttp.ClientError as err:
                statuses[type(err).__name__] += 1


async def _phase(base: str, pngs: list[bytes], route: str | None, connections: int, duration_s: float):
    until = time.monotonic() + duration_s
    probe, flood = [], Counter()

    async def probe_later():
        await asyncio.sleep(PROBE_START_S)
        await _client(f"{base}/classify/", PROBE_ADDRESS, pngs, until, probe, 0.02)

    floods = [_flood(f"{base}{route}", until, flood) for _ in range(connections)] if route else []
    await asyncio.gather(probe_later(), *floods)
    return probe, flood


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_probes", __doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=6, help="connections flooding the probe route")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args(argv)
    if args.duration <= PROBE_START_S:
        parser.error(f"--duration must be above {PROBE_START_S:g} s (the probe starts then)")
    print(f"machine: {machine()}")
    pngs = cifar_png_payloads(64)
    with tempfile.TemporaryDirectory(prefix="probes-") as tmp:
        tmp = Path(tmp)
        ts = start_benchmark_torchserve(tmp / "ts", args.weights)
        try:
            for round_ in range(1, args.rounds + 1):
                for route in (None, "/classes", "/metrics", "/health"):  # /classes: what any request costs
                    with running_adapter(ts.adapter_env(), tmp / f"adapter-{round_}-{route}.log") as adapter:
                        probe, flood = asyncio.run(_phase(adapter.base_url, pngs, route, args.connections,
                                                          args.duration))
                    name = f"{route} x {args.connections}" if route else "quiet"
                    flood_line = (f"; flood {sum(flood[s] for s in flood if s == 200) / args.duration:.0f} answered/s "
                                  f"{dict(flood)}" if route else "")
                    print(f"round {round_}, {name}: the probe's /classify/ {summary(probe)}{flood_line}", flush=True)
        finally:
            ts.stop()
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
