"""What heavy requests from other users cost one user's classification (`make soak` runs it first).

    python -m benchmarks.bench_fairness [--duration 10] [--rounds 2] [--addresses 8] [--per-address 2]
                                        [--explanation-caps 64 4] [--photo-addresses 6] [--photos-per-address 4]
                                        [--floods /classes /metrics /health] [--flood-connections 6]
                                        [--running-torchserve]

One TorchServe (this checkout's archive, free loopback ports; --running-torchserve: the one already running where
the adapter's settings point, by default `make serve`'s) and, per setting, an adapter in front of it.
A probe, from its own address, posts a CIFAR-100 test PNG to /classify/ every 20 ms, one at a time,
from the 2nd second of each phase; meanwhile:
  * quiet: nobody else;
  * explanations: --addresses x --per-address clients ask /explain/ nonstop (a 503 waits its
    Retry-After), once per value of MAX_EXPLANATIONS_IN_FLIGHT in --explanation-caps (64: no cap, as
    before they had one; the per-address share is lifted to 16 so that only the global cap acts;
    none given: no explanation phases);
  * photos: --photo-addresses x --photos-per-address clients upload 12 MP phone JPEGs to /classify/
    nonstop (the adapter shrinks each), default settings;
  * floods: for each route in --floods, --flood-connections keep-alive connections from one other
    address GET it nonstop on the users' port, default settings (/classes: the cheapest route, what
    any request costs; /metrics and /health: the unauthenticated probes; none given: no flood phases).
Prints, per phase and round, the probe's p50/p90/p99 and statuses and the others' answers per second.
Figures: benchmarks/RESULTS.md ("Session 18"; the floods: "Session 32").
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from adapter.run import running_adapter
from benchmarks.bench_photos import phone_photos
from benchmarks.bench_serve import (RunningTorchServe, add_running_torchserve_argument, cifar_png_payloads, machine,
                                    start_benchmark_torchserve)
from benchmarks.load import exit_on_sigterm
from benchmarks.side_by_side import side_by_side
from benchmarks.soak import connector, post_image, user_address
from serving import cli
from model.shipped import SHIPPED_WEIGHTS

PROBE_ADDRESS = "127.0.0.2"
FLOOD_ADDRESS = "127.0.0.3"  # the others are user_address()'s, 127.0.0.10 on
PROBE_GAP_S = 0.02
PROBE_START_S = 2.0  # the others' load settles first


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float = 60.0):
    """(status or the error's name, Retry-After) of one GET, its body read."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return type(err).__name__, None


async def _client(url: str, source: str, bodies: list[bytes], until: float, results: list,
                  gap_s: float = 0.0) -> None:
    """One client, one keep-alive connection, posting `bodies` in turn (none: GET `url`) until `until`:
    (status, ms) per answer; a 503 with Retry-After waits it, as a polite client (and the page) does."""
    async with aiohttp.ClientSession(connector=connector(source)) as session:
        i = 0
        while time.monotonic() < until:
            started = time.perf_counter()
            if bodies:
                status, _, retry_after = await post_image(session, url, bodies[i % len(bodies)])
            else:
                status, retry_after = await _get(session, url)
            i += 1
            results.append((status, (time.perf_counter() - started) * 1000))
            if status == 503 and retry_after is not None:
                await asyncio.sleep(min(float(retry_after), max(0.0, until - time.monotonic())))
            elif gap_s:
                await asyncio.sleep(gap_s)


async def _phase(base: str, probe_bodies: list[bytes], route: str, others: list[str], other_bodies: list[bytes],
                 duration_s: float) -> tuple[list, list]:
    until = time.monotonic() + duration_s
    probe, load = [], []

    async def probe_later():
        await asyncio.sleep(PROBE_START_S)
        await _client(f"{base}/classify/", PROBE_ADDRESS, probe_bodies, until, probe, PROBE_GAP_S)

    await asyncio.gather(probe_later(), *(_client(f"{base}{route}", source, other_bodies, until, load)
                                          for source in others))
    return probe, load


def summary(results: list) -> str:
    statuses = Counter(status for status, _ in results)
    ok = sorted(ms for status, ms in results if status == 200)
    if not ok:
        return f"no answer: {dict(statuses)}"
    return (f"p50 {ok[len(ok) // 2]:.0f} ms, p90 {ok[int(len(ok) * 0.9)]:.0f} ms, p99 {ok[int(len(ok) * 0.99)]:.0f} ms "
            f"{dict(statuses)}")


def _route(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"a route starts with /, not {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_fairness", __doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--addresses", type=int, default=8, help="addresses asking for explanations")
    parser.add_argument("--per-address", type=int, default=2, help="explanations each keeps asking for at once")
    parser.add_argument("--explanation-caps", type=int, nargs="*", default=[64, 4],
                        help="values of MAX_EXPLANATIONS_IN_FLIGHT to compare (64: no cap; none: no explanations)")
    parser.add_argument("--photo-addresses", type=int, default=6, help="addresses uploading 12 MP photos (0: none)")
    parser.add_argument("--photos-per-address", type=int, default=4)
    parser.add_argument("--floods", type=_route, nargs="*", default=["/classes", "/metrics", "/health"],
                        help="routes to GET nonstop beside the probe, one phase each (none: no floods)")
    parser.add_argument("--flood-connections", type=cli.positive_int, default=6,
                        help="keep-alive connections, from one address, flooding each route")
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    add_running_torchserve_argument(parser, "--weights unused")
    args = parser.parse_args(argv)
    if args.duration <= PROBE_START_S:
        parser.error(f"--duration must be above {PROBE_START_S:g} s (the probe starts then)")
    print(f"machine: {machine()}")
    pngs = cifar_png_payloads(64)
    photos = phone_photos(2) if args.photo_addresses else []
    explainers = [user_address(i, args.addresses) for i in range(args.addresses)] * args.per_address
    uploaders = [user_address(i, args.photo_addresses) for i in range(args.photo_addresses)] * args.photos_per_address
    phases = [("quiet", {}, "/classify/", [], [])]
    phases += [(f"explanations from {args.addresses} x {args.per_address}, MAX_EXPLANATIONS_IN_FLIGHT={cap}",
                {"MAX_EXPLANATIONS_IN_FLIGHT": str(cap), "MAX_CLIENT_EXPLANATIONS_IN_FLIGHT": "16"},
                "/explain/", explainers, pngs) for cap in args.explanation_caps]
    if args.photo_addresses:
        phases.append((f"12 MP photos from {args.photo_addresses} x {args.photos_per_address}", {}, "/classify/",
                       uploaders, photos))
    phases += [(f"GET {route} from 1 x {args.flood_connections}", {}, route,
                [FLOOD_ADDRESS] * args.flood_connections, []) for route in args.floods]
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        tmp = Path(tmp)
        ts = RunningTorchServe() if args.running_torchserve else start_benchmark_torchserve(tmp / "ts", args.weights)
        ts_env = ts.adapter_env()
        try:
            for round_ in range(1, args.rounds + 1):
                # A fresh adapter per phase, the round's started at once (an idle one takes no CPU from the phase
                # measured; one after another their starts took ~1.5 s each).
                with side_by_side(*(running_adapter({**ts_env, **env}, tmp / f"adapter-{round_}-{i}.log")
                                    for i, (_, env, *_) in enumerate(phases))) as adapters:
                    for (name, env, route, others, bodies), adapter in zip(phases, adapters):
                        probe, load = asyncio.run(_phase(adapter.base_url, pngs, route, others, bodies,
                                                         args.duration))
                        answered = sum(1 for status, _ in load if status == 200) / (args.duration)
                        others_line = f"; theirs {summary(load)}, {answered:.1f} answered/s" if others else ""
                        print(f"round {round_}, {name}: the probe's /classify/ {summary(probe)}{others_line}",
                              flush=True)
        finally:
            ts.stop()
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
