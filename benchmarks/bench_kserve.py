"""Serving speed through the KServe bundle: Open Inference Protocol (v2) bodies against raw PNG
bodies on the same TorchServe (part of ``make bench-serve``).

    python -m benchmarks.bench_kserve [--duration 8] [--concurrency 16]

The bundle (serving/kserve.py) is built into a temporary folder and started as KServe's runtime
starts it (TS_SERVICE_ENVELOPE=kservev2, ignored by the bundle's config). wrk then drives, at each
concurrency and back to back:
  * predictions: raw PNG bodies to /predictions/cifar100 (TorchServe's own protocol);
  * v2: one-image v2 requests (BYTES input, base64) to /v2/models/cifar100/infer.
  * predictor: the same v2 requests to KServe's own Python model server on the same bundle
    (handler/kserve_predictor.py: no TorchServe; one process, its own batching), started beside it;
  * predictor-grpc: the same images to it over gRPC (ModelInfer, the file's bytes in one BYTES element),
    from benchmarks/grpc_load.py (grpc's asyncio client in a process of its own: wrk speaks no HTTP/2).
The serving options of ``make bench-serve``'s BENCH_SERVE_ARGS (--engine, --workers, --batch-size,
--max-batch-delay, --cpu-threads, --lone-image-threads: the bundle's model-config.yaml; --ts-property:
its config.properties) apply to both servers, as to a bundle built with them (--workers to TorchServe
only: KServe's model server is one process); the engine each served is printed.
Target: v2 >= 90% of predictions' images/s at concurrency 16 (batching intact: the handler reads
v2 bodies itself, where TorchServe's envelope would answer one request per batch). The two are
measured in alternation ``--rounds`` times (the shared machine's speed drifts); the table shows
each target's median round, and every round's ratio is printed.
"""
from __future__ import annotations

import base64
import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import httpx

from benchmarks.bench_serve import (add_load_arguments, cifar_png_payloads, machine, model_config_from_arguments,
                                    print_table, ts_properties)
from benchmarks.load import (GrpcTarget, HttpTarget, LoadResult, exit_on_sigterm, model_infer_messages, print_failures,
                             ratio, run_load, warm_up)
from benchmarks.side_by_side import running, side_by_side
from serving.kserve import KServePredictor, KServeTorchServe, build_bundle
from serving.torchserve import read_properties
from serving import cli

TARGET_RATIO = 0.90


def v2_bodies(payloads: list[bytes]) -> list[bytes]:
    return [json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(p).decode()]}]}).encode() for p in payloads]


def bundle_from_arguments(root: Path, args) -> Path:
    """The KServe bundle of --weights under ``root``, with the serving options of add_load_arguments in its
    model-config.yaml and config.properties (what both of its servers read)."""
    bundle = build_bundle(args.weights, root / "dist-kserve", quiet=True,
                          model_config=model_config_from_arguments(root / "model-config", args))
    if args.ts_property:
        config = bundle / "config" / "config.properties"
        properties = {**read_properties(config), **ts_properties(args.ts_property)}
        config.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    return bundle


def served_engine(url: str, body: bytes, content_type: str) -> str:
    """The engine one answer names (TorchServe's protocol: "engine"; v2: its parameters')."""
    r = httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=60)
    r.raise_for_status()
    answer = r.json()
    return str(answer.get("engine") or (answer.get("parameters") or {}).get("engine"))


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_kserve", "v2 bodies vs raw bodies through the KServe bundle's TorchServe.")
    add_load_arguments(parser)
    parser.set_defaults(concurrency=[16])
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurements of the targets")
    parser.add_argument("--no-predictor", dest="predictor", action="store_false",
                        help="leave out KServe's own model server (handler/kserve_predictor.py)")
    args = parser.parse_args(argv)

    payloads = cifar_png_payloads()
    with tempfile.TemporaryDirectory(prefix="bench-kserve-") as tmp:
        tmp = Path(tmp)
        bundle = bundle_from_arguments(tmp, args)
        ts = KServeTorchServe(tmp / "torchserve", bundle, "v2")
        predictor = KServePredictor(tmp / "predictor", bundle) if args.predictor else None
        # The first start on a machine compiles the engine; a failed or interrupted start leaves neither running.
        with side_by_side(running(ts, lambda: (ts.start(), ts.wait_ready(600))),
                          running(predictor, lambda: predictor.start(600)) if predictor else nullcontext()):
            engines = {"TorchServe": served_engine(ts.predictions_url, payloads[0], "image/png")}
            targets = {
                "predictions": HttpTarget(ts.predictions_url, payloads, expect='"prediction"',
                                          headers=lambda: {"Content-Type": "image/png"}),
                "v2": HttpTarget(ts.v2_infer_url, v2_bodies(payloads), expect='"outputs"',
                                 headers=lambda: {"Content-Type": "application/json"}),
            }
            if predictor is not None:
                targets["predictor"] = HttpTarget(f"{predictor.url}/v2/models/cifar100/infer", v2_bodies(payloads),
                                                  expect='"outputs"', headers=lambda: {"Content-Type": "application/json"})
                engines["KServe's model server"] = served_engine(targets["predictor"].url, targets["predictor"].bodies[0],
                                                                 "application/json")
                targets["predictor-grpc"] = GrpcTarget(predictor.grpc_target, model_infer_messages(payloads))
            warm_up(targets, args.concurrency, tmp, args.warmup)
            rounds: dict[str, dict[int, list[LoadResult]]] = {name: {c: [] for c in args.concurrency} for name in targets}
            for c in args.concurrency:
                for r in range(args.rounds):
                    # ABBA order: neither target always runs first after the other's load.
                    for name in (list(targets) if r % 2 == 0 else list(reversed(targets))):
                        rounds[name][c].append(run_load(targets[name], c, args.duration, tmp))
    print(f"KServe bundle benchmark on {machine()}: weights {args.weights}; {args.duration:g} s per point")
    print("engine: " + ", ".join(f"{server} {engine}" for server, engine in engines.items())
          + " (handler.engine in the bundle's model-config.yaml)")
    rows = {name: {c: sorted(results, key=lambda r: r.images_per_s)[len(results) // 2]
                   for c, results in by_c.items()} for name, by_c in rounds.items()}
    print_table(rows, args.concurrency)
    hi = max(args.concurrency)
    each = [ratio(v2.images_per_s, raw.images_per_s) for v2, raw in zip(rounds["v2"][hi], rounds["predictions"][hi])]
    print(f"v2 / predictions per round at concurrency {hi}: {', '.join(f'{r:.2f}' for r in each)}")
    print(f"v2 / predictions images/s at concurrency {hi}: "
          f"{ratio(rows['v2'][hi].images_per_s, rows['predictions'][hi].images_per_s):.2f} (target >= {TARGET_RATIO:.2f})")
    if "predictor" in rows:
        each = [ratio(p.images_per_s, v2.images_per_s) for p, v2 in zip(rounds["predictor"][hi], rounds["v2"][hi])]
        print(f"KServe's model server / TorchServe, v2, per round at concurrency {hi}: "
              f"{', '.join(f'{r:.2f}' for r in each)}")
        each = [ratio(g.images_per_s, p.images_per_s) for g, p in zip(rounds["predictor-grpc"][hi], rounds["predictor"][hi])]
        print(f"KServe's model server, gRPC / REST v2, per round at concurrency {hi}: "
              f"{', '.join(f'{r:.2f}' for r in each)}")
    print_failures({name: [r for results in by_c.values() for r in results] for name, by_c in rounds.items()})
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
