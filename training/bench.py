"""Training throughput, plain fp32 eager loop vs the project's fast path, side by side.

`make bench-train` runs this. Both loops include their data loading:
- plain: torchvision CIFAR100 + per-image PIL RandomCrop/Flip/ToTensor/Normalize through a
  DataLoader (2 workers), fp32, NCHW, eager (the seed's loop);
- fast: uint8 tensors augmented per batch, channels_last, bf16 autocast (CPU) or the CUDA
  equivalent, the same optimizer step as training.train.
Figures are images/s over timed steps after warm-up steps.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from model import CIFAR100_MEAN, CIFAR100_STD, CIFAR100Model
from training.data import batches, default_data_dir, load_split, normalize


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
    loader = DataLoader(CIFAR100(data_dir, train=True, transform=tf), batch_size=batch_size,
                        shuffle=True, num_workers=2, drop_last=True, persistent_workers=False)
    model = CIFAR100Model(width).to(device).train()
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


def bench_fast(width, data_dir, batch_size, warmup, steps, device, amp_dtype):
    images, labels = load_split(data_dir, train=True)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=gen)
    model = CIFAR100Model(width).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    it = batches(images, labels, order, batch_size, gen, augment=True, drop_last=True)
    for _ in range(warmup):
        x, y = next(it)
        _step(model, opt, normalize(x, device), y.to(device), amp_dtype, device.type)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        _step(model, opt, normalize(x, device), y.to(device), amp_dtype, device.type)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4, 10])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--only", choices=["plain", "fast"], default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"steps={args.steps} (after {args.warmup} warm-up)")
    print(f"{'width':>5} {'plain fp32 img/s':>17} {'fast img/s':>11} {'speed-up':>9}")
    for width in args.widths:
        plain = fast = float("nan")
        if args.only in (None, "plain"):
            plain = bench_plain(width, args.data_dir, args.batch_size, args.warmup, args.steps, device)
        if args.only in (None, "fast"):
            fast = bench_fast(width, args.data_dir, args.batch_size, args.warmup, args.steps, device, amp)
        print(f"{width:>5} {plain:>17.1f} {fast:>11.1f} {fast / plain:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
