"""Train CIFAR100Model on CIFAR-100 (train split), evaluate on the test split every epoch.

    python -m training.train --data-dir ../shared/data --width 2 --epochs 8 --out runs/w2
    torchrun --nproc-per-node 2 -m training.train ...      # DistributedDataParallel (--batch-size per process, --lr as given)

The defaults are the seed's recipe (SGD momentum 0.9, weight decay 5e-4, lr 0.1, cosine
decay, 100 epochs, batch 128, crop with 4-pixel padding, horizontal flip) plus tricks that
buy accuracy per minute on short runs (label smoothing, warm-up, an EMA of the weights,
flip test-time augmentation): each one is an option.

Files written to --out (only by rank 0): checkpoint.pt after every finished epoch (written
to a temporary file, then renamed, so Ctrl-C never leaves a broken one), and at the end
CIFAR100_model.pth (a plain state dict, loadable by the seed's notebook), metrics.json and
training_curves.png. --resume continues exactly where the checkpoint stopped, with its run's options
(repeat none; one given again wins, except a --width or --num-classes the weights cannot take), in the
checkpoint's folder unless --out says otherwise. A fresh run into an --out that holds a checkpoint is
refused: --resume it, or --overwrite it; so is a --resume PATH into an --out that holds another run's.

--time-budget M replaces --epochs with wall-clock minutes: the learning rate and the progressive
resizing follow the share of the budget spent, not of the epochs done, and the run stops (mid-epoch
if it must) when the budget less the final evaluation's measured cost is spent. The same command
then fits its budget on a host twice as fast or half as fast; the epochs it reaches are recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from model import CIFAR100Model
from training.data import DataError, batches, default_data_dir, downscale, load_split, normalize, subset
from training.distillation import SoftLabelError, kd_loss, load_soft_labels
from training.evaluation import accuracy, predict_logits, topk_correct
from training.runtime import (DEVICE_HELP, atomic_save, atomic_write, code_version, device_argument, hardware, pick_amp,
                              pick_device, progress_argument, show_progress)
from serving import cli

FULL_RES = 32  # CIFAR's own size: what the network is evaluated and served at
DEFAULT_OUT = "runs/latest"
# Settings a checkpoint must share with the run that resumes it: the network's shape, and which training
# images are held out (a changed --holdout would train on images its curve was scored on, or the reverse).
_SHAPE_KEYS = ("width", "num_classes", "holdout")
_UNRECORDED = {"holdout": 0}  # what a checkpoint written before --holdout existed ran with


class ConfigError(RuntimeError):
    """The options (or a checkpoint) cannot work; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser("training.train", __doc__)
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=default_data_dir(),
                   help="folder holding cifar-100-python/ (env CIFAR100_DATA; default: %(default)s)")
    d.add_argument("--download", action="store_true", help="download CIFAR-100 if missing (needs internet)")
    d.add_argument("--train-subset", type=cli.positive_int, default=None, help="train on a fixed random subset of N images")
    d.add_argument("--test-subset", type=cli.positive_int, default=None, help="evaluate on a fixed random subset of N images (the same draw whatever --seed)")
    d.add_argument("--holdout", type=int, default=0,
                   help="set aside N training images (the same draw for every run) and evaluate on them instead "
                        "of the test split: for choosing a recipe without looking at the test split")
    m = p.add_argument_group("model")
    m.add_argument("--width", type=cli.positive_int, default=10, help="width multiplier k (channels 16k/32k/64k)")
    m.add_argument("--num-classes", type=cli.positive_int, default=100)
    m.add_argument("--dropout", type=cli.fraction, default=0.3)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=cli.positive_int, default=100)
    o.add_argument("--time-budget", type=cli.positive_float, default=None, metavar="MINUTES",
                   help="instead of --epochs: train for this many minutes of wall time, the final evaluation "
                        "included; the schedules follow the time spent, as many epochs as the host allows")
    o.add_argument("--batch-size", type=cli.positive_int, default=128, help="images per step per process")
    o.add_argument("--lr", type=cli.positive_float, default=0.1,
                   help="peak learning rate (as given whatever the number of torchrun processes)")
    o.add_argument("--momentum", type=cli.fraction, default=0.9)
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    o.add_argument("--weight-decay", type=cli.non_negative_float, default=5e-4)
    o.add_argument("--schedule", choices=["cosine", "onecycle"], default="cosine",
                   help="cosine: warm-up then cosine to 0; onecycle: warm-up then linear to 0")
    o.add_argument("--warmup-epochs", type=cli.non_negative_float, default=1.0, help="linear warm-up from lr/10 (0: none)")
    o.add_argument("--label-smoothing", type=cli.fraction, default=0.1)
    o.add_argument("--mixup", type=cli.non_negative_float, default=0.0, help="MixUp with this Beta alpha (0: off)")
    o.add_argument("--cutmix", type=cli.non_negative_float, default=0.0,
                   help="CutMix with this Beta alpha (0: off; with --mixup too, each batch gets one of the two)")
    o.add_argument("--mix-prob", type=cli.probability, default=1.0, help="share of batches MixUp/CutMix is applied to")
    o.add_argument("--soft-labels", default=None, metavar="FILE",
                   help="distil from teachers' stored logits on the training split (python -m training.distillation)")
    o.add_argument("--kd-weight", type=float, default=0.9,
                   help="with --soft-labels: the loss is this share of the soft-target loss, the rest cross-entropy")
    o.add_argument("--kd-temperature", type=float, default=4.0, help="with --soft-labels: the softmax temperature")
    o.add_argument("--min-res", type=int, default=FULL_RES,
                   help="progressive resizing: the first epochs train on crops downscaled to this many pixels "
                        "a side (cheaper steps), growing to 32 over --res-ramp; evaluation is always at 32 "
                        "(default: %(default)s, off)")
    o.add_argument("--res-ramp", type=cli.positive_int, nargs=2, metavar=("START", "END"), default=None,
                   help="epochs (counted from 1) where the resolution leaves --min-res and reaches 32, linearly, "
                        "in steps of 4 pixels (default: half and 85%% of --epochs)")
    o.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an exponential moving average of the weights and export it")
    o.add_argument("--ema-decay", type=cli.fraction, default=0.998, help="EMA decay per step")
    o.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="flip test-time augmentation in the final evaluation (per-epoch figures are without)")
    e = p.add_argument_group("speed")
    e.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    e.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                   help="auto: bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    e.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--compile", action="store_true", help="torch.compile the network")
    e.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: torch's choice)")
    e.add_argument("--eval-batch-size", type=cli.positive_int, default=500)
    e.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate every N epochs and after the last (an evaluation of the test split costs "
                        "about a tenth of an epoch on a CPU: budgeted runs buy epochs with it)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=DEFAULT_OUT,
                   help="output folder (default: %(default)s; with --resume PATH: PATH's folder)")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, in its folder unless --out is given "
                        "(default: a fresh run; --resume alone: OUT/checkpoint.pt)")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds a checkpoint, or continue --resume PATH's run there "
                        "(OUT's files are replaced as this run writes its own)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    progress_argument(r)
    r.add_argument("--max-epochs-this-run", type=cli.positive_int, default=None,
                   help="stop after this many epochs (the schedule still spans --epochs; resume later)")
    return p


