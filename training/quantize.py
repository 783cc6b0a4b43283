"""The int8 network of the ``openvino-int8`` engine: NNCF quantization, then trained to answer as fp32 does.

    python -m training.quantize [WEIGHTS] [--data-dir DIR] [--steps N] [--no-progress]

Quantizes the served network (BatchNorm folded) with NNCF on ``CALIBRATION_IMAGES`` training images: every
convolution and the classifier in int8; the stem and the Squeeze-and-Excitation gates stay float32 (tiny layers
whose rounding error scales every activation after them: the ones NNCF's accuracy control reverted first).
Then fine-tunes it quantization-aware: ``--steps`` batches of augmented training images, its logits pulled
toward fp32's (mean squared error: a logit gap kept is an answer kept). Never the test split: ``python -m
training.engines`` measures the result there (as served: with the rechecks, handler/engine.py), and the guard
decides.

Writes ``engine_int8.xml`` + ``engine_int8.bin`` beside the weights (serving/archive.py packs them when
they were made from exactly these weights: the IR's rt_info names their sha256). OpenVINO IR is the
same file on every CPU, so it is made once, here, and shipped: NNCF is needed only to make it.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from handler import engine as engines
from model.shipped import SHIPPED_WEIGHTS
from serving.settings import ENGINE_INT8_FILE
from serving import cli
from training.runtime import progress_argument, served_weights, show_progress, user_errors

CALIBRATION_IMAGES = 300   # NNCF's default subset size
CONTROL_IMAGES = 2000      # the agreement reported on training images (the test split is training.engines' job)
# Layers left float32 (NNCF's names): the stem convolution and the SE gates' two small linears.
FLOAT_LAYERS = (r"stem/.*", r".*/se/.*")
# Quantization-aware fine-tuning: ~77k augmented training images, Adam with a cosine decay from QAT_LR.
QAT_STEPS, QAT_BATCH, QAT_LR = 1200, 64, 1e-4
SEED = 1  # the draw of training images (engine_inputs.pt uses seed 0)


def control_images(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration, control, all training images): the first two disjoint random draws, all uint8."""
    from training.data import load_split

    images, _ = load_split(data_dir, train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
    return (images[order[:CALIBRATION_IMAGES]].clone(),
            images[order[CALIBRATION_IMAGES:CALIBRATION_IMAGES + CONTROL_IMAGES]].clone(), images)


def folded_network(state_dict: dict) -> torch.nn.Module:
    """The served arithmetic (each BatchNorm folded into the convolution before it, eval mode) in NCHW, the
    layout NNCF and OpenVINO's trace take (the handler's serving_model is the same network in channels_last)."""
    from model import fold_batchnorm, network_from_state_dict

    return fold_batchnorm(network_from_state_dict(state_dict))


def quantize(state_dict: dict, weights_sha256: str, calibration: torch.Tensor, control: torch.Tensor,
             training_images: torch.Tensor, out: Path, steps: int = QAT_STEPS, batch: int = QAT_BATCH,
             max_batch: int = 6, progress: bool = True, log=print) -> dict:
    """Write the int8 IR of the network to ``out`` (.xml, and its .bin); returns a summary.

    ``calibration`` and ``control``: normalized float images; ``training_images``: uint8, augmented here."""
    # NNCF builds its C++ extension with g++ the first time (cached in ~/.cache/torch_extensions): ~1 min on
    # 2 idle cores, past NNCF's own 60 s limit on a loaded machine.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    import nncf
    import openvino as ov

    teacher = folded_network(state_dict)
    started = time.perf_counter()
    student = nncf.quantize(copy.deepcopy(teacher), nncf.Dataset(list(calibration.split(1))),
                            subset_size=len(calibration), ignored_scope=nncf.IgnoredScope(patterns=list(FLOAT_LAYERS)))
    loss = fine_tune(student, teacher, training_images, steps, batch, progress)
    seconds = time.perf_counter() - started
    # The trace's self-check compares OpenVINO's FakeQuantize with NNCF's training-time rounding (they differ in
    # the last bits) and says so at length: the IR's own agreement is measured below instead.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        network = ov.convert_model(student.eval(), example_input=calibration[:2].contiguous(),
                                   input=[ov.PartialShape([ov.Dimension(1, max_batch), 3, 32, 32])])
    fp32 = teacher(control).argmax(1)
    served = engines._OpenVINOForward("f32", network)  # as the handler runs it (f32: the float layers stay float32)
    int8 = torch.cat([served(x).argmax(1) for x in control.split(max_batch)])
    quantizers = sum(op.get_type_name() == "FakeQuantize" for op in network.get_ordered_ops())
    summary = {"weights_sha256": weights_sha256, "calibration_images": len(calibration),
               "float_layers": " ".join(FLOAT_LAYERS), "qat_steps": steps, "qat_batch": batch,
               "qat_final_loss": round(loss, 5), "control_images": len(control),
               "control_agreement": round(float((int8 == fp32).float().mean()), 4),
               "quantizers": quantizers, "seconds": round(seconds, 1), "nncf": nncf.__version__}
    for key, value in summary.items():
        network.set_rt_info(str(value), ["cifar100", key])
    ov.save_model(network, str(out), compress_to_fp16=False)
    log(f"int8: {quantizers} quantizers, {steps} fine-tuning steps; agreement with fp32 on {len(control)} control "
        f"training images {summary['control_agreement']:.4f}; {seconds:.0f} s")
    return summary


def fine_tune(student: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor, steps: int, batch: int,
              progress: bool = True) -> float:
    """Quantization-aware training toward the teacher's logits; returns the last steps' mean loss."""
    from tqdm import tqdm

    from model.normalization import normalize
    from training.data import random_crop_flip

    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=QAT_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
    student.eval()  # dropout off (no BatchNorm is left): the quantizers' scales and the weights still learn
    recent: list[float] = []
    bar = tqdm(range(steps), desc="int8 fine-tuning", unit="batch", disable=not progress)
    for _ in bar:
        pick = torch.randint(0, len(images), (batch,), generator=generator)
        x = normalize(random_crop_flip(images[pick], generator), channels_last=False)
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(student(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    return sum(recent) / len(recent) if recent else float("nan")


@user_errors
def main(argv: list[str] | None = None) -> int:
    from model.normalization import normalize
    from training.data import default_data_dir

    parser = cli.Parser("training.quantize", __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, nargs="?", default=SHIPPED_WEIGHTS)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--steps", type=int, default=QAT_STEPS, help=f"fine-tuning batches of {QAT_BATCH} (0: none)")
    progress_argument(parser)
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps {args.steps}: needs 0 or more")
    state_dict = served_weights(args.weights)  # before the data load: a wrong file is named at once
    calibration, control, images = control_images(args.data_dir)
    out = args.weights.resolve().parent / ENGINE_INT8_FILE
    quantize(state_dict, hashlib.sha256(args.weights.read_bytes()).hexdigest(), normalize(calibration, channels_last=False),
             normalize(control, channels_last=False), images, out, steps=args.steps, progress=show_progress(args.progress))
    measure = cli.module_command("training.engines", args.weights)
    print(f"wrote {out} (+ .bin); now `{measure}` measures it on the test split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
