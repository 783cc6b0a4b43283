"""Multi-process training through torchrun: DistributedDataParallel on the CPU with gloo.

Two processes on this machine stand in for several GPUs or machines (the code path is the
same apart from the nccl backend and the device, which need GPUs): it must finish, only rank 0
may write files, and the metrics must count both processes' images.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from model import CIFAR100Model
from serving import cli

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_gloo_stop_and_resume_within_a_time_budget(tmp_path, cifar100_data_dir):
    """Two sessions of one budgeted run: --max-epochs-this-run 1 stops the first, whose continue line (torchrun's,
    not one process's) runs the second to the budget's end. Rank 0's clock decides for all: a rank that stopped on
    its own clock would leave the other waiting in an all-reduce (the timeouts below would catch that hang). One
    test for both (two torchrun starts, not four: ~15 s less)."""
    out, budget_s = tmp_path / "ddp", 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.train", "--data-dir", str(cifar100_data_dir), "--train-subset", "512", "--test-subset", "200",
           "--width", "1", "--batch-size", "64", "--time-budget", str(budget_s / 60), "--max-epochs-this-run", "1",
           "--no-ema", "--no-tta", "--threads", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    stopped = [line for line in first.stdout.splitlines() if line.startswith("stopped after epoch 1 of a ")]
    assert len(stopped) == 1, first.stdout[-3000:]  # rank 0's alone
    continue_with = stopped[0].split("continue with: ", 1)[1]
    launcher = cli.typed_path(Path(sys.executable).with_name("torchrun"), ROOT)
    assert continue_with.startswith(f"{launcher} --nproc-per-node 2 -m training.train --resume --out {out}"), stopped

    # The line keeps this session's options: run to the budget's end without its one-epoch stop, as a user would.
    assert continue_with.endswith(" --max-epochs-this-run 1"), continue_with
    # PET_STANDALONE: --standalone (a free port) for the printed command, as the first session had.
    proc = subprocess.run(shlex.split(continue_with.removesuffix(" --max-epochs-this-run 1")), cwd=ROOT,
                          env={**env, "PET_STANDALONE": "1"},
                          capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    # Rank 0 alone writes and reports: one set of files, one start line, one result line.
    assert sorted(p.name for p in out.iterdir()) == [
        "CIFAR100_model.pth", "checkpoint.pt", "metrics.json", "training_curves.png"]
    assert proc.stdout.count("world=2") == 1, log[-3000:]
    assert proc.stdout.count("done: top-1") == 1, log[-3000:]
    # 512 images over 2 processes at 64 per process: 4 steps each.
    assert "steps/epoch=4" in proc.stdout.split()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hardware"]["processes"] == 2
    assert metrics["test_images"] == 200
    assert len(metrics["history"]) >= 2
    for epoch in metrics["history"]:
        assert 3.0 < epoch["train_loss"] < 6.0  # about ln(100) = 4.6 after a few steps, and finite
        assert 0.0 <= epoch["test_top1"] <= epoch["test_top5"] <= 100.0
        assert epoch["train_img_per_s"] > 0
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert metrics["wall_time_s"] + metrics["final_evaluation_s"] <= budget_s + 2  # both sessions' time
    assert metrics["history"][-1]["lr_end"] < 0.1 * metrics["args"]["lr"]  # annealed to the budget's end

    state = torch.load(out / "CIFAR100_model.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the network's names, not DDP's wrapper's
    CIFAR100Model(width=1).load_state_dict(state, strict=True)
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == len(metrics["history"])
