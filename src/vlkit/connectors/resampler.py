"""The Perceiver resampler of Flamingo (Alayrac et al. 2022, §2.1 and Fig. 5; after Jaegle et al.
2021's Perceiver): K learned latent queries cross-attend to the visual tokens concatenated with
the latents themselves, layer after layer, giving a fixed number K of visual tokens whatever the
number of input tokens or frames. Frames (B, F, N, C) get a learned temporal embedding each and
are flattened to F x N tokens first.
"""
from __future__ import annotations

import torch
from torch import nn

from vlkit.nn.attention import Attention
from vlkit.nn.layers import Linear
from vlkit.nn.mlp import Mlp


class ResamplerLayer(nn.Module):
    """latents = latents + attn(q = norm(latents), kv = norm([x; latents])); latents += ffw(latents)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_x, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, kv_dim=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        latents = latents + self.attn(q, torch.cat([self.norm_x(x), q], dim=1))
        return latents + self.mlp(self.norm2(latents))


class PerceiverResampler(nn.Module):
    """forward(x (B, N, C_v) or frames (B, F, N, C_v)) -> (B, num_tokens, C_l)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 64, depth: int = 2, num_heads: int = 8,
                 width: int = 0, mlp_ratio: float = 4.0, max_frames: int = 1):
        super().__init__()
        width = width or in_dim
        self.input = Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.time_embed = nn.Parameter(torch.zeros(max_frames, 1, width))
        self.layers = nn.ModuleList(ResamplerLayer(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x[:, None]  # one frame
        B, F_, N, _ = x.shape
        if F_ > self.time_embed.shape[0]:
            raise ValueError(f"{F_} frames > max_frames {self.time_embed.shape[0]}")
        x = (self.input(x) + self.time_embed[:F_]).reshape(B, F_ * N, -1)  # (B, F N, width)
        latents = self.latents.expand(B, -1, -1)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.proj(self.norm(latents))
