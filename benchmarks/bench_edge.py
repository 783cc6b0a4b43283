"""CPU per request of what the edge adds (adapter/edge.py), in-process, without the network's noise.

    python -m benchmarks.bench_edge [--requests 3000] [--repeats 7]

A trivial ASGI app is called directly, bare and wrapped by Edge with and without metrics and the
access line (written to a temporary adapter.log through adapter/run.py's logging configuration,
with serving/rotating_log.py's RotatingLog and with logging's stock RotatingFileHandler); each variant's
best of --repeats runs, in process CPU time, variants interleaved. The end-to-end comparison with
an older adapter is `python -m benchmarks.bench_adapter --before REF`.
"""
from __future__ import annotations

import asyncio
import logging
import logging.config
import sys
import tempfile
import time
from pathlib import Path

from adapter.config import Settings
from adapter.edge import Edge
from adapter.metrics import Metrics
from adapter.run import logging_config
from benchmarks.bench_serve import machine
from benchmarks.load import exit_on_sigterm
from serving import cli

SCOPE = {"type": "http", "method": "POST", "path": "/classify/",
         "headers": [(b"content-length", b"3000"), (b"x-request-id", b"client-id-1")]}


async def _app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive():
    return {"type": "http.request", "body": b"x" * 3000, "more_body": False}


async def _send(message):
    pass


async def _cpu_us_per_request(app, requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        await app(SCOPE, _receive, _send)
    return (time.process_time() - started) / requests * 1e6


def _configure_log(log_file: Path, handler_class: str) -> None:
    config = logging_config(log_file, Settings())
    config["handlers"]["out"]["class"] = handler_class
    logging.config.dictConfig(config)


async def _measure(requests: int, repeats: int, log_dir: Path) -> dict[str, float]:
    access = logging.getLogger("adapter.access")
    # (app, access line on, log handler class)
    variants = {
        "bare app": (_app, False, None),
        "+ request id, context": (Edge(_app, 128, None), False, None),
        "+ metrics": (Edge(_app, 128, Metrics()), False, None),
        "+ JSON line (RotatingLog)": (Edge(_app, 128, Metrics()), True, "serving.rotating_log.RotatingLog"),
        "+ JSON line (stock handler)": (Edge(_app, 128, Metrics()), True, "logging.handlers.RotatingFileHandler"),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, (app, log_line, handler) in variants.items():
            if handler:
                _configure_log(log_dir / f"{handler.rsplit('.', 1)[1]}.log", handler)
            access.setLevel(logging.INFO if log_line else logging.WARNING)
            best[name] = min(best[name], await _cpu_us_per_request(app, requests))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_edge", __doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        best = asyncio.run(_measure(args.requests, args.repeats, Path(tmp)))
    print(f"the edge's CPU per request on {machine()}: best of {args.repeats} x {args.requests} requests")
    for name, us in best.items():
        print(f"  {name:<30}{us:8.1f} us")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()  # its temporary folder removed on `kill` too
    sys.exit(main())
