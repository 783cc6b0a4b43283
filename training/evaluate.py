"""Score a CIFAR100_model.pth on the full CIFAR-100 test split: the figures a model card needs.

    python -m training.evaluate model/weights/CIFAR100_model.pth --data-dir ../shared/data
    python -m training.evaluate runs/w2/CIFAR100_model.pth --no-tta --json report.json

Reports top-1 and top-5, per-class accuracy (best and worst five) and the most confused class
pairs. The network's width and class count are read off the state dict, so any width loads. A
training checkpoint (checkpoint.pt) is accepted too: its EMA weights when it has them, as the
final export would be. Exit status 2 with one clear line for a missing or incompatible file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from model import display_name, load_class_names, load_network
from training.data import default_data_dir, load_split, subset
from training.evaluation import (accuracy, confusion_matrix, most_confused_pairs, per_class_accuracy,
                                 predict_logits, EVAL_BATCH_SIZE)
from training.runtime import DEVICE_HELP, device_argument, pick_device, user_errors
from serving import cli


def evaluate(model, images, labels, class_names, batch_size=EVAL_BATCH_SIZE, device="cpu", tta=True, top_pairs=10) -> dict:
    """Every figure of the report, as plain JSON-able values."""
    device = torch.device(device)
    model = model.to(device).to(memory_format=torch.channels_last)
    logits = predict_logits(model, images, labels, batch_size, device, None, tta, True)
    num_classes = model.num_classes
    acc = accuracy(logits, labels)
    per_class = per_class_accuracy(logits, labels, num_classes)
    support = torch.bincount(labels, minlength=num_classes)
    confusion = confusion_matrix(logits, labels, num_classes)
    names = class_names if len(class_names) == num_classes else [str(i) for i in range(num_classes)]
    classes = [{"index": i, "name": names[i], "display_name": display_name(names[i]),
                "accuracy": round(float(per_class[i]), 4), "test_images": int(support[i])}
               for i in range(num_classes)]
    pairs = [{"true": names[t], "predicted": names[p], "true_display": display_name(names[t]),
              "predicted_display": display_name(names[p]), "count": c,
              "share_of_true_class": round(100.0 * c / max(int(support[t]), 1), 4)}
             for t, p, c in most_confused_pairs(confusion, top_pairs)]
    return {"top1": acc["top1"], "top5": acc["top5"], "test_images": len(labels), "flip_tta": tta,
            "width": model.width, "num_classes": num_classes, "per_class": classes,
            "most_confused": pairs}


def format_report(report: dict, weights: str) -> str:
    ranked = sorted((c for c in report["per_class"] if c["test_images"]), key=lambda c: (-c["accuracy"], c["index"]))
    lines = [
        f"{weights}: CIFAR100Model width {report['width']}, {report['num_classes']} classes, "
        f"{report['test_images']} test images, flip TTA {'on' if report['flip_tta'] else 'off'}",
        f"top-1 {report['top1']:.2f}%   top-5 {report['top5']:.2f}%",
        "",
        "best classes:  " + ", ".join(f"{c['display_name']} {c['accuracy']:.0f}%" for c in ranked[:5]),
        "worst classes: " + ", ".join(f"{c['display_name']} {c['accuracy']:.0f}%" for c in ranked[::-1][:5]),
        "",
        "most confused (true -> predicted: images, share of the true class):",
    ]
    lines += [f"  {p['true_display']:>18} -> {p['predicted_display']:<18} {p['count']:4d}  "
              f"{p['share_of_true_class']:.0f}%" for p in report["most_confused"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser("training.evaluate", __doc__)
    p.add_argument("weights", help="CIFAR100_model.pth (state dict) or a training checkpoint.pt")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="folder holding cifar-100-python/ (env CIFAR100_DATA; default: %(default)s)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="average with the mirrored image (the served handler does too only when handler.flip_tta is "
                        "on in model-config.yaml, off by default; --no-tta gives the float32 answers its engines "
                        "are held to without it)")
    p.add_argument("--json", metavar="OUT", help="also write the full report (every class) as JSON here")
    p.add_argument("--batch-size", type=cli.positive_int, default=EVAL_BATCH_SIZE)
    p.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    p.add_argument("--test-subset", type=cli.positive_int, default=None,
                   help="score a fixed random subset of N test images (quick checks; not for model cards)")
    p.add_argument("--pairs", type=cli.positive_int, default=10, help="how many confused pairs to list")
    return p


@user_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    # Weights first: a wrong file is reported before the (slower) data load.
    model = load_network(args.weights)
    images, labels = subset(*load_split(args.data_dir, train=False), args.test_subset, seed=1)
    report = evaluate(model, images, labels, load_class_names(), args.batch_size, device, args.tta, args.pairs)
    report["weights"] = str(args.weights)
    report["weights_sha256"] = hashlib.sha256(Path(args.weights).read_bytes()).hexdigest()  # which file the figures are of
    print(format_report(report, args.weights))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
