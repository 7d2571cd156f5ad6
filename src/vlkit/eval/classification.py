"""Classification evaluation: top-1 / top-5 accuracy, per-class accuracy, confusion matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlkit.data.base import collate


@dataclass
class Predictions:
    """Outputs of :func:`predict` over a dataset, in dataset order (skipped samples left out)."""

    logits: torch.Tensor  # (N, num_classes) float32
    labels: torch.Tensor  # (N,) long
    indices: torch.Tensor  # (N,) long, dataset index of each row
    num_skipped: int  # unusable samples dropped by the collate


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int = 256, num_workers: int = 0,
            device: str | torch.device = "cpu", progress: bool = False) -> Predictions:
    """Run ``model(images) -> logits`` over ``dataset`` (samples with "image" and "label")."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    logits, labels, indices, skipped = [], [], [], 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        skipped += batch["num_skipped"]
        if "image" not in batch:
            continue
        out = model(batch["image"].to(device))
        logits.append(out.float().cpu())
        labels.append(batch["label"])
        indices.append(batch.get("index", torch.arange(len(batch["label"]))))
    model.train(was_training)
    if not logits:
        raise ValueError("no usable sample in the evaluation dataset")
    return Predictions(torch.cat(logits), torch.cat(labels), torch.cat(indices), skipped)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1/top-5 accuracy (%), mean per-class accuracy (%), cross-entropy and confusion matrix.

    ``logits``: (N, K); ``labels``: (N,). The confusion matrix is (K, K) with rows = true class.
    """
    num_classes = logits.shape[1]
    top = logits.topk(min(5, num_classes), dim=1).indices  # (N, 5)
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    confusion = torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes)
    support = confusion.sum(1).clamp(min=1)
    per_class = confusion.diag().float() / support
    return {
        "top1": 100.0 * correct1.float().mean().item(),
        "top5": 100.0 * correct5.float().mean().item(),
        "mean_class_acc": 100.0 * per_class[confusion.sum(1) > 0].mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "per_class_acc": (100.0 * per_class).tolist(),
        "confusion": confusion.tolist(),
        "num_samples": int(labels.numel()),
    }
