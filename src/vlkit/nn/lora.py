"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):
h = W0 x + (alpha / r) B A x with A (r, in) Kaiming-initialised and B (out, r) zero, so the
adapted layer starts equal to the frozen one; :meth:`LoRALinear.merge` folds B A into W0 for
inference (no extra latency). :func:`apply_lora` wraps the ``nn.Linear`` layers whose qualified
names match a regular expression.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """forward(x (..., in)) -> base(x) + scale * (dropout(x) A^T) B^T, scale = alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # tied weights (lm_head = embed_tokens) keep working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += scale * B A, once; afterwards forward is the plain (merged) Linear."""
        if not self.merged:
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
            self.merged = True


def apply_lora(model: nn.Module, targets: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap every ``nn.Linear`` whose qualified name matches ``targets`` (``re.search``); returns the
    wrapped names (ValueError when none matches: a typo would otherwise train nothing)."""
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer of ``model``; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.merge()
    return len(layers)
