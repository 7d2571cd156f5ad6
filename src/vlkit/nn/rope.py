"""Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 34), in the "rotate half" layout of
GPT-NeoX / HF Llama: the head dimension is split in two halves (x1, x2) rotated as
(x1 cos - x2 sin, x2 cos + x1 sin) with frequencies theta^(-2i/d), i < d/2.
"""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """forward(positions (B, T) int) -> (cos, sin), each (B, 1, T, head_dim), float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by the angles of its positions; computed in float32 (float64 for float64 x),
    returned in x's dtype."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return (h * cos + rotate_half(h) * sin).to(x.dtype)
