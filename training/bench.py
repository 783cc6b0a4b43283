"""Training throughput, plain fp32 eager loop vs the project's fast path, side by side.

`make bench-train` runs this. Both loops include their data loading:
- plain: torchvision CIFAR100 + per-image PIL RandomCrop/Flip/ToTensor/Normalize through a
  DataLoader (2 workers), fp32, NCHW, eager (the seed's loop);
- fast: what training.train does: uint8 tensors augmented a batch at a time, channels_last,
  and the mixed precision its --amp auto picks: bf16/fp16 on CUDA, bf16 on CPUs with native
  bf16, fp32 elsewhere (emulated bf16 is much slower than fp32: benchmarks/RESULTS.md).
Figures are images/s over timed steps after warm-up steps. Other processes on the machine
lower both columns; the ratio, measured side by side, is the figure to quote.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from model import CIFAR100_MEAN, CIFAR100_STD, CIFAR100Model
from training.data import batches, data_error, default_data_dir, downscale, load_split, normalize
from training.runtime import pick_amp, pick_device, user_errors
from serving import cli


def _step(model, opt, x, y, autocast_dtype, device_type):
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_plain(width, data_dir, batch_size, warmup, steps, device):
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import CIFAR100

    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])
    try:
        dataset = CIFAR100(data_dir, train=True, transform=tf)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted": say which, and what to do
        raise data_error(data_dir, True, err) from err
    loader = DataLoader(dataset, batch_size=batch_size,
                        shuffle=True, num_workers=2, drop_last=True, persistent_workers=False)
    model = CIFAR100Model(width=width).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    it = iter(loader)
    for _ in range(warmup):
        x, y = next(it)
        _step(model, opt, x.to(device), y.to(device), None, device.type)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        _step(model, opt, x.to(device), y.to(device), None, device.type)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def bench_fast(width, data_dir, batch_size, warmup, steps, device, amp_dtype, channels_last=True, compile=False,
               res=32, split=None):
    """Training images/s of training.train's loop; ``split`` (images, labels) saves loading it again."""
    images, labels = split if split is not None else load_split(data_dir, train=True)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=gen)
    model = CIFAR100Model(width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    net = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    it = batches(images, labels, order, batch_size, gen, augment=True, drop_last=True)
    for _ in range(warmup):
        x, y, _ = next(it)
        _step(net, opt, downscale(normalize(x, device, channels_last), res), y.to(device), amp_dtype, device.type)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y, _ = next(it)
        _step(net, opt, downscale(normalize(x, device, channels_last), res), y.to(device), amp_dtype, device.type)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@user_errors
def main(argv=None):
    p = cli.Parser("training.bench", __doc__)
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--widths", type=cli.positive_int, nargs="+", default=[2, 4, 10])
    p.add_argument("--batch-size", type=cli.positive_int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=cli.positive_int, default=10)
    p.add_argument("--only", choices=["plain", "fast"], default=None)
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                   help="the fast path's mixed precision, as training.train --amp (default: %(default)s)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the fast path's memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's network")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, metavar="PX",
                   help="the fast path only, at each of these training resolutions (training.train --min-res): "
                        "images/s and cost per image relative to the last one given, e.g. 16 24 32")
    plan = p.add_argument_group("planning a budgeted run (training.train's options, as that run will use them)")
    plan.add_argument("--plan-minutes", type=float, default=None, metavar="M",
                      help="measure every resolution the schedule uses and one evaluation, then print the most "
                           "--epochs that fit M minutes of wall time on this machine (evaluations included)")
    plan.add_argument("--min-res", type=int, default=32)
    plan.add_argument("--res-ramp", type=int, nargs=2, metavar=("START", "END"), default=None,
                      help="training.train's --res-ramp (default: its own, half-way to 85%% of the epochs)")
    plan.add_argument("--eval-every", type=int, default=1)
    plan.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                      help="as training.train's --ema (its default): the final evaluation then scores the raw "
                           "and the EMA weights, twice the time")
    plan.add_argument("--train-images", type=int, default=50_000, help="45000 with --holdout 5000")
    plan.add_argument("--test-images", type=int, default=10_000, help="5000 with --holdout 5000")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device("auto")
    amp = pick_amp(args.amp, device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"steps={args.steps} (after {args.warmup} warm-up); fast path: amp={amp or 'fp32'} "
          f"channels_last={args.channels_last} compile={args.compile}")
    if args.plan_minutes is not None:
        return plan_budget(args, device, amp)
    if args.resolutions:
        return bench_resolutions(args, device, amp)
    print(f"{'width':>5} {'plain fp32 img/s':>17} {'fast img/s':>11} {'speed-up':>9}")
    for width in args.widths:
        plain = fast = float("nan")
        if args.only in (None, "plain"):
            plain = bench_plain(width, args.data_dir, args.batch_size, args.warmup, args.steps, device)
        if args.only in (None, "fast"):
            fast = bench_fast(width, args.data_dir, args.batch_size, args.warmup, args.steps, device, amp,
                              args.channels_last, args.compile)
        print(f"{width:>5} {plain:>17.1f} {fast:>11.1f} {fast / plain:>8.2f}x", flush=True)


