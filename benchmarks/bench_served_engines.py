"""Each engine served by KServe's own model server (the Open Inference Protocol path: no TorchServe, no
Java), one after the other on the same bundle: images/s and p50 at each concurrency, and its answers on
the first test images against eager fp32 in-process on the same device.

    python -m benchmarks.bench_served_engines [--engines eager-fp32 compile-fp32 compile-bf16]
        [--concurrency 1 16] [--duration 8] [--images 1000] [--out FILE]

Made for a GPU machine lent to a session (benchmarks/gpu_check.sh), where neither Java nor wrk is at
hand: the clients are aiohttp's, one connection each, posting one-image v2 requests (the adapter's OIP
body) in turn. It runs on a CPU too. The engine each server actually served is the one its answers name
(a refused engine falls back to eager fp32), and every figure is printed beside it.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_kserve import v2_bodies
from benchmarks.bench_serve import cifar_png_payloads, machine
from benchmarks.load import REQUEST_TIMEOUT_S, exit_on_sigterm, ratio
from handler import engine as engines
from serving import cli
from serving.kserve import KServePredictor, build_bundle
from serving.settings import MODEL_NAME
from model.shipped import SHIPPED_WEIGHTS
from training.engines import engine_logits

ENGINES = ("eager-fp32", "compile-fp32", "compile-bf16")  # what a GPU worker can run (handler/engine.py)


async def _post(session, url: str, body: bytes) -> tuple[int | str, dict | None]:
    """(status, the answer of a 200); a failed connection or an answer later than REQUEST_TIMEOUT_S is
    (the error's name, None): a failed request, as a 5xx is, and the run goes on (a predictor that died
    mid-run costs its own figures, not the other engines')."""
    import aiohttp

    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as response:
            return response.status, (await response.json() if response.status == 200 else None)
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return type(err).__name__, None


async def top1_answers(url: str, bodies: list[bytes], concurrency: int = 16) -> tuple[list[int | None], set[str]]:
    """(each body's top-1 class index, None where it got no answer; the engines the answers name: the OIP
    response's parameters), ``concurrency`` requests at a time."""
    import aiohttp

    answers: list[int | None] = [None] * len(bodies)
    named: set[str] = set()
    queue = list(range(len(bodies)))

    async def client(session):
        while queue:
            i = queue.pop()
            status, answer = await _post(session, url, bodies[i])
            if status == 200:
                index = next(o for o in answer["outputs"] if o["name"] == "index")
                answers[i] = int(index["data"][0])
                named.add((answer.get("parameters") or {}).get("engine"))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return answers, named


async def drive(url: str, bodies: list[bytes], concurrency: int, duration_s: float) -> dict:
    """``concurrency`` clients, each its own connection, posting ``bodies`` in turn for ``duration_s``."""
    import aiohttp

    until = time.monotonic() + duration_s
    latencies: list[float] = []
    failed = 0

    async def client(offset: int):
        nonlocal failed
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            i = offset
            while time.monotonic() < until:
                started = time.perf_counter()
                status, _ = await _post(session, url, bodies[i % len(bodies)])
                i += concurrency
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    failed += 1

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"images_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies), 2) if latencies else None, "failed": failed}


def in_process_top1(payloads: list[bytes], device: torch.device) -> list[int]:
    """Eager fp32's top-1 for each payload, decoded as the servers decode it, on ``device``."""
    from handler.preprocessing import decode_image, image_to_tensor

    model = engines.serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)).to(device)
    images = torch.stack([image_to_tensor(decode_image(p)) for p in payloads])
    return engine_logits(engines.Engine(engines.EAGER, model), images, device=device).argmax(1).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_served_engines", __doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=engines.ENGINES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--images", type=int, default=1000, help="test images whose answers are compared")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to start "
                        "(its first start compiles)")
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)

    device = engines.serving_device()
    print(f"machine: {machine()}; torch {torch.__version__}; the servers run the network on {device}", flush=True)
    payloads = cifar_png_payloads(args.images)
    bodies = v2_bodies(payloads)
    reference = in_process_top1(payloads, device)
    results = {"machine": machine(), "torch": torch.__version__, "images": len(payloads), "engines": {}}

    def record(name: str, entry: dict) -> None:
        """Kept at once (--out rewritten): a run cut short by its time limit keeps the engines measured."""
        results["engines"][name] = entry
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-served-engines-") as tmp:
        bundle = build_bundle(SHIPPED_WEIGHTS, Path(tmp) / "bundle", quiet=True)
        for name in args.engines:
            predictor = KServePredictor(Path(tmp) / name, bundle, extra_args=[f"--engine={name}"])
            started = time.perf_counter()
            try:
                try:
                    predictor.start(args.start_timeout)
                except Exception as err:  # noqa: BLE001 - the next engine still gets its turn
                    print(f"{name}: did not start: {err}", flush=True)
                    record(name, {"device": str(device), "did_not_start": str(err)[-2000:]})
                    continue
                url = f"{predictor.url}/v2/models/{MODEL_NAME}/infer"
                entry = {"device": str(device), "start_s": round(time.perf_counter() - started, 1)}
                answers, named = asyncio.run(top1_answers(url, bodies))
                entry["served"] = served = ", ".join(sorted(map(str, named)))
                entry["answered"] = sum(a is not None for a in answers)
                entry["agreement_with_fp32_in_process"] = round(
                    sum(a == r for a, r in zip(answers, reference)) / len(reference), 4)
                asyncio.run(drive(url, bodies, max(args.concurrency), args.warmup))
                for concurrency in args.concurrency:
                    entry[f"concurrency_{concurrency}"] = asyncio.run(drive(url, bodies, concurrency, args.duration))
            finally:  # also on Ctrl-C or SIGTERM (exit_on_sigterm), during its start too
                predictor.stop()
            record(name, entry)
            print(f"{name} (served: {served} on {device}, started in {entry['start_s']} s): "
                  f"{entry['answered']}/{len(payloads)} answered, agreement with eager fp32 in-process "
                  f"{entry['agreement_with_fp32_in_process']:.2%}; " + "; ".join(
                      f"concurrency {c}: {entry[f'concurrency_{c}']['images_per_s']:,.1f} img/s, "
                      f"p50 {entry[f'concurrency_{c}']['p50_ms']} ms, {entry[f'concurrency_{c}']['failed']} failed"
                      for c in args.concurrency), flush=True)
    base = results["engines"].get(engines.EAGER)
    if base and "did_not_start" not in base:
        for name, entry in results["engines"].items():
            if "did_not_start" in entry:
                continue
            ratios = {c: ratio(entry[f"concurrency_{c}"]["images_per_s"], base[f"concurrency_{c}"]["images_per_s"])
                      for c in args.concurrency}
            print(f"  {name} vs eager-fp32: " + ", ".join(f"{value:.2f}x at {c}" for c, value in ratios.items()))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
