"""The gRPC side of the load generator (benchmarks/load.py run_grpc), run in a process of its own as wrk is:
a closed loop of ``--concurrency`` unary calls of ``--method`` on one channel (grpc's asyncio client, the
bodies already serialized, sent in rotation), for ``--duration`` seconds. Prints one line,
``GRPC_RESULT requests=... errors=... ...``, the fields wrk_post.lua prints, in microseconds.

    python -m benchmarks.grpc_load --target 127.0.0.1:8081 --bodies DIR --concurrency 16 --duration 8

A call counts as an error when it ends with a status other than OK or after --timeout seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc
from grpc import aio

from benchmarks.load import MODEL_INFER, REQUEST_TIMEOUT_S, percentile


async def closed_loop(target: str, method: str, bodies: list[bytes], concurrency: int, duration_s: float,
                      timeout_s: float) -> dict[str, int]:
    latencies_us, errors, sent = [], 0, 0
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        started = time.monotonic()
        stop = started + duration_s

        async def caller(first: int) -> None:
            nonlocal errors, sent
            n = first
            while time.monotonic() < stop:
                sent += 1
                began = time.monotonic()
                try:
                    await call(bodies[n % len(bodies)], timeout=timeout_s)
                    latencies_us.append((time.monotonic() - began) * 1e6)
                except grpc.RpcError:
                    errors += 1
                n += concurrency
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        took = time.monotonic() - started
    return {"requests": len(latencies_us) + errors, "sent": sent, "status_errors": errors, "connect_errors": 0,
            "dropped": 0, "timeouts": 0, "bad_bodies": 0, "duration_us": int(took * 1e6),
            "p50_us": int(percentile(latencies_us, 50)) if latencies_us else 0,
            "p99_us": int(percentile(latencies_us, 99)) if latencies_us else 0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--method", default=MODEL_INFER)
    parser.add_argument("--bodies", type=Path, required=True, help="a folder of serialized request messages (*.body)")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S)
    args = parser.parse_args(argv)
    bodies = [path.read_bytes() for path in sorted(args.bodies.glob("*.body"))]
    fields = asyncio.run(closed_loop(args.target, args.method, bodies, args.concurrency, args.duration, args.timeout))
    print("GRPC_RESULT " + " ".join(f"{key}={value}" for key, value in fields.items()), flush=True)


if __name__ == "__main__":
    main()
