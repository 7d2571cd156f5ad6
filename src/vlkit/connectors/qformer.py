"""The Q-Former of BLIP-2 (Li et al. 2023, §3.1, Fig. 2), its query branch: K learned queries go
through BERT-style (post-LN) layers of self-attention among the queries, cross-attention to the
frozen image encoder's tokens (every ``cross_attention_every`` layers, every other one in BLIP-2)
and a feed-forward network; a linear layer maps the K outputs into the language model's space.
(BLIP-2's text branch, sharing the self-attention with the queries for its stage-1 losses, is
not built: vlkit trains the Q-Former through the language model, BLIP-2's stage 2.)
"""
from __future__ import annotations

import torch
from torch import nn

from vlkit.nn.attention import Attention
from vlkit.nn.layers import Linear
from vlkit.nn.mlp import Mlp


class QFormerLayer(nn.Module):
    """q = LN(q + self_attn(q)); [q = LN(q + cross_attn(q, x))]; q = LN(q + ffn(q))."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, mlp_ratio: float, cross: bool):
        super().__init__()
        self.self_attn, self.norm1 = Attention(dim, num_heads, qkv_bias=True), nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, qkv_bias=True, kv_dim=kv_dim) if cross else None
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.mlp, self.norm2 = Mlp(dim, int(dim * mlp_ratio)), nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.self_attn(q))
        if self.cross_attn is not None:
            q = self.norm_cross(q + self.cross_attn(q, x))
        return self.norm2(q + self.mlp(q))


class QFormer(nn.Module):
    """forward(x (B, N, C_v)) -> (B, num_tokens, C_l)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 32, depth: int = 2, num_heads: int = 8,
                 width: int = 0, mlp_ratio: float = 4.0, cross_attention_every: int = 1):
        super().__init__()
        width = width or in_dim
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.norm_in = nn.LayerNorm(width)
        self.vision_norm = nn.LayerNorm(in_dim)
        self.layers = nn.ModuleList(QFormerLayer(width, in_dim, num_heads, mlp_ratio, i % cross_attention_every == 0)
                                    for i in range(depth))
        self.proj = Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vision_norm(x)
        q = self.norm_in(self.queries.expand(x.shape[0], -1, -1))
        for layer in self.layers:
            q = layer(q, x)
        return self.proj(q)
