"""The transformer feed-forward network (Vaswani et al. 2017, eq. 2; ViT uses GELU, Dosovitskiy et al. 2021, eq. 3)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.layers import Linear


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop: (B, T, in_features) -> (B, T, out_features).

    ``act_layer`` is a module class (default ``nn.GELU``, the exact erf form).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x) (Shazeer 2020; Llama's feed-forward), gate and up fused in one matmul:
    (B, T, in_features) -> (B, T, out_features). ``fc.weight`` is [gate; up]."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = False):
        super().__init__()
        self.fc = Linear(in_features, 2 * hidden_features, bias=bias)
        self.proj = Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)