# ----------------------------------------------------------------------------- helpers
def decay(progress: float, schedule: str) -> float:
    """The learning rate's share of its peak after the warm-up, `progress` 0..1 through the decay."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, total: int, warmup: int, schedule: str, spent: float | None = None) -> float:
    """The learning rate's share of its peak at `step` of `total`: a linear warm-up over `warmup`
    steps, then the decay. In a --time-budget run `spent` (0..1, the budget's share spent) places
    the decay instead of the step count: its warm-up ends a few percent into it, so the decay
    starts there at just under the peak."""
    if warmup and step < warmup:
        return 0.1 + 0.9 * step / warmup
    if spent is not None:
        return decay(spent, schedule)
    return decay((step - warmup) / max(total - warmup, 1), schedule)


def res_ramp(args) -> tuple[int, int]:
    """--res-ramp, or its default: the resolution starts growing half-way and is full at 85% of the
    epochs, so the last sixth trains at the served resolution (FixRes: the network must see 32-pixel
    images before it is evaluated on them)."""
    if args.res_ramp is not None:
        return tuple(args.res_ramp)
    return max(1, round(0.5 * args.epochs)), max(1, round(0.85 * args.epochs))


# A --time-budget run's resolution ramp, as shares of its time: where the epoch default's ramp (half
# and 85% of the epochs) fell in the time of a --min-res 16 run (runs/w3-res16-e47-kd: 34% and 68%).
BUDGET_RES_RAMP = (0.35, 0.7)


def ramped_resolution(position: float, start: float, end: float, min_res: int) -> int:
    """min_res until `start`, FULL_RES from `end`, linear between, rounded to a multiple of 4."""
    if min_res >= FULL_RES or position >= end:  # first: a run too short for a ramp still ends at full size
        return FULL_RES
    if position <= start:
        return min_res
    res = min_res + (FULL_RES - min_res) * (position - start) / (end - start)
    return min(FULL_RES, max(min_res, 4 * round(res / 4)))


def train_resolution(epoch: int, args, spent: float | None = None) -> int:
    """Training crops' side in pixels for epoch `epoch` (counted from 1), or in a --time-budget run
    for an epoch starting when the share `spent` of the budget is spent."""
    if spent is not None:
        return ramped_resolution(spent, *BUDGET_RES_RAMP, args.min_res)
    return ramped_resolution(epoch, *res_ramp(args), args.min_res)


def evaluated(epoch: int, args) -> bool:
    """Whether epoch `epoch` (counted from 1) ends with an evaluation: every --eval-every, and the last."""
    return epoch % args.eval_every == 0 or epoch == args.epochs


def check_options(args) -> None:
    if args.eval_every < 1:
        raise ConfigError(f"--eval-every {args.eval_every}: needs 1 or more epochs")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ConfigError(f"--time-budget {args.time_budget}: needs a number of minutes above 0")
    if args.time_budget is not None and args.res_ramp is not None:
        raise ConfigError("--res-ramp counts epochs; a --time-budget run ramps the resolution over "
                          f"{BUDGET_RES_RAMP[0]:.0%}..{BUDGET_RES_RAMP[1]:.0%} of its time: drop one of the two")
    if args.soft_labels and (args.mixup or args.cutmix):
        raise ConfigError("--soft-labels with --mixup/--cutmix: a mixed image has no stored teacher logits")
    if not 0 <= args.kd_weight <= 1 or args.kd_temperature <= 0:
        raise ConfigError(f"--kd-weight {args.kd_weight} / --kd-temperature {args.kd_temperature}: "
                          "needs a weight in 0..1 and a temperature above 0")
    if args.nesterov and args.momentum == 0:
        raise ConfigError("--momentum 0 with Nesterov momentum (the default): give a momentum above 0, "
                          "or --no-nesterov for plain SGD")
    if not 8 <= args.min_res <= FULL_RES:
        raise ConfigError(f"--min-res {args.min_res}: needs 8..{FULL_RES} pixels")
    if args.res_ramp is not None:
        start, end = args.res_ramp
        if not 1 <= start <= end <= args.epochs:
            raise ConfigError(f"--res-ramp {start} {end}: needs 1 <= START <= END <= --epochs ({args.epochs})")


def settle_options(args, given: set[str] | None) -> None:
    """The run's length (a --time-budget run has no --epochs) and check_options."""
    if args.time_budget is not None and given is not None and "epochs" in given:
        raise ConfigError("--epochs and --time-budget both set the run's length: pass one")
    if args.time_budget is not None:
        args.epochs = None  # the budget decides how many; metrics.json's history says how many it made
    check_options(args)


def save_curves(history: list[dict], path: Path, scored_on: str = "test split") -> None:
    """The loss and accuracy curves; `scored_on` (evaluated_on) names what the per-epoch figures
    are measured on: a --holdout run's are not the test split's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a1.set_xlabel("epoch"); a1.set_ylabel("loss"); a1.grid(alpha=0.3); a1.legend()
    a2.plot(ep, [h["train_top1"] for h in history], "o-", label="train top-1 (augmented)")
    tested = [h for h in history if h["test_top1"] is not None]  # --eval-every skips some epochs
    a2.plot([h["epoch"] for h in tested], [h["test_top1"] for h in tested], "o-", label=f"top-1, {scored_on}")
    a2.plot([h["epoch"] for h in tested], [h["test_top5"] for h in tested], "o-", label=f"top-5, {scored_on}")
    small = [h["epoch"] for h in history if h.get("train_res", FULL_RES) < FULL_RES]
    if small:  # progressive resizing: the test figures of those epochs are at a size not trained on
        a2.axvspan(min(small) - 0.5, max(small) + 0.5, color="0.85", label=f"trained below {FULL_RES} px")
    a2.set_xlabel("epoch"); a2.set_ylabel("accuracy (%)"); a2.grid(alpha=0.3); a2.legend()
    fig.suptitle("CIFAR100Model training")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError) for a bad file
        raise ConfigError(f"--resume: cannot read {path} ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or not {"epoch", "args", "model", "optimizer"} <= checkpoint.keys():
        raise ConfigError(f"--resume: {path} is not a training checkpoint (a CIFAR100_model.pth holds "
                          "weights only; resume from the checkpoint.pt beside it)")
    return checkpoint


def check_compatible(checkpoint: dict, args) -> None:
    saved = checkpoint["args"]
    for key in _SHAPE_KEYS:
        if (trained := saved.get(key, _UNRECORDED.get(key))) != getattr(args, key):
            raise ConfigError(
                f"checkpoint was trained with --{key.replace('_', '-')} {trained}, this run asks for "
                f"{getattr(args, key)}: pass the same value, or a different --out to start afresh")


# Options of this session, not of the run: a resumed run takes them from its command line.
_SESSION_KEYS = {"resume", "max_epochs_this_run", "progress", "out", "overwrite", "download", "data_dir",
                 "threads", "device", "compile", "eval_batch_size"}


def changed_options(checkpoint: dict, args, world: int = 1) -> list[str]:
    """Options that differ from the checkpoint's run (allowed, but the run no longer repeats it exactly), and
    the number of processes (`world`; unknown in checkpoints written before it was recorded)."""
    saved = checkpoint["args"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in vars(args).items()
               if k not in _SESSION_KEYS and k in saved and saved[k] != v]
    if checkpoint.get("world", world) != world:
        # The step index is epoch * steps_per_epoch + i: the lr goes on where the epochs put it, no jump.
        changed.append(f"processes {checkpoint['world']} -> {world} ({world} x --batch-size images a step, "
                       "the lr as given; the lr schedule follows the epochs, so it carries on without a jump)")
    return changed


def run_folder(args, given: set[str] | None) -> Path:
    """The checkpoint this run resumes from or would replace. A --resume PATH without --out continues in
    PATH's folder (sets args.out), not in the default one. A fresh run, or a --resume PATH into another
    --out, refuses to replace a checkpoint there unless --overwrite says so."""
    if args.resume not in (None, "auto") and given is not None and "out" not in given:
        args.out = str(Path(args.resume).parent)
    own = Path(args.out) / "checkpoint.pt"
    path = own if args.resume in (None, "auto") else Path(args.resume)
    resumes_elsewhere = args.resume is not None and own.exists() and path.exists() and not own.samefile(path)
    if args.resume is not None and args.overwrite and not resumes_elsewhere:
        raise ConfigError("--resume continues the checkpoint, --overwrite starts afresh: pass one")
    if args.resume is None and not args.overwrite and path.exists():
        raise ConfigError(f"{path} holds an earlier run: continue it with --resume, start afresh over it with "
                          "--overwrite, or pass another --out")
    if resumes_elsewhere and not args.overwrite:
        raise ConfigError(f"--resume {path} --out {args.out}: {own} holds another run, which this one would replace: "
                          f"leave out --out to continue in {path.parent}, pass another --out, or --overwrite to "
                          "replace that run")
    return path


# Session options the printed resume command repeats when this session set them (the checkpoint records
# them, but --resume does not take them from it: see _SESSION_KEYS). Not --download: the data is there by then.
_RESUMED_SESSION_OPTIONS = ("data_dir", "threads", "device", "compile", "eval_batch_size", "progress",
                            "max_epochs_this_run")


def launcher() -> list[str]:
    """The words before `-m training.train` that start a run as this one was started: torchrun's, with as
    many processes per node, when torchrun started it (one process would be another recipe: --batch-size
    is per process); torchrun beside this interpreter, else this interpreter's torch.distributed.run."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun in every process it starts
        return [cli.python_command()]
    per_node = ["--nproc-per-node", os.environ.get("LOCAL_WORLD_SIZE", "1")]
    torchrun = Path(sys.executable).with_name("torchrun") if sys.executable else None
    if torchrun is not None and torchrun.is_file():
        return [cli.typed_path(torchrun)] + per_node
    return [cli.python_command(), "-m", "torch.distributed.run"] + per_node


def resume_command(args) -> str:
    """The command line that continues this run: its launcher (this interpreter, or torchrun), --out when it is
    not the default, and the session options (data folder, threads, device ...) that differ from their defaults."""
    words = launcher() + ["-m", "training.train", "--resume"]
    if os.path.normpath(args.out) != os.path.normpath(DEFAULT_OUT):
        words += ["--out", str(args.out)]
    defaults = build_parser().parse_args([])
    for key in _RESUMED_SESSION_OPTIONS:
        value = getattr(args, key, getattr(defaults, key))
        if value != getattr(defaults, key):
            option = key.replace("_", "-")
            if value is True:
                words.append(f"--{option}")
            elif value is False:  # a --no-X flag (BooleanOptionalAction) given
                words.append(f"--no-{option}")
            else:
                words += [f"--{option}", str(value)]
    return shlex.join(words)


def given_options(argv: list[str] | None) -> set[str]:
    """The options this command line sets itself (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resumed_args(checkpoint: dict, args, given: set[str]) -> argparse.Namespace:
    """The checkpoint run's options, except this session's own and those the command line gives."""
    merged = dict(vars(args))
    for key, value in checkpoint["args"].items():
        if key in merged and key not in _SESSION_KEYS and key not in given:
            merged[key] = value
    saved_data = checkpoint["args"].get("data_dir")
    if "data_dir" not in given and saved_data and not has_cifar100(merged["data_dir"]) and has_cifar100(saved_data):
        merged["data_dir"] = saved_data  # the default finds no data here, the run's own folder still has it
    return argparse.Namespace(**merged)


def has_cifar100(folder: str) -> bool:
    return (Path(folder) / "cifar-100-python").is_dir()


# ----------------------------------------------------------------------------- training
@dataclass
class Run:
    """One run's settings and the record it keeps: what each epoch, the checkpoint and finish() read."""
    args: argparse.Namespace
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world: int = 1
    code_version: str = "unknown"  # taken at the start: the code that ran, not the checkout at the end
    resumed_from_code_version: str | None = None
    steps_per_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0  # training wall time, earlier sessions of a resumed run included
    mix: object = None  # MixUp/CutMix (batch_mixer), or None
    teacher: dict | None = None  # --soft-labels: the file's record (teachers' sha256), for metrics.json
    # --time-budget: the seconds the training may take (the budget less the final evaluation's
    # estimate), the clock's origin (perf_counter at this session's start, less the earlier
    # sessions' wall time) and whether the budget is spent.
    train_budget_s: float | None = None
    final_evaluation_estimate_s: float | None = None
    clock_origin: float = 0.0
    budget_spent: bool = False

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    def elapsed(self) -> float:
        """Wall time of the run so far, earlier sessions of a resumed run included."""
        return time.perf_counter() - self.clock_origin

    def spent(self) -> float | None:
        """The share of a --time-budget run's training time spent (rank 0's clock, so every process
        stops at the same step); None without a budget."""
        if self.train_budget_s is None:
            return None
        share = self.elapsed() / self.train_budget_s
        if self.distributed:
            shared = torch.tensor([share], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, src=0)
            share = shared.item()
        return share


def launched_as_rank_zero() -> bool:
    """Whether torchrun started this process as rank 0 (or nothing did): the one that speaks for the run before
    the process group exists (init_distributed) and after it is gone."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(args) -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when torchrun started several processes."""
    device = pick_device(args.device)
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def load_data(run: Run):
    """(train images, train labels, test images, test labels, teacher logits of the training images or
    None), subsets as asked; the images on the GPU when training runs there."""
    args = run.args
    # With --download only rank 0 fetches; the others wait for it rather than race on the files.
    if args.download and run.distributed and not run.main_process:
        dist.barrier()
    train_x, train_y = load_split(args.data_dir, True, args.download, offer_download=True)
    # The teacher's logits follow the training images through the holdout and the subset.
    teacher = None
    if args.soft_labels:
        teacher, run.teacher = load_soft_labels(args.soft_labels, train_y)
    ids = torch.arange(len(train_y))
    if args.holdout:
        train_x, train_y, test_x, test_y = holdout_split(train_x, train_y, args.holdout)
        ids = holdout_split(ids, ids, args.holdout)[0]
    else:
        test_x, test_y = load_split(args.data_dir, False, args.download, offer_download=True)
    train_x, train_y = subset(train_x, train_y, args.train_subset, args.seed)
    ids = subset(ids, ids, args.train_subset, args.seed)[0]
    teacher = teacher[ids] if teacher is not None else None
    # One draw whatever --seed (seed 1: what seed-0 runs drew, and training.evaluate's), so arms compare alike.
    test_x, test_y = subset(test_x, test_y, args.test_subset, 1)
    if args.download and run.distributed and run.main_process:
        dist.barrier()
    if int(train_y.max()) >= args.num_classes:
        raise ConfigError(f"labels go up to {int(train_y.max())} but --num-classes is {args.num_classes}")
    if run.device.type == "cuda":
        # The whole split as uint8 is 150 MB: kept on the GPU, batches are cropped and flipped
        # there, and the host never feeds images step by step.
        # Labels stay on the host: the accuracy counts are taken there.
        train_x, test_x = train_x.to(run.device), test_x.to(run.device)
    return train_x, train_y, test_x, test_y, teacher


HOLDOUT_SEED = 20261129  # one draw for every run, whatever its --seed: arms of an ablation compare alike


def holdout_split(images, labels, n: int):
    """(train images, train labels, held-out images, held-out labels): n training images set aside."""
    if not 0 < n < len(labels):
        raise ConfigError(f"--holdout {n}: needs 0 < N < {len(labels)} training images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return images[order[n:]], labels[order[n:]], images[order[:n]], labels[order[:n]]


def batch_mixer(args):
    """torchvision's MixUp / CutMix on normalized batches (soft targets), or None when both are off."""
    if not (args.mixup or args.cutmix):
        return None
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=args.mixup, num_classes=args.num_classes)] if args.mixup else []) + (
        [v2.CutMix(alpha=args.cutmix, num_classes=args.num_classes)] if args.cutmix else [])
    mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
    return v2.RandomApply([mixer], p=args.mix_prob) if args.mix_prob < 1 else mixer


