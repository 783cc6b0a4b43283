"""What a training-side command needs from the machine and the checkout: the device, the mixed
precision, a description of the hardware, the code version, saving files atomically, and turning a
user's ordinary mistakes (a wrong weights file, no data) into one line.

Shared by the ``training.*`` command lines.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from model import WeightsError, network_from_state_dict, read_state_dict
from training.data import DataError


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


def progress_argument(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress: tqdm bars, by default only on a terminal (a log gets no \\r bars)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bars (default: only when stderr is a terminal, never into a log file)")


def show_progress(progress: bool | None) -> bool:
    """Whether to draw bars: --progress / --no-progress when given, else whether stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


def pick_device(name: str) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU.
    A plain ``cuda`` is this process's GPU too: under torchrun every rank would otherwise take GPU 0."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
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
        # Not emulated bf16 (pre-Ampere GPUs report it by default): fp16 runs in their hardware.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    # Without native bf16 (no AVX512-BF16/AMX) autocast bf16 is emulated and much slower than
    # fp32 (benchmarks/RESULTS.md), so fp32 is the fast path there. Not mkldnn's own check: it
    # says yes on any AVX-512 CPU, emulation included. Imported here: the serving side's module.
    from handler.engine import native_bf16

    return torch.bfloat16 if native_bf16(device) else None


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


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file, then rename: an interrupted write never replaces a good file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C, a full disk, a folder in the way: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: Path) -> None:
    """torch.save, whole or not at all (atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def served_weights(path: str | Path) -> dict:
    """The state dict of a weights file the handler can serve, checked to load into the network. A
    training checkpoint is refused: what the calling command writes (calibration, engines) is keyed to
    the sha256 of the served file."""
    state = read_state_dict(path, checkpoint=False)
    network_from_state_dict(state, f"'{path}'")
    return state


def user_errors(main):
    """A command's ``main(argv)``: the ordinary mistakes (a missing or wrong weights file, no CIFAR-100
    under --data-dir, a path that cannot be read or written) end as one ``error:`` line on stderr and
    exit status 2, as a usage error does, not as a traceback."""
    @functools.wraps(main)
    def checked(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (WeightsError, DataError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return checked
