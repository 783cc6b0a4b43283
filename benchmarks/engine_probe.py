"""What the engines' start-up probe sees (handler/engine.py): each engine's top-1 agreement with eager fp32 on the
test split, on random training images (the shipped calibration ones) and on the shipped probe (fp32's closest calls
among the training images), beside engines broken on purpose: openvino-int8 without its fp32 rechecks, and eager
fp32's logits plus Gaussian noise of each ``--noise`` standard deviation. Figures printed, nothing asserted.

    python -m benchmarks.engine_probe [WEIGHTS] [--data-dir DIR] [--images 10000] [--noise 0.05 0.1 0.2]
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from benchmarks.bench_serve import machine
from handler import engine as engines
from serving import cli
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from training.engines import engine_logits, served_cache


def main(argv: list[str] | None = None) -> int:
    from training.data import default_data_dir, load_split

    parser = cli.Parser("benchmarks.engine_probe", __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, nargs="?", default=SHIPPED_WEIGHTS)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--images", type=cli.positive_int, default=10000, help="test images (the first N)")
    parser.add_argument("--noise", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument("--engines", nargs="*", default=["openvino-fp32", engines.OPENVINO_INT8, "openvino-bf16"],
                        choices=engines.ENGINES[1:])
    args = parser.parse_args(argv)
    folder = args.weights.resolve().parent
    sha = hashlib.sha256(args.weights.read_bytes()).hexdigest()
    model = engines.serving_model(torch.load(args.weights, map_location="cpu", weights_only=True))
    inputs = engines.load_inputs(folder) or engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    test_images = load_split(args.data_dir, train=False)[0][:args.images]
    sets = {"test": test_images, "random": inputs["calibration"], "probe": inputs["probe"]}
    eager = engines.Engine(engines.EAGER, model)
    reference = {name: engine_logits(eager, images) for name, images in sets.items()}
    print(f"{machine()}; weights {args.weights} ({sha[:12]}); probe picked for "
          f"{'these weights' if inputs.get('probe_weights_sha256') == sha else 'OTHER weights'}; "
          f"line {engines.PROBE_MIN_AGREEMENT:.0%}")
    print(f"| engine | agreement, {len(test_images):,} test images | {len(sets['random'])} random training images "
          f"| {len(sets['probe'])} probe images (close calls) | largest logit change, {engines.LOSSLESS_PROBE_IMAGES} probe images |")
    print("| --- | --- | --- | --- | --- |")

    def row(name: str, logits: dict) -> None:
        agree = {k: float((logits[k].argmax(1) == reference[k].argmax(1)).float().mean()) for k in sets}
        change = float((logits["probe"] - reference["probe"])[:engines.LOSSLESS_PROBE_IMAGES].abs().max())
        print(f"| {name} | {agree['test']:.2%} | {agree['random']:.2%} | {agree['probe']:.2%} | {change:.2g} |", flush=True)

    for name in args.engines:
        if engines.machine_refusal(name, torch.device("cpu")) is not None:
            print(f"| {name} | skipped: {engines.machine_refusal(name, torch.device('cpu'))} | | | |")
            continue
        engine = engines.build_engine(name, model, sha, 16, torch.device("cpu"), None, served_cache(), shipped_dir=folder)
        row(name, {k: engine_logits(engine, images) for k, images in sets.items()})
        if name == engines.OPENVINO_INT8:
            alone = engines.Engine("int8 alone", engine.forward.fast, 16, {}, torch.contiguous_format)
            row("openvino-int8 without its rechecks", {k: engine_logits(alone, images) for k, images in sets.items()})
    generator = torch.Generator().manual_seed(1)
    for sigma in args.noise:
        row(f"eager + noise {sigma:g}", {k: logits + sigma * torch.randn(logits.shape, generator=generator)
                                         for k, logits in reference.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
