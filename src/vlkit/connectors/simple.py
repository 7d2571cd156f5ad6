"""Token-wise and pooling connectors: visual tokens (B, N, C_v) -> language-model tokens (B, K, C_l).

- identity (C_v == C_l; e.g. a vision tower already trained into the LM's space);
- linear projection (LLaVA, Liu et al. 2023; LiMBeR, Merullo et al. 2023; eP-ALM);
- 2-layer MLP (LLaVA-1.5, Liu et al. 2024);
- average pooling to K tokens (on the patch grid when both are squares), then an MLP (DePALM's
  "pooling" mapping, and the compression baseline of Honeybee);
- pixel shuffle (Idefics2/3, SmolVLM): each r x r block of grid tokens concatenated into one token
  of r^2 C_v channels (N / r^2 tokens), then an MLP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.layers import Linear
from vlkit.nn.mlp import Mlp


def grid_side(n: int) -> int:
    """The side of a square grid of ``n`` tokens (ValueError when ``n`` is not a square)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} visual tokens do not form a square grid (drop prefix tokens first)")
    return side


class IdentityConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(f"identity connector needs equal widths, got vision {in_dim} and language {out_dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LinearConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MlpConnector(nn.Module):
    """Linear -> GELU -> Linear, hidden width ``out_dim`` (LLaVA-1.5)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        self.mlp = Mlp(in_dim, hidden or out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class AvgPoolConnector(nn.Module):
    """Average-pool N tokens to ``num_tokens`` (2D on the grid when N and K are squares, else 1D), then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp = MlpConnector(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k_side, n_side = math.isqrt(self.num_tokens), math.isqrt(N)
        if k_side ** 2 == self.num_tokens and n_side ** 2 == N:
            grid = x.transpose(1, 2).reshape(B, C, n_side, n_side)
            pooled = F.adaptive_avg_pool2d(grid, k_side).flatten(2).transpose(1, 2)  # (B, K, C)
        else:
            pooled = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_tokens).transpose(1, 2)
        return self.mlp(pooled)


class PixelShuffleConnector(nn.Module):
    """Space-to-depth by ``scale`` r on the token grid: (B, N, C) -> (B, N / r^2, r^2 C), then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.mlp = MlpConnector(in_dim * scale * scale, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        side, r = grid_side(N), self.scale
        if side % r:
            raise ValueError(f"grid side {side} is not divisible by the pixel-shuffle scale {r}")
        x = x.reshape(B, side // r, r, side // r, r, C).permute(0, 1, 3, 2, 4, 5)  # (B, h, w, r, r, C)
        return self.mlp(x.reshape(B, (side // r) ** 2, r * r * C))
