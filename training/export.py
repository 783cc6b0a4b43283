"""Write a network's weights as a seed-format state dict, optionally in half precision.

    python -m training.export runs/w10/CIFAR100_model.pth model/weights/width10/CIFAR100_model.pth --dtype float16
    python -m training.export runs/w10/checkpoint.pt runs/w10/ema.pth          # a checkpoint's EMA weights
    python -m training.export runs/w10/checkpoint.pt runs/best/      # a folder (an existing one, or a trailing /): runs/best/CIFAR100_model.pth

Why float16: it halves the file (the width-10 network: 69 MB as float32, 35 MB as float16; the
repository takes files up to 40 MB, so only the float16 one fits), and loading it into the float32 network (``load_state_dict``
copies and casts) scores the same on the test split (benchmarks/RESULTS.md). The keys, shapes and
format stay the seed's. Integer buffers (BatchNorm's batch counters) keep their dtype. The file is checked to load strictly before it is
written, and is written atomically.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from model import network_from_state_dict, read_state_dict
from training.runtime import atomic_save, user_errors
from serving import cli

WEIGHTS_FILE = "CIFAR100_model.pth"  # the name inside a folder given as the output (the name training writes)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(state: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


@user_errors
def main(argv=None) -> int:
    p = cli.Parser("training.export", __doc__)
    p.add_argument("weights", help="CIFAR100_model.pth (state dict) or a training checkpoint.pt")
    p.add_argument("out", help=f"where to write the state dict (an existing folder, or one ending in /: {WEIGHTS_FILE} in it)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    state = convert(read_state_dict(args.weights), DTYPES[args.dtype])
    network_from_state_dict(state, source=str(args.weights))  # refuses anything the handler could not load
    # Path() drops a trailing slash: "runs/best/" for a folder not made yet would become a file named best.
    into_folder = args.out.endswith(("/", os.sep)) or Path(args.out).is_dir()
    out = Path(args.out) / WEIGHTS_FILE if into_folder else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({args.dtype}, {size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
