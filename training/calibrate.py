"""Temperature scaling for the shipped weights: honest probabilities and an "unsure" threshold.

The test split is cut in two fixed halves by image index: the temperature is fitted on the even
indices (5,000 images), and everything reported -- expected calibration error (ECE) before/after,
the reliability diagram, the "unsure" threshold -- comes from the odd indices (the other 5,000).
The ECE and NLL figures are held out; the unsure threshold is *chosen* on the odd half too, so its
share and accuracies (``unsure``) are in-sample: chosen on the even half, the shipped weights'
threshold would be 0.53 instead of 0.55 (model/README.md gives both).
The training split is never used (the network was fitted on it, so it is over-confident there).

    python -m training.calibrate [WEIGHTS] [--data-dir DIR]
    # writes <weights folder>/calibration.json and reliability.png

The same fit for flip test-time augmentation's averaged logits goes under ``flip_tta`` (the
handler's ``flip_tta`` setting uses it). The handler divides the logits by the temperature before the softmax (top-1 is unchanged: one
positive scale keeps the order), and marks an answer unsure when its calibrated probability is
below the threshold.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from model.shipped import SHIPPED_WEIGHTS
from serving.settings import CALIBRATION_FILE
from serving import cli
from training.runtime import served_weights, user_errors

RELIABILITY_FILE = "reliability.png"
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 ("On Calibration of Modern Neural Networks")
FIT_HALF, REPORT_HALF = "even", "odd"
# Candidate thresholds (calibrated top-1 probability), in steps of 0.01.
THRESHOLD_GRID = [round(0.01 * i, 2) for i in range(5, 96)]


def split_halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, report indices) of the test split: even and odd image indices."""
    idx = torch.arange(n)
    return idx[0::2], idx[1::2]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimizes the negative log-likelihood of softmax(logits / T)."""
    log_t = torch.zeros(1, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (of the top-1 answer)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (confidence > lo) & (confidence <= hi)
        count = int(inside.sum())
        bins.append({"low": round(lo, 4), "high": round(hi, 4), "count": count,
                     "confidence": float(confidence[inside].mean()) if count else None,
                     "accuracy": float(correct[inside].mean()) if count else None})
    return bins


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Sum over bins of (share of images in the bin) x |accuracy - mean confidence|."""
    n = len(labels)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(probs, labels, n_bins) if b["count"])


def choose_unsure_threshold(probs: torch.Tensor, labels: torch.Tensor, window: float = 0.1) -> dict:
    """The confidence from which answers are right more often than wrong.

    For each candidate t, the answers whose calibrated confidence lies within +-window/2 of t; the
    threshold is the smallest t at which those, and those of every larger t, are right at least
    half of the time. Below it the page says "Not sure -- maybe A or B"; from it on it states the answer.
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()

    def local_accuracy(t: float) -> float | None:
        near = (confidence >= t - window / 2) & (confidence < t + window / 2)
        return float(correct[near].mean()) if near.any() else None

    chosen = THRESHOLD_GRID[-1]
    for t in reversed(THRESHOLD_GRID):
        accuracy = local_accuracy(t)
        if accuracy is not None and accuracy < 0.5:
            break
        chosen = t
    below = confidence < chosen
    return {"threshold": chosen,
            "rule": f"smallest t from which answers within +-{window / 2:g} of each confidence >= t are right at least half of the time",
            "unsure_share": float(below.float().mean()),
            "unsure_accuracy": float(correct[below].mean()) if below.any() else None,
            "sure_accuracy": float(correct[~below].mean()) if (~below).any() else None}


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fit on the even half, report on the odd half (logits of the whole test split, in order)."""
    fit, report = split_halves(len(labels))
    temperature = fit_temperature(logits[fit], labels[fit])
    held_logits, held_labels = logits[report], labels[report]
    before = F.softmax(held_logits, dim=1)
    after = F.softmax(held_logits / temperature, dim=1)
    return {
        "temperature": round(temperature, 6),
        "fitted_on": f"test split, {FIT_HALF} indices ({len(fit)} images)",
        "reported_on": f"test split, {REPORT_HALF} indices ({len(report)} images)",
        "ece_bins": ECE_BINS,
        "held_out": {
            "images": len(report),
            "top1": float((held_logits.argmax(1) == held_labels).float().mean()),
            "ece_before": expected_calibration_error(before, held_labels),
            "ece_after": expected_calibration_error(after, held_labels),
            "nll_before": float(F.cross_entropy(held_logits, held_labels)),
            "nll_after": float(F.cross_entropy(held_logits / temperature, held_labels)),
            "bins_before": reliability_bins(before, held_labels),
            "bins_after": reliability_bins(after, held_labels),
        },
        "unsure": choose_unsure_threshold(after, held_labels),
    }


