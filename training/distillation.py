"""Knowledge distillation from stored teacher logits: make them once, train any number of students.

    python -m training.distillation TEACHER.pth [TEACHER.pth ...] --out runs/teachers.pt
    python -m training.train ... --soft-labels runs/teachers.pt [--kd-weight 0.9 --kd-temperature 4]

The file holds, for every image of the CIFAR-100 *training* split in its official order, the mean of
the teachers' logits with flip test-time augmentation (the student's crops and flips move a
32-pixel image by at most 4 pixels: a label fitted to the whole image stays a fair target), as
float16, with the sha256 of each teacher's weights, of the training labels it was made for, and the
precision the teachers ran in (``--amp``, as training.train's: bf16 where the CPU has it natively,
a GPU's when there is one). No test image is ever read.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from serving import cli

FORMAT = "cifar100-soft-labels-v1"


class SoftLabelError(RuntimeError):
    """The soft-label file cannot teach this run; the message says why."""


def labels_sha256(labels: torch.Tensor) -> str:
    return hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def teacher_logits(weights: list[Path], images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                   device: torch.device = torch.device("cpu"), amp_dtype: torch.dtype | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Mean flip-TTA logits of the teachers [N, classes], float32 on the CPU (the forward passes in
    amp_dtype's autocast when given); ``progress``: a tqdm bar over the images, every teacher's."""
    from tqdm import tqdm

    from model import load_network
    from training.evaluation import predict_logits

    models = [load_network(path) for path in weights]  # every file checked before the minutes of inference
    chunk = 4 * batch_size  # the bar moves every few seconds; the logits are the same as in one call
    total = None
    with tqdm(total=len(models) * len(labels), desc="teachers' logits", unit="img", disable=not progress) as bar:
        for model in models:
            model = model.to(device)
            parts = []
            for start in range(0, len(labels), chunk):
                parts.append(predict_logits(model, images[start:start + chunk], labels[start:start + chunk],
                                            batch_size, device, amp_dtype, True, True))
                bar.update(len(parts[-1]))
            logits = torch.cat(parts)
            total = logits if total is None else total + logits
    return total / len(weights)


def load_soft_labels(path: str | Path, train_labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(teacher logits [N, classes] float32 for the full training split, the file's record)."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError, OSError) for a bad file
        first_line = (str(err).strip().splitlines() or [""])[0]  # weights_only's refusals run to paragraphs
        raise SoftLabelError(f"--soft-labels {path}: cannot read it ({type(err).__name__}: {first_line})") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("logits"), torch.Tensor):
        raise SoftLabelError(f"--soft-labels {path}: not a file of python -m training.distillation")
    if record.get("labels_sha256") != labels_sha256(train_labels):
        raise SoftLabelError(f"--soft-labels {path}: made for other training labels than this data's")
    return record.pop("logits").float(), record


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: KL(teacher || student) at the temperature, times T^2 so its
    gradients keep their size whatever T."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def main(argv: list[str] | None = None) -> int:
    from model import WeightsError
    from training.data import DataError, default_data_dir, load_split
    from training.evaluation import accuracy
    from training.runtime import (DEVICE_HELP, atomic_save, device_argument, pick_amp, pick_device, progress_argument,
                                  show_progress)

    parser = cli.Parser("training.distillation", __doc__.split("\n\n")[0])
    parser.add_argument("teachers", type=Path, nargs="+", help="CIFAR100_model.pth state dicts (any widths)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--out", type=Path, required=True, help="the soft-label file to write")
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    parser.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                        help="the teachers' mixed precision, as training.train --amp; off: float32")
    progress_argument(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    amp_dtype = pick_amp(args.amp, device)
    try:
        images, labels = load_split(args.data_dir, train=True)
        logits = teacher_logits(args.teachers, images, labels, device=device, amp_dtype=amp_dtype,
                                progress=show_progress(args.progress))
    except (DataError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    record = {"format": FORMAT, "logits": logits.half(), "labels_sha256": labels_sha256(labels),
              "teachers": [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                           for p in args.teachers],
              "precision": str(amp_dtype or torch.float32).removeprefix("torch."),
              "made_of": "mean logits with flip TTA, CIFAR-100 training split, official order"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(record, args.out)
    top1 = accuracy(logits, labels)["top1"]
    print(f"wrote {args.out}: {len(labels)} training images, {len(args.teachers)} teacher(s), "
          f"teachers' training top-1 {top1:.2f}% ({record['precision']} on {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