def restore(checkpoint: dict, run: Run, model, ema, optimizer, scaler) -> tuple[int, float]:
    """Load a checkpoint's state into the run; returns (epochs done, wall time spent so far)."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    saved_scaler = checkpoint.get("scaler") or {}
    if saved_scaler and scaler.is_enabled():
        scaler.load_state_dict(saved_scaler)
    elif scaler.is_enabled() and run.main_process:
        # A run that was bf16 or float32 kept no loss scale (a disabled GradScaler saves {}): an
        # --amp fp16 given on resume, or amp=auto picking fp16 on another GPU, starts a fresh one.
        print("note: the checkpoint has no fp16 loss scale (it ran without fp16): starting a fresh one", flush=True)
    if ema is not None and checkpoint.get("ema") is not None:
        ema.load_state_dict(checkpoint["ema"])
    run.history = checkpoint["history"]
    run.resumed_from_code_version = checkpoint.get("code_version")
    run.budget_spent = checkpoint.get("budget_spent", False)
    return checkpoint["epoch"], checkpoint.get("wall_time_s", 0.0)


def train_one_epoch(run: Run, net, model, ema, criterion, optimizer, scaler, loader, epoch: int) -> dict:
    """One pass over the loader's batches; returns the epoch's training loss, top-1 and images/s
    (summed over every process)."""
    args, device, amp_dtype = run.args, run.device, run.amp_dtype
    total_steps = run.steps_per_epoch * (args.epochs or 0)  # no --epochs in a --time-budget run
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    net.train()
    t0 = time.perf_counter()
    seen = 0
    # Summed on the device; read back only for the bar, so a GPU is not stalled every step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    budget = f" of {args.time_budget:g} min" if args.time_budget else f"/{args.epochs}"
    bar = tqdm(loader, total=run.steps_per_epoch, desc=f"epoch {epoch + 1}{budget}", unit="batch",
               disable=not (show_progress(args.progress) and run.main_process), dynamic_ncols=True)
    res = train_resolution(epoch + 1, args, run.spent())
    for i, (x, y, teacher) in enumerate(bar):
        step = epoch * run.steps_per_epoch + i
        spent = run.spent()
        if spent is not None and spent >= 1 and i > 0:
            # The epoch ends here. An epoch begun takes one step at least, so the last one
            # recorded is always the one the run ends with, scored whatever --eval-every says.
            run.budget_spent = True
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, total_steps, warmup_steps, args.schedule, spent)
        x, y = normalize(x, device, args.channels_last), y.to(device, non_blocking=True)
        x = downscale(x, res)  # after crop + flip, on the whole batch
        target = y
        if run.mix is not None:
            x, target = run.mix(x, y)  # soft targets; the training top-1 still counts the hard labels
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = net(x)
            loss = criterion(logits.float(), target)
            if teacher is not None:
                loss = (1 - args.kd_weight) * loss + args.kd_weight * kd_loss(
                    logits.float(), teacher.to(device, non_blocking=True), args.kd_temperature)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if i % 10 == 0 or i == run.steps_per_epoch - 1:
            # Checked here rather than every step: reading the loss back stalls a GPU. A
            # diverged run is caught within 10 steps, before the epoch's checkpoint.
            if not torch.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {i}: lower --lr")
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{seen * run.world / (time.perf_counter() - t0):.0f}",
                            **({"spent": f"{spent:.0%}"} if spent is not None else {}))
    bar.close()
    train_time = time.perf_counter() - t0
    # On run.device: nccl (torchrun on GPUs) all-reduces CUDA tensors only.
    stats = torch.tensor([loss_sum.item(), correct.item(), seen], dtype=torch.float64, device=device)
    if run.distributed:
        dist.all_reduce(stats)
    return {"train_loss": stats[0].item() / stats[2].item(), "train_top1": 100 * stats[1].item() / stats[2].item(),
            "train_img_per_s": stats[2].item() / train_time, "train_res": res, "steps": seen // args.batch_size}


def evaluate(run: Run, model, images, labels) -> dict:
    """Top-1/top-5 on the test images: each process scores every world-th image, counts are summed.
    Every process scores rank 0's network: the one checkpoint.pt saves."""
    if run.distributed:
        # DDP keeps the parameters equal, but each rank updates BatchNorm's running statistics (and the
        # EMA's copy of them) from its own batches: without this the figure mixes differently
        # normalised networks. Training is unchanged: DDP sends rank 0's buffers before each forward.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    idx = torch.arange(run.rank, len(labels), run.world)
    # No flip-TTA here: it doubles the per-epoch cost; finish() measures it once at the end.
    logits = predict_logits(model, images[idx], labels[idx], run.args.eval_batch_size, run.device,
                            run.amp_dtype, False, run.args.channels_last)
    c = topk_correct(logits, labels[idx])
    counts = torch.tensor([c[1], c[5], len(idx)], dtype=torch.float64, device=run.device)  # nccl: CUDA tensors only
    if run.distributed:
        dist.all_reduce(counts)
    return {"top1": 100 * counts[0].item() / counts[2].item(), "top5": 100 * counts[1].item() / counts[2].item()}


