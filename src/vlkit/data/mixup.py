"""Batch-level Mixup / CutMix with label smoothing, and the soft-target cross-entropy they need.

- Mixup: Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization":
  ``x = lam x_i + (1 - lam) x_j``, ``y = lam y_i + (1 - lam) y_j``, ``lam ~ Beta(a, a)``.
- CutMix: Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features": a box of area ``(1 - lam) H W`` is pasted from ``x_j``; ``lam`` is then
  corrected to the exact fraction of pixels kept from ``x_i``.
- Label smoothing: Szegedy et al. 2016 (Inception-v3), folded into the targets as in timm / DeiT.

The partner ``j`` of sample ``i`` is ``B - 1 - i`` (the batch flipped), as in timm's batch mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigError


def one_hot_smooth(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels ``(B,)`` int -> targets ``(B, num_classes)`` float; rows sum to 1.

    The true class gets ``1 - smoothing + smoothing / K``, every other class ``smoothing / K``.
    """
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), its randomness taken from ``generator``."""
    seed = int(torch.randint(0, 2**62, (), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about ``(1 - lam) H W`` pixels, centre uniform,
    clipped to the image (so its real area may be smaller: see :meth:`Mixup.__call__`)."""
    cut = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (), generator=generator).item())
    cx = int(torch.randint(0, width, (), generator=generator).item())
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


class Mixup:
    """Mix a batch with Mixup or CutMix and attach soft targets.

    ``mixup(batch, generator) -> batch'`` where ``batch["image"]`` is ``(B, C, H, W)`` float and
    ``batch["label"]`` is ``(B,)`` int. The result is a new dict with every input key, the mixed
    ``"image"`` and ``"target"`` ``(B, num_classes)`` float (rows sum to 1), plus ``"mix_lam"``
    (float, the weight of the original sample; 1.0 when the batch was not mixed).

    With probability ``prob`` the batch is mixed; when both alphas are > 0, CutMix is chosen
    with probability ``switch_prob``, else Mixup. An alpha of 0 disables that method.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.prob, self.switch_prob = num_classes, prob, switch_prob
        self.mixup_alpha, self.cutmix_alpha, self.label_smoothing = mixup_alpha, cutmix_alpha, label_smoothing

    def _use_cutmix(self, generator: torch.Generator) -> bool:
        if self.mixup_alpha <= 0:
            return True
        if self.cutmix_alpha <= 0:
            return False
        return torch.rand((), generator=generator).item() < self.switch_prob

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        images, labels = batch["image"], batch["label"]
        out = dict(batch)
        target = one_hot_smooth(labels, self.num_classes, self.label_smoothing).to(images.dtype)
        lam = 1.0
        if self.prob >= 1.0 or torch.rand((), generator=generator).item() < self.prob:
            if self._use_cutmix(generator):
                lam = _beta(self.cutmix_alpha, generator)
                top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, generator)
                images = images.clone()
                images[..., top:bottom, left:right] = batch["image"].flip(0)[..., top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
            else:
                lam = _beta(self.mixup_alpha, generator)
                images = images * lam + images.flip(0) * (1.0 - lam)
            target = target * lam + target.flip(0) * (1.0 - lam)
        out.update(image=images, target=target, mix_lam=lam)
        return out


class SoftTargetCrossEntropy(nn.Module):
    """``mean_b sum_k -target[b, k] * log_softmax(logits)[b, k]``.

    logits ``(B, K)``, target ``(B, K)`` (rows summing to 1) -> scalar. With one-hot targets it
    equals ``F.cross_entropy(logits, labels)``.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


@dataclass
class MixupConfig:
    """Mixup / CutMix / label smoothing for classification training (DeiT recipe: 0.8 / 1.0 / 0.1)."""

    mixup_alpha: float = 0.0  # Beta(a, a) parameter for Mixup; 0 disables Mixup
    cutmix_alpha: float = 0.0  # Beta(a, a) parameter for CutMix; 0 disables CutMix
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are enabled
    label_smoothing: float = 0.0  # mass spread uniformly over all classes

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"is a probability, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


def build_mixup(cfg: MixupConfig, num_classes: int) -> Optional[Mixup]:
    """A :class:`Mixup` for ``cfg``, or ``None`` when both alphas are 0 (no mixing: the loss
    then applies ``cfg.label_smoothing`` itself, e.g. ``F.cross_entropy(label_smoothing=...)``)."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return Mixup(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.prob, cfg.switch_prob, cfg.label_smoothing)
