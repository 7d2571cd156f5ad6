"""Knowledge distillation from a teacher classifier, as in DeiT.

Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention", §4.
With student logits Z_s (class head) and Z_d (distillation head; Z_d = Z_s for a student without a
distillation token), teacher logits Z_t, labels y, softmax psi, cross-entropy L_CE:

- soft (eq. 2):  L = (1 - alpha) L_CE(psi(Z_s), y) + alpha tau^2 KL(psi(Z_t / tau) || psi(Z_d / tau))
- hard (eq. 3):  L = (1 - alpha) L_CE(psi(Z_s), y) + alpha L_CE(psi(Z_d), y_t),  y_t = argmax_c Z_t(c)
                 (the paper's eq. 3 is alpha = 1/2)
- none: no teacher; a student with two heads trains both on the labels with the same weighting.

KL is averaged over the batch (``batchmean``, the per-sample KL of eq. 2); the DeiT repository
divides its summed KL by batch x classes instead, i.e. its soft term is smaller by 1 / classes.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """forward(images (B, C, H, W), outputs, labels) -> {"loss", "loss_cls", "loss_dist"} (scalars).

    ``outputs`` is the student's ``(logits_cls, logits_dist)`` (each (B, K)) or plain logits (B, K).
    ``labels`` is whatever ``base_criterion`` takes (class ids (B,) or soft targets (B, K)).
    ``teacher`` is any module mapping images to logits (B, K); it is frozen and always run in eval
    mode under ``torch.no_grad``.
    """

    def __init__(self, base_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 teacher: nn.Module | None = None, kind: Literal["none", "soft", "hard"] = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"kind must be 'none', 'soft' or 'hard', got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"kind={kind!r} needs a teacher")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.base_criterion = base_criterion
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self.kind, self.alpha, self.tau = kind, alpha, tau

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never trains (no dropout, frozen BN statistics)
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)  # (B, K)

    def distill_term(self, logits_dist: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The teacher term: tau^2 KL (soft, eq. 2) or CE on the teacher's argmax (hard, eq. 3)."""
        teacher = self.teacher_logits(images)
        if self.kind == "hard":
            return F.cross_entropy(logits_dist, teacher.argmax(dim=-1))
        T = self.tau
        kl = F.kl_div(F.log_softmax(logits_dist / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                      reduction="batchmean", log_target=True)
        return kl * T * T

    def forward(self, images: torch.Tensor, outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        two_heads = isinstance(outputs, (tuple, list))
        logits_cls, logits_dist = outputs if two_heads else (outputs, outputs)
        loss_cls = self.base_criterion(logits_cls, labels)
        if self.kind != "none":
            loss_dist = self.distill_term(logits_dist, images)
        elif two_heads:
            loss_dist = self.base_criterion(logits_dist, labels)
        else:
            return {"loss": loss_cls, "loss_cls": loss_cls, "loss_dist": torch.zeros_like(loss_cls)}
        loss = (1 - self.alpha) * loss_cls + self.alpha * loss_dist
        return {"loss": loss, "loss_cls": loss_cls, "loss_dist": loss_dist}
