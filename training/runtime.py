"""What a training-side command needs from the machine and the checkout: the device, the mixed
precision, a description of the hardware, the code version, and saving files atomically.

Shared by ``training.train``, ``training.export`` and ``training.bench``.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path

import torch


DEVICE_HELP = "auto (cuda if present, else cpu), cpu, cuda, cuda:1 ..."


def device_argument(name: str) -> str:
    """``--device``'s argparse type: ``name`` unchanged when this machine has that device, else a usage
    error that says what it has (not a CUDA traceback at the first tensor)."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device: auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{name!r}: this project runs on cpu or cuda only")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has no CUDA GPU that torch {torch.__version__} "
                                         f"can use: use cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return name


def pick_device(name: str) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    return torch.device(name)


def pick_amp(name: str, device: torch.device):
    """The autocast dtype for ``--amp`` (None: float32)."""
    if name == "off":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Without native bf16 (no AVX512-BF16/AMX) autocast bf16 is emulated and much slower than
    # fp32 (benchmarks/RESULTS.md), so fp32 is the fast path there.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def code_version() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files differ from it."""
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware(device: torch.device, world: int) -> dict:
    """Where a run ran (recorded in metrics.json)."""
    info = {"device": str(device), "processes": world, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted save never replaces a good file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
