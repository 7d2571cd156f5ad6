"""The C-Abstractor of Honeybee (Cha et al. 2024, §3.2, Fig. 4): convolutional blocks on the token
grid keep local context, adaptive average pooling reduces it to K = s x s tokens, more blocks,
then an MLP into the language model's space. Honeybee uses RegNet blocks; here a residual block
(3x3 conv - GroupNorm - SiLU - 3x3 conv - GroupNorm, plus the input) plays that part.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.connectors.simple import MlpConnector, grid_side


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(1, dim)
        self.conv2, self.norm2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(1, dim)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm2(self.conv2(F.silu(self.norm1(self.conv1(x)))))


class CAbstractor(nn.Module):
    """forward(x (B, N, C_v), N a square) -> (B, num_tokens, C_l), num_tokens a square."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 64, depth: int = 2, width: int = 0):
        super().__init__()
        self.side = math.isqrt(num_tokens)
        if self.side ** 2 != num_tokens:
            raise ValueError(f"C-Abstractor num_tokens must be a square, got {num_tokens}")
        width = width or in_dim
        self.input = nn.Conv2d(in_dim, width, 1)
        self.stage1 = nn.Sequential(*(ResBlock(width) for _ in range(depth)))
        self.stage2 = nn.Sequential(*(ResBlock(width) for _ in range(depth)))
        self.mlp = MlpConnector(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        side = grid_side(N)
        h = self.input(x.transpose(1, 2).reshape(B, C, side, side))
        h = self.stage2(F.adaptive_avg_pool2d(self.stage1(h), self.side))  # (B, width, s, s)
        return self.mlp(h.flatten(2).transpose(1, 2))