def plot_reliability(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = result["held_out"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "bins_before", f"softmax (ECE {held['ece_before']:.3f})"),
                           (axes[1], "bins_after", f"T = {result['temperature']:.3f} (ECE {held['ece_after']:.3f})")):
        bins = [b for b in held[key] if b["count"]]
        width = 1 / result["ece_bins"]
        ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
               edgecolor="black", color="#4c78a8", label="accuracy")
        ax.bar([b["low"] for b in bins], [b["confidence"] - b["accuracy"] for b in bins], width=width,
               bottom=[b["accuracy"] for b in bins], align="edge", color="#e45756", alpha=0.45,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.axvline(result["unsure"]["threshold"], color="gray", linestyle=":", label="unsure below")
        ax.set(title=title, xlabel="confidence of the top-1 answer", xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability on the held-out half of the CIFAR-100 test split ({held['images']} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def logits_on_test_split(weights: Path, data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain logits, flip-TTA logits, labels) of the served network (BN folded, as the handler runs it)
    on the whole test split; flip TTA averages with the mirror images', as ``handler.flip_tta`` serves."""
    from handler.engine import serving_model
    from training.data import load_split
    from training.evaluation import predict_plain_and_flip_tta_logits

    network = serving_model(served_weights(weights))  # before the data load: a wrong file is named at once
    images, labels = load_split(data_dir, train=False)
    return (*predict_plain_and_flip_tta_logits(network, images, labels), labels)


def flip_tta_entry(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The calibration of flip-TTA logits (averaged logits are sharper: another temperature), in brief."""
    fitted = calibrate(logits, labels)
    held = fitted["held_out"]
    return {"temperature": fitted["temperature"], "unsure": {"threshold": fitted["unsure"]["threshold"]},
            "held_out": {key: held[key] for key in ("images", "top1", "ece_before", "ece_after")}}


def _share(value: float | None) -> str:
    return "no answer" if value is None else f"{value:.1%}"  # None: no answer on that side of the threshold


def summary(result: dict) -> str:
    """One line of what calibrate() found (held-out figures, the unsure threshold)."""
    held, unsure = result["held_out"], result["unsure"]
    return (f"temperature {result['temperature']:.4f} (fitted on the even half); held-out odd half: "
            f"ECE {held['ece_before']:.4f} -> {held['ece_after']:.4f}, NLL {held['nll_before']:.4f} -> "
            f"{held['nll_after']:.4f}; unsure below {unsure['threshold']:.2f} (chosen on the odd half too: "
            f"in-sample): {unsure['unsure_share']:.1%} of "
            f"answers, right {_share(unsure['unsure_accuracy'])} of the time "
            f"(sure ones {_share(unsure['sure_accuracy'])})")


@user_errors
def main(argv: list[str] | None = None) -> int:
    from training.data import default_data_dir

    parser = cli.Parser("training.calibrate", __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, nargs="?",
                        default=SHIPPED_WEIGHTS)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--out-dir", type=Path, help="default: the weights' folder")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or args.weights.parent
    logits, tta_logits, labels = logits_on_test_split(args.weights, args.data_dir)
    result = calibrate(logits, labels)
    # The handler's flip_tta setting (model-config.yaml) serves averaged logits: fitted for them too.
    result["flip_tta"] = flip_tta_entry(tta_logits, labels)
    result["weights_sha256"] = hashlib.sha256(args.weights.read_bytes()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CALIBRATION_FILE).write_text(json.dumps(result, indent=2) + "\n")
    plot_reliability(result, out_dir / RELIABILITY_FILE)
    print(summary(result))
    tta = result["flip_tta"]
    print(f"flip TTA: temperature {tta['temperature']:.4f}, held-out top-1 {tta['held_out']['top1']:.1%}, "
          f"ECE {tta['held_out']['ece_before']:.4f} -> {tta['held_out']['ece_after']:.4f}, "
          f"unsure below {tta['unsure']['threshold']:.2f}")
    print(f"wrote {out_dir / CALIBRATION_FILE} and {out_dir / RELIABILITY_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