def bench_resolutions(args, device, amp) -> None:
    """The fast path at each resolution, measured one after the other in this process: what a
    --min-res epoch costs against a full-resolution one (the figure a budget is planned with)."""
    print(f"{'width':>5} {'res':>4} {'fast img/s':>11} {'cost per image':>15}")
    split = load_split(args.data_dir, train=True)
    for width in args.widths:
        rates = {res: bench_fast(width, args.data_dir, args.batch_size, args.warmup, args.steps, device, amp,
                                 args.channels_last, args.compile, res, split) for res in args.resolutions}
        reference = rates[args.resolutions[-1]]
        for res, rate in rates.items():
            print(f"{width:>5} {res:>4} {rate:>11.1f} {reference / rate:>14.2f}x", flush=True)


def evaluation_seconds(width, data_dir, device, amp, channels_last, n_images, n_timed=2000) -> tuple[float, float]:
    """Seconds for one per-epoch evaluation of n_images (the run's mixed precision) and for the final
    one (float32, plain and with flip TTA: training.train's finish()), timed on n_timed test images (on
    n_images when fewer: timing more than the run scores only costs time)."""
    from training.evaluation import predict_logits

    n_timed = max(1, min(n_timed, n_images))
    images, labels = load_split(data_dir, train=False)
    images, labels = images[:n_timed], labels[:n_timed]
    model = CIFAR100Model(width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    seconds = {}
    for name, dtype, tta in (("epoch", amp, False), ("final", None, False), ("final_tta", None, True)):
        predict_logits(model, images[:500], labels[:500], 500, device, dtype, tta, channels_last)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        predict_logits(model, images, labels, 500, device, dtype, tta, channels_last)
        _sync(device)
        seconds[name] = (time.perf_counter() - t0) * n_images / n_timed
    return seconds["epoch"], seconds["final"] + seconds["final_tta"]


def plan_budget(args, device, amp) -> None:
    """The most epochs of a training.train run that fit --plan-minutes here: each epoch at the
    resolution train_resolution() gives it, measured; evaluations every --eval-every epochs."""
    from training.train import FULL_RES, evaluated, train_resolution

    sizes = sorted({args.min_res, FULL_RES} | {r for r in range(4, FULL_RES + 1, 4) if r > args.min_res})
    split = load_split(args.data_dir, train=True)
    for width in args.widths:
        rates = {res: bench_fast(width, args.data_dir, args.batch_size, args.warmup, args.steps, device, amp,
                                 args.channels_last, args.compile, res, split) for res in sizes}
        eval_s, final_s = evaluation_seconds(width, args.data_dir, device, amp, args.channels_last, args.test_images)
        final_s *= 2 if args.ema else 1  # finish() scores the raw weights and, with --ema, the EMA's too

        def minutes(epochs: int) -> float:
            run = argparse.Namespace(min_res=args.min_res, res_ramp=args.res_ramp, epochs=epochs,
                                     eval_every=args.eval_every)
            train_s = sum(args.train_images / rates[train_resolution(e, run)] for e in range(1, epochs + 1))
            evals = sum(1 for e in range(1, epochs + 1) if evaluated(e, run))
            return (train_s + evals * eval_s + final_s) / 60

        print(f"width {width}: training img/s " + ", ".join(f"{r} px {v:.0f}" for r, v in rates.items())
              + f"; an evaluation of {args.test_images} images {eval_s:.1f} s, the final one {final_s:.1f} s")
        shortest = args.res_ramp[1] if args.res_ramp else 1  # a fixed ramp must end inside the run
        fits = [e for e in range(shortest, 2000) if minutes(e) <= args.plan_minutes]
        if not fits:
            print(f"width {width}: not even {shortest} epoch(s) fit {args.plan_minutes:g} min ({minutes(shortest):.1f} min)")
            continue
        best = fits[-1]
        ramp = f" --res-ramp {args.res_ramp[0]} {args.res_ramp[1]}" if args.res_ramp else ""
        print(f"width {width}: --epochs {best} --min-res {args.min_res}{ramp} --eval-every {args.eval_every}: "
              f"{minutes(best):.2f} min estimated (budget {args.plan_minutes:g}; {best + 1} epochs: "
              f"{minutes(best + 1):.2f} min)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
