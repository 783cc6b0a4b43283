"""KServe's model server under a flood of large bodies: its peak memory with the bound on bodies held
(``--max_body_bytes_held``, handler/kserve_predictor.py) against the same flood with the bound lifted.

    python -m benchmarks.bench_predictor_memory [--clients 64] [--body-mib 11] [--rounds 2] [--over rest grpc]

In KServe's Standard mode (RawDeployment) nothing in front of the server bounds its connections (Knative mode's
queue-proxy holds all but containerConcurrency). Each of ``--clients`` threads sends ``--rounds`` bodies of
``--body-mib`` MiB, all at once: over REST a v1 body (one image's base64), over gRPC a ModelInferRequest of
one BYTES element, each time an image that is not one (refused once read); meanwhile a small CIFAR image is
sent over REST every 0.2 s (is anyone else answered, and how late?). The server's resident memory is
sampled every 20 ms. Figures printed, nothing asserted.
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
from benchmarks.load import MODEL_INFER, model_infer_messages
from handler.kserve_predictor import MAX_BODY_BYTES_HELD
from serving import cli
from model.shipped import SHIPPED_WEIGHTS
from serving.kserve import KServePredictor, build_bundle
from serving.settings import MODEL_NAME

UNBOUNDED = 1 << 40  # the bound lifted: what the server did before it had one


def rest_sender(url: str, body: bytes):
    """One client's sender of ``body`` as a v1 request: its status."""
    client = httpx.Client(timeout=120)

    def send():
        try:
            return client.post(url, content=body, headers={"content-type": "application/json"}).status_code
        except httpx.HTTPError as err:
            return type(err).__name__
    return send, client.close


def grpc_sender(target: str, image: bytes):
    """One client's sender of ``image`` as a ModelInferRequest on a connection of its own: its status code."""
    import grpc

    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                     ("grpc.use_local_subchannel_pool", 1)])
    model_infer = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
    [message] = model_infer_messages([image])

    def send():
        try:
            model_infer(message, timeout=120)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name
    return send, channel.close


def flood(senders: list, rounds: int, small_url: str, small: bytes) -> tuple[Counter, Counter, float]:
    """Statuses of the large bodies (each of ``senders`` sends ``rounds``), of the small requests sent
    meanwhile, and the slowest small answer (s)."""
    large, small_statuses, slowest, done = Counter(), Counter(), [0.0], threading.Event()

    def send_large(sender):
        send, close = sender
        try:
            for _ in range(rounds):
                large[send()] += 1
        finally:
            close()

    def send_small():
        with httpx.Client(timeout=30) as client:
            while not done.wait(0.2):
                started = time.perf_counter()
                try:
                    small_statuses[client.post(small_url, content=small,
                                               headers={"content-type": "application/json"}).status_code] += 1
                except httpx.HTTPError as err:
                    small_statuses[type(err).__name__] += 1
                slowest[0] = max(slowest[0], time.perf_counter() - started)
    watcher = threading.Thread(target=send_small)
    watcher.start()
    with ThreadPoolExecutor(len(senders)) as pool:
        list(pool.map(send_large, senders))
    done.set()
    watcher.join()
    return large, small_statuses, slowest[0]


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
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--body-mib", type=float, default=11.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--over", nargs="+", choices=("rest", "grpc"), default=["rest", "grpc"])
    args = parser.parse_args(argv)
    raw = os.urandom(int(args.body_mib * 2**20 * 3 / 4) - 64)  # its base64 in a v1 body: ~--body-mib MiB
    body = json.dumps({"instances": [{"data": base64.b64encode(raw).decode()}]}).encode()
    image = os.urandom(int(args.body_mib * 2**20) - 64)  # over gRPC the bytes themselves
    small = json.dumps({"instances": [{"data": base64.b64encode(cifar_png_payloads(1)[0]).decode()}]}).encode()
    print(f"# {machine()}; {args.clients} clients x {args.rounds} bodies of {args.body_mib:.1f} MiB, "
          f"a CIFAR image over REST every 0.2 s beside them")
    print("| protocol | bound | server RSS before (MB) | peak (MB) | large bodies' statuses | small requests' statuses "
          "| slowest small answer (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-predictor-memory-") as tmp:
        bundle = build_bundle(args.weights, Path(tmp) / "dist-kserve", quiet=True)
        for protocol in args.over:
            for held in (MAX_BODY_BYTES_HELD, UNBOUNDED):
                predictor = KServePredictor(Path(tmp) / f"run-{protocol}-{held}", bundle,
                                            extra_args=[f"--max_body_bytes_held={held}"]).start()
                try:
                    url = f"{predictor.url}/v1/models/{MODEL_NAME}:predict"
                    senders = [rest_sender(url, body) if protocol == "rest" else grpc_sender(predictor.grpc_target, image)
                               for _ in range(args.clients)]
                    before, peak, (large, small_statuses, slowest) = peak_rss_during(
                        predictor.process.pid, lambda: flood(senders, args.rounds, url, small))
                finally:
                    predictor.stop()
                name = "unbounded" if held == UNBOUNDED else f"{held / 2**20:.0f} MiB"
                print(f"| {protocol} | {name} | {before:.0f} | {peak:.0f} | {dict(sorted(large.items(), key=str))} | "
                      f"{dict(sorted(small_statuses.items(), key=str))} | {slowest:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
