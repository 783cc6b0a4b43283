"""The int8 network of the ``openvino-int8`` engine: NNCF post-training quantization, accuracy-controlled.

    python -m training.quantize [WEIGHTS] [--data-dir DIR]

Converts the served network (handler: BatchNorm folded) to OpenVINO IR, quantizes it with NNCF on
``CALIBRATION_IMAGES`` training images, then reverts to float32 the quantizers that change fp32's top-1
answers most, until the agreement with fp32 on ``CONTROL_IMAGES`` other training images is within
``MAX_AGREEMENT_DROP`` of perfect. Never the test split: ``python -m training.engines`` measures the
result there (as served: with the rechecks, handler/engine.py), and the guard decides.

Writes ``engine_int8.xml`` + ``engine_int8.bin`` beside the weights (serving/archive.py packs them when
they were made from exactly these weights: the IR's rt_info names their sha256). OpenVINO IR is the
same file on every CPU, so it is made once, here, and shipped: NNCF is needed only to make it.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch

from handler import engine as engines
from serving.settings import ENGINE_INT8_FILE
from serving import cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = REPO / "model" / "weights" / "CIFAR100_model.pth"
CALIBRATION_IMAGES = 300   # NNCF's default subset size
CONTROL_IMAGES = 2000
# Agreement with fp32 on the control images may drop this much. Training images agree more easily
# than unseen ones (the network's margins are wider there: 99.65% here was 97.3% on the test split,
# benchmarks/RESULTS.md): the rechecks of close answers make up the rest.
MAX_AGREEMENT_DROP = 0.004
SEED = 1  # the draw of training images (engine_inputs.pt uses seed 0)


def control_images(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, control): disjoint random training images, uint8."""
    from training.data import load_split

    images, _ = load_split(data_dir, train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
    return (images[order[:CALIBRATION_IMAGES]].clone(),
            images[order[CALIBRATION_IMAGES:CALIBRATION_IMAGES + CONTROL_IMAGES]].clone())


def quantize(model: torch.nn.Module, weights_sha256: str, calibration: torch.Tensor, control: torch.Tensor,
             out: Path, max_batch: int = 6, log=print) -> dict:
    """Write the accuracy-controlled int8 IR of ``model`` to ``out`` (.xml, and its .bin); returns a summary.

    ``calibration`` and ``control``: normalized float images."""
    import nncf
    import numpy as np
    import openvino as ov

    core = ov.Core()
    # float32 explicitly: on a CPU with native bf16, OpenVINO's default precision is bf16 (NNCF's own
    # validation runs float32 too).
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.xml"
        engines._openvino_package(model, max_batch, fp32_path)
        fp32 = core.read_model(str(fp32_path))
        fp32_answers = _answers(core.compile_model(fp32, "CPU", f32), control, max_batch)
        batches = list(zip(control.split(max_batch), fp32_answers.split(max_batch)))

        def agreement(compiled, items):
            request = compiled.create_infer_request()
            hits = [(_top1(request, x) == y).float().mean().item() for x, y in items]
            return float(np.mean(hits)), hits

        started = time.perf_counter()
        quantized = nncf.quantize_with_accuracy_control(
            fp32, nncf.Dataset(list(calibration.split(1)), lambda x: x.numpy()),
            nncf.Dataset(batches, lambda item: item), agreement, max_drop=MAX_AGREEMENT_DROP,
            subset_size=len(calibration))
        seconds = time.perf_counter() - started
        quantizers = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
        summary = {"weights_sha256": weights_sha256, "calibration_images": len(calibration),
                   "control_images": len(control), "max_agreement_drop": MAX_AGREEMENT_DROP,
                   "control_agreement": round(agreement(core.compile_model(quantized, "CPU", f32), batches)[0], 4),
                   "quantizers": quantizers, "seconds": round(seconds, 1), "nncf": nncf.__version__}
        for key, value in summary.items():
            quantized.set_rt_info(str(value), ["cifar100", key])
        ov.save_model(quantized, str(out), compress_to_fp16=False)
    log(f"int8: {quantizers} quantizers kept, agreement with fp32 on {len(control)} control training images "
        f"{summary['control_agreement']:.4f}, {seconds:.0f} s")
    return summary


def _top1(request, images: torch.Tensor) -> torch.Tensor:
    """The top-1 answers of an OpenVINO infer request on one batch."""
    return torch.from_numpy(request.infer({0: images.numpy()})[0].copy()).argmax(1)


def _answers(compiled, images: torch.Tensor, batch: int) -> torch.Tensor:
    request = compiled.create_infer_request()
    return torch.cat([_top1(request, x) for x in images.split(batch)])


def main(argv: list[str] | None = None) -> int:
    from handler.cifar100_handler import serving_model
    from model.normalization import normalize
    from training.data import default_data_dir

    parser = cli.Parser("training.quantize", __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, nargs="?", default=DEFAULT_WEIGHTS)
    parser.add_argument("--data-dir", default=default_data_dir())
    args = parser.parse_args(argv)
    model = serving_model(torch.load(args.weights, map_location="cpu", weights_only=True))
    calibration, control = control_images(args.data_dir)
    out = args.weights.resolve().parent / ENGINE_INT8_FILE
    quantize(model, hashlib.sha256(args.weights.read_bytes()).hexdigest(), normalize(calibration).contiguous(),
             normalize(control).contiguous(), out)
    print(f"wrote {out} (+ .bin); now `python -m training.engines {args.weights}` measures it on the test split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
