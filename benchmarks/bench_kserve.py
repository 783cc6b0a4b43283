"""Serving speed through the KServe bundle: Open Inference Protocol (v2) bodies against raw PNG
bodies on the same TorchServe (part of ``make bench-serve``).

    python -m benchmarks.bench_kserve [--duration 8] [--concurrency 16]

The bundle (serving/kserve.py) is built into a temporary folder and started as KServe's runtime
starts it (TS_SERVICE_ENVELOPE=kservev2, ignored by the bundle's config). wrk then drives, at each
concurrency and back to back:
  * predictions: raw PNG bodies to /predictions/cifar100 (TorchServe's own protocol);
  * v2: one-image v2 requests (BYTES input, base64) to /v2/models/cifar100/infer.
  * predictor: the same v2 requests to KServe's own Python model server on the same bundle
    (handler/kserve_predictor.py: no TorchServe; one process, its own batching), started beside it.
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
from pathlib import Path

from benchmarks.bench_serve import add_load_arguments, cifar_png_payloads, machine, print_table
from benchmarks.load import HttpTarget, LoadResult, run_wrk, warm_up
from serving.kserve import KServePredictor, KServeTorchServe, build_bundle
from serving import cli

TARGET_RATIO = 0.90


def v2_bodies(payloads: list[bytes]) -> list[bytes]:
    return [json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(p).decode()]}]}).encode() for p in payloads]


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
        bundle = build_bundle(args.weights, tmp / "dist-kserve", quiet=True)
        ts = KServeTorchServe(tmp / "torchserve", bundle, "v2")
        predictor = KServePredictor(tmp / "predictor", bundle) if args.predictor else None
        ts.start()
        try:
            ts.wait_ready(600)  # the first start on a machine compiles the engine
            if predictor is not None:
                predictor.start(600)
            targets = {
                "predictions": HttpTarget(ts.predictions_url, payloads, expect='"prediction"',
                                          headers=lambda: {"Content-Type": "image/png"}),
                "v2": HttpTarget(ts.v2_infer_url, v2_bodies(payloads), expect='"outputs"',
                                 headers=lambda: {"Content-Type": "application/json"}),
            }
            if predictor is not None:
                targets["predictor"] = HttpTarget(f"{predictor.url}/v2/models/cifar100/infer", v2_bodies(payloads),
                                                  expect='"outputs"', headers=lambda: {"Content-Type": "application/json"})
            warm_up(targets, args.concurrency, tmp, args.warmup)
            rounds: dict[str, dict[int, list[LoadResult]]] = {name: {c: [] for c in args.concurrency} for name in targets}
            for c in args.concurrency:
                for r in range(args.rounds):
                    # ABBA order: neither target always runs first after the other's load.
                    for name in (list(targets) if r % 2 == 0 else list(reversed(targets))):
                        rounds[name][c].append(run_wrk(targets[name], c, args.duration, tmp))
        finally:
            ts.stop()
            if predictor is not None:
                predictor.stop()
    print(f"KServe bundle benchmark on {machine()}: weights {args.weights}; {args.duration:g} s per point")
    rows = {name: {c: sorted(results, key=lambda r: r.images_per_s)[len(results) // 2]
                   for c, results in by_c.items()} for name, by_c in rounds.items()}
    print_table(rows, args.concurrency)
    hi = max(args.concurrency)
    each = [v2.images_per_s / max(raw.images_per_s, 1e-9) for v2, raw in zip(rounds["v2"][hi], rounds["predictions"][hi])]
    print(f"v2 / predictions per round at concurrency {hi}: {', '.join(f'{r:.2f}' for r in each)}")
    ratio = rows["v2"][hi].images_per_s / max(rows["predictions"][hi].images_per_s, 1e-9)
    print(f"v2 / predictions images/s at concurrency {hi}: {ratio:.2f} (target >= {TARGET_RATIO:.2f})")
    if "predictor" in rows:
        each = [p.images_per_s / max(v2.images_per_s, 1e-9) for p, v2 in zip(rounds["predictor"][hi], rounds["v2"][hi])]
        print(f"KServe's model server / TorchServe, v2, per round at concurrency {hi}: "
              f"{', '.join(f'{r:.2f}' for r in each)}")
    failed = sum(r.errors for by_c in rounds.values() for results in by_c.values() for r in results)
    if failed:
        print(f"{failed} requests failed during the run (counted in the errors column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
