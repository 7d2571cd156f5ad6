"""Semantic segmentation metrics from a confusion matrix: mean IoU over classes present in the
predictions or the ground truth (absent classes excluded, as mmseg / the Segmenter code do), pixel
accuracy, and per-class IoU."""
from __future__ import annotations

import torch


class ConfusionMatrix:
    """update(pred (B, H, W), target (B, H, W)) accumulates; compute() -> {"mIoU", "pixel_acc", "iou": [...]} (%)."""

    def __init__(self, num_classes: int, ignore_index: int = -1):
        self.n, self.ignore = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != self.ignore
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        if t.numel() and (t.max() >= self.n or t.min() < 0):
            raise ValueError(f"target classes outside 0..{self.n - 1}")
        self.mat += torch.bincount(t * self.n + p, minlength=self.n * self.n).view(self.n, self.n)

    def compute(self) -> dict:
        tp = self.mat.diag().double()
        union = self.mat.sum(0).double() + self.mat.sum(1).double() - tp  # predicted + true - both
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = self.mat.sum().item()
        return {"mIoU": 100 * iou[present].mean().item() if present.any() else 0.0,
                "pixel_acc": 100 * tp.sum().item() / max(1, total),
                "iou": [None if torch.isnan(v) else 100 * v.item() for v in iou]}
