"""Accuracy of a network on a labelled uint8 image set (shared by training and evaluate)."""
from __future__ import annotations

import torch

from model.tta import flip_tta_logits, plain_and_flip_tta_logits
from training.data import batches, normalize


# 64 images a batch: on a 2-core AVX2 EPYC, 1.2-1.7x the images/s of 500 (the activations stay in cache).
EVAL_BATCH_SIZE = 64


@torch.inference_mode()
def _logits_by_batch(model, images, labels, batch_size, device, amp_dtype, channels_last, forward) -> list:
    """``forward(model, x)`` of every batch of normalized images, on the CPU: a list with one entry a batch."""
    model.eval()
    device = torch.device(device)
    out = []
    for x, _, _ in batches(images, labels, torch.arange(len(labels)), batch_size):
        x = normalize(x, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out.append(forward(model, x))
    return out


def predict_logits(model, images, labels, batch_size=EVAL_BATCH_SIZE, device="cpu", amp_dtype=None,
                   flip_tta=False, channels_last=True):
    """Logits (float32, on the CPU) for every image, optionally averaged with the mirror image."""
    out = _logits_by_batch(model, images, labels, batch_size, device, amp_dtype, channels_last,
                           lambda net, x: (flip_tta_logits(net, x) if flip_tta else net(x).float()).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def predict_plain_and_flip_tta_logits(model, images, labels, batch_size=EVAL_BATCH_SIZE, device="cpu",
                                      channels_last=True) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, flip-TTA) float32 logits for every image from one pass over the images and their mirrors
    (the price of flip TTA alone, where both are wanted)."""
    out = _logits_by_batch(model, images, labels, batch_size, device, None, channels_last,
                           lambda net, x: [t.cpu() for t in plain_and_flip_tta_logits(net, x)])
    if not out:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat([plain for plain, _ in out]), torch.cat([tta for _, tta in out])


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many labels are among the top-k logits, for each k."""
    # min(): a model with fewer than 5 classes has every class in its top 5.
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def accuracy(logits, labels) -> dict[str, float]:
    n = max(len(labels), 1)
    c = topk_correct(logits, labels)
    return {"top1": 100.0 * c[1] / n, "top5": 100.0 * c[5] / n}


def per_class_accuracy(logits, labels, num_classes) -> torch.Tensor:
    pred = logits.argmax(1)
    correct = torch.zeros(num_classes).index_add_(0, labels, (pred == labels).float())
    total = torch.bincount(labels, minlength=num_classes).float()
    return 100.0 * correct / total.clamp(min=1)


def confusion_matrix(logits, labels, num_classes) -> torch.Tensor:
    """[true, predicted] counts."""
    pred = logits.argmax(1)
    return torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)


def most_confused_pairs(confusion: torch.Tensor, n=10) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the n largest off-diagonal entries."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    # A stable sort: equal counts come in (true, predicted) order, so reports are reproducible.
    counts, flat = torch.sort(off.flatten(), descending=True, stable=True)
    k = confusion.shape[0]
    return [(int(i // k), int(i % k), int(c)) for i, c in zip(flat[:n], counts[:n]) if c > 0]