# Writing the last checkpoint, the curves (twice) and metrics.json: ~0.5 s on 2 CPU cores, kept 4x.
SAVING_S = 2.0


def final_evaluation_estimate(run: Run, model, ema, test_x, test_y) -> float:
    """Seconds a --time-budget run keeps for after its last step: the last epoch's evaluation and
    finish()'s float32 passes (plain and flip-TTA, for the raw weights and the EMA's), each timed on
    one batch after a warm-up batch (a tenth more for the rest of the split's batches), and the saving."""
    n = min(len(test_y), run.args.eval_batch_size)

    def per_image(amp_dtype) -> float:
        sample = lambda: predict_logits(model, test_x[:n], test_y[:n], n, run.device, amp_dtype, False,
                                        run.args.channels_last)
        sample()
        t0 = time.perf_counter()
        sample()
        return (time.perf_counter() - t0) / n

    passes = 3 * (2 if ema is not None else 1)  # plain: 1 forward pass, flip-TTA: 2
    return 1.1 * len(test_y) * (passes * per_image(None) + per_image(run.amp_dtype)) + SAVING_S


def save_checkpoint(run: Run, epoch: int, model, ema, optimizer, scaler) -> None:
    """checkpoint.pt after a finished epoch: everything --resume needs to repeat the run exactly."""
    atomic_save({"epoch": epoch, "args": vars(run.args), "code_version": run.code_version,
                 "model": model.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "history": run.history, "wall_time_s": run.wall_time_s, "budget_spent": run.budget_spent,
                 "world": run.world},
                run.out / "checkpoint.pt")


@dataclass
class Session:
    """What main() says after Ctrl-C needs: whether OUT/checkpoint.pt is this run's (this session saved it or
    resumed from it), or still the one an --overwrite run replaces."""
    owns_checkpoint: bool = False


def finished_metrics(checkpoint: dict, args) -> dict | None:
    """The metrics.json in OUT of a resumed run that had trained all its --epochs and written them (the same
    history as the checkpoint's); else None: not finished, a --time-budget run (a larger budget continues it),
    or one stopped before its final evaluation was written, which is then run again."""
    if args.time_budget is not None or checkpoint["epoch"] != args.epochs:
        return None
    try:
        metrics = json.loads((Path(args.out) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("history") == checkpoint["history"] else None


def train(args, given: set[str] | None = None, session: Session | None = None) -> dict:
    """One run. With --resume, options not in `given` (the command line's own; None: all of them)
    are the checkpoint's. `session` (main's) is told when OUT/checkpoint.pt becomes this run's."""
    session = session if session is not None else Session()
    if args.resume is None:
        # Before the run folder: an impossible option is what a fresh run's user is told first, not that
        # OUT holds an earlier run (which --overwrite would get past only to be refused for the option).
        settle_options(args, given)
    ckpt_path = run_folder(args, given)
    own = Path(args.out) / "checkpoint.pt"
    session.owns_checkpoint = args.resume is not None and own.exists() and ckpt_path.exists() and own.samefile(ckpt_path)
    checkpoint = None
    if args.resume is not None:
        # Before the data load: a wrong checkpoint is reported at once, not minutes later.
        checkpoint = load_checkpoint(ckpt_path)
        if given is not None:
            args = resumed_args(checkpoint, args, given)
        check_compatible(checkpoint, args)
        settle_options(args, given)  # a resumed run's options are the checkpoint's, merged above
        if (metrics := finished_metrics(checkpoint, args)) is not None:  # before the data load: nothing to do
            if launched_as_rank_zero():
                print(f"already finished: {args.epochs} of {args.epochs} epochs; nothing to resume (top-1 "
                      f"{metrics['top1']:.2f}%, {Path(args.out) / 'metrics.json'})", flush=True)
            return metrics
    device, rank, world = init_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 32x32 inputs: the autotuned kernels pay off
    run = Run(args, device, pick_amp(args.amp, device), rank, world, code_version())
    run.mix = batch_mixer(args)
    out = run.out
    if run.main_process:
        try:  # before the data load: an OUT that cannot be a folder is reported at once
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out {out}: cannot make the run's folder ({err.strerror})") from None
    if checkpoint is not None and run.main_process and (changed := changed_options(checkpoint, args, world)):
        print("note: resuming with changed options: " + ", ".join(changed), flush=True)

    train_x, train_y, test_x, test_y, teacher = load_data(run)

    torch.manual_seed(args.seed)
    model = CIFAR100Model(width=args.width, num_classes=args.num_classes, dropout=args.dropout).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True) if args.ema else None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.nesterov, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)

    sampler = DistributedSampler(range(len(train_y)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    run.steps_per_epoch = len(sampler) // args.batch_size
    if run.steps_per_epoch == 0:
        raise ConfigError(f"{len(train_y)} training images over {world} process(es) make no full batch of {args.batch_size}")

    start_epoch, elapsed_before = 0, 0.0
    if checkpoint is not None:
        start_epoch, elapsed_before = restore(checkpoint, run, model, ema, optimizer, scaler)
        if run.main_process:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}", flush=True)
        saved_budget = checkpoint["args"].get("time_budget")
        if run.budget_spent and args.time_budget is not None and saved_budget is not None:
            if args.time_budget > saved_budget:
                run.budget_spent = False  # an option given again wins: the larger budget continues the run
                said = (f"note: the run's {saved_budget:g} min budget was spent; continuing to {args.time_budget:g} min "
                        "(the lr and the resolution follow the share of the new budget spent: the lr rises again)")
            else:
                args.time_budget = saved_budget  # metrics.json keeps the budget the run was trained to
                said = (f"note: the run is done: its {saved_budget:g} min budget was spent ({start_epoch} epochs); "
                        "nothing to train (a larger --time-budget continues it), its final evaluation is written again")
            if run.main_process:
                print(said, flush=True)
        elif start_epoch == args.epochs and args.time_budget is None and run.main_process:
            print(f"note: the run is done: all {start_epoch} epochs trained; nothing to train, its final evaluation "
                  "is written again (OUT has no metrics.json of it)", flush=True)

    if args.time_budget is not None:
        run.final_evaluation_estimate_s = final_evaluation_estimate(run, model, ema, test_x, test_y)
        if run.distributed:  # rank 0's figure for all: every process must refuse, or none
            shared = torch.tensor([run.final_evaluation_estimate_s], dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            run.final_evaluation_estimate_s = shared.item()
        run.train_budget_s = 60 * args.time_budget - run.final_evaluation_estimate_s
        if run.train_budget_s <= 0:  # no time to train: the share spent would never reach 1
            raise ConfigError(f"--time-budget {args.time_budget:g}: {60 * args.time_budget:.1f} s leaves no time to "
                              f"train after the {run.final_evaluation_estimate_s:.1f} s the final evaluation takes "
                              "on this host: give more minutes")
        if run.main_process:
            print(f"time budget {args.time_budget:g} min: {run.train_budget_s / 60:.1f} min of training, "
                  f"{run.final_evaluation_estimate_s:.0f} s kept for the final evaluation", flush=True)

    net = model
    if args.compile:
        net = torch.compile(net)
    if run.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if run.main_process:
        print(f"device={device} amp={run.amp_dtype} world={world} width={args.width} "
              f"train={len(train_y)} test={len(test_y)} ({evaluated_on(args, len(test_y))}) "
              f"steps/epoch={run.steps_per_epoch}", flush=True)

    run.clock_origin = time.perf_counter() - elapsed_before
    # A --time-budget run has no last epoch: the budget ends it (range's end is only a bound).
    length = sys.maxsize if args.time_budget is not None else args.epochs
    stop_at = length if args.max_epochs_this_run is None else min(length, start_epoch + args.max_epochs_this_run)
    for epoch in range(start_epoch, stop_at):
        if run.budget_spent:
            break
        # Every epoch draws its randomness from (seed, epoch, rank) alone, so a resumed run
        # repeats an uninterrupted one exactly. The rank term gives DDP replicas different crops
        # and dropout masks; rank 0 draws what a single-process run draws.
        torch.manual_seed(args.seed * 100_003 + epoch + 7_919 * rank)
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch + 7_919 * rank)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)))
        loader = batches(train_x, train_y, order, args.batch_size, gen, augment=True, drop_last=True,
                         per_image=teacher)
        t0 = time.perf_counter()
        trained = train_one_epoch(run, net, model, ema, criterion, optimizer, scaler, loader, epoch)
        if evaluated(epoch + 1, args) or run.budget_spent:
            test = evaluate(run, ema.module if ema is not None else model, test_x, test_y)
        else:
            test = {"top1": None, "top5": None}
        record = {
            "epoch": epoch + 1, "lr_end": optimizer.param_groups[0]["lr"],
            "train_loss": trained["train_loss"], "train_top1": trained["train_top1"],
            "test_top1": test["top1"], "test_top5": test["top5"],
            "epoch_time_s": time.perf_counter() - t0, "train_img_per_s": trained["train_img_per_s"],
            "train_res": trained["train_res"], "steps": trained["steps"],
        }
        run.history.append(record)
        run.wall_time_s = run.elapsed()
        if run.main_process:
            print(json.dumps(record), flush=True)
            save_checkpoint(run, epoch + 1, model, ema, optimizer, scaler)
            session.owns_checkpoint = True
            save_curves(run.history, out / "training_curves.png", evaluated_on(args, len(test_y)))

    result = {}
    done = run.budget_spent if args.time_budget is not None else stop_at == args.epochs
    if done and run.main_process:
        run.wall_time_s = run.elapsed()
        result = finish(run, model, ema, test_x, test_y)
    elif run.main_process:  # --max-epochs-this-run ended this session, not the run
        of = f"{args.epochs}" if args.time_budget is None else f"a {args.time_budget:g} min budget"
        print(f"stopped after epoch {stop_at} of {of}; continue with: {resume_command(args)}", flush=True)
    if run.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def finish(run: Run, model, ema, test_x, test_y) -> dict:
    """Export the seed-compatible state dict and measure what EMA and flip-TTA bought."""
    args, out = run.args, run.out
    t0 = time.perf_counter()
    exported = ema.module if ema is not None else model
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
             for k, v in exported.state_dict().items()}
    atomic_save(state, out / "CIFAR100_model.pth")
    ablation = {}
    candidates = {"raw": model} | ({"ema": ema.module} if ema is not None else {})
    for name, net in candidates.items():
        for tta in (False, True):
            # In float32 whatever precision trained it: the handler and training.evaluate run the
            # exported weights in float32, and the recorded figures must be the ones they
            # reproduce (the shipped-model test allows 0.1 point).
            logits = predict_logits(net, test_x, test_y, args.eval_batch_size, run.device, None, tta, args.channels_last)
            ablation[f"{name}{'+flip_tta' if tta else ''}"] = accuracy(logits, test_y)
    final_key = ("ema" if ema is not None else "raw") + ("+flip_tta" if args.tta else "")
    metrics = {
        "top1": ablation[final_key]["top1"], "top5": ablation[final_key]["top5"],
        "evaluated_as": final_key, "evaluated_on": evaluated_on(args, len(test_y)), "test_images": len(test_y),
        "weights": "CIFAR100_model.pth", "weights_are": "ema" if ema is not None else "raw",
        "final_evaluation": ablation, "history": run.history, "wall_time_s": run.wall_time_s,
        "hardware": hardware(run.device, run.world), "args": vars(args), "code_version": run.code_version,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if run.teacher is not None:
        metrics["soft_labels"] = run.teacher  # which teachers taught it (their weights' sha256)
    metrics["final_evaluation_s"] = time.perf_counter() - t0
    if args.time_budget is not None:
        # The budget's own check: wall_time_s + final_evaluation_s against 60 * minutes.
        metrics["time_budget"] = {"minutes": args.time_budget, "epochs": len(run.history),
                                  "final_evaluation_estimate_s": run.final_evaluation_estimate_s}
    if run.resumed_from_code_version is not None and run.resumed_from_code_version != run.code_version:
        metrics["resumed_from_code_version"] = run.resumed_from_code_version
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    save_curves(run.history, out / "training_curves.png", evaluated_on(args, len(test_y)))
    budget = (f" (budget {args.time_budget:g} min: {len(run.history)} epochs)" if args.time_budget is not None else "")
    print(f"done: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}% ({final_key}, {metrics['evaluated_on']}), wall time "
          f"{run.wall_time_s / 60:.1f} min + final evaluation {metrics['final_evaluation_s']:.0f} s{budget} -> {out}",
          flush=True)
    return metrics


def evaluated_on(args, images: int) -> str:
    """What the per-epoch and final figures are measured on (``test_*`` keys either way), ``images`` of them:
    a --test-subset run's are not the whole test split's, nor the whole holdout's (a --test-subset larger than
    either is all of it)."""
    if args.holdout:  # --test-subset draws from the held-out images
        of = f"{images} of a " if images < args.holdout else ""
        return f"{of}holdout of {args.holdout} training images"
    return f"test subset of {images} images" if args.test_subset == images else "test split"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    session = Session()
    try:
        train(args, given_options(argv), session)  # sets args.out when --resume PATH names the folder
    except (DataError, ConfigError, SoftLabelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the run diverged: not a usage error, the last epoch's checkpoint is intact
        print(f"error: {err}; the last finished epoch's checkpoint is left as it was", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches every process torchrun started: rank 0 alone speaks for the run.
        if not launched_as_rank_zero():
            return 130
        own = Path(args.out) / "checkpoint.pt"
        if session.owns_checkpoint:
            print(f"\ninterrupted: the last finished epoch's checkpoint is intact; continue with: {resume_command(args)}",
                  file=sys.stderr)
        elif own.exists() and args.resume is not None:  # --resume A --out B --overwrite: B's is the replaced run's
            print(f"\ninterrupted before this run saved an epoch: {own} is still the run it replaces; continue from "
                  f"{args.resume} by running the same command again", file=sys.stderr)
        elif own.exists():  # --overwrite: OUT's is the earlier run's, which this one was replacing
            print(f"\ninterrupted before the first epoch ended: no checkpoint of this run yet ({own} is the earlier "
                  "run's): start afresh with the same command", file=sys.stderr)
        else:
            print("\ninterrupted before the first epoch ended: no checkpoint to continue from", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
