"""ClipCap's mapping network (Mokady et al. 2021, §3): ONE global image embedding becomes a prefix of
K language-model tokens.

- MLP variant (``depth = 0``, the paper's setting when the language model is fine-tuned): the
  embedding -> Linear -> tanh -> Linear to K x C_l, cut into K tokens.
- Transformer variant (``depth > 0``, used with a frozen language model): the embedding is mapped to
  K tokens, concatenated with K learned constants, and a transformer of ``depth`` layers runs over
  the 2K tokens; the prefix is the output at the constants' positions.
Visual tokens (B, N, C_v) are average-pooled to the global embedding first (CLIP's pooled output,
or a convnet's global average pool over its feature map).
"""
from __future__ import annotations

import torch
from torch import nn

from vlkit.encoders.vit import Block
from vlkit.nn.layers import Linear


class ClipCapMapper(nn.Module):
    """forward(x (B, N, C_v)) -> prefix (B, num_tokens, C_l)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 10, depth: int = 0, num_heads: int = 8,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.num_tokens, self.out_dim = num_tokens, out_dim
        if depth == 0:
            hidden = num_tokens * out_dim // 2
            self.mlp = nn.Sequential(Linear(in_dim, hidden), nn.Tanh(), Linear(hidden, num_tokens * out_dim))
        else:
            if out_dim % num_heads:
                raise ValueError(f"language width {out_dim} is not divisible by num_heads {num_heads}")
            self.mlp = Linear(in_dim, num_tokens * out_dim)
            self.constants = nn.Parameter(torch.randn(num_tokens, out_dim) * 0.02)
            self.blocks = nn.ModuleList(Block(out_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        prefix = self.mlp(x.mean(1)).view(B, self.num_tokens, self.out_dim)
        if not hasattr(self, "blocks"):
            return prefix
        h = torch.cat([prefix, self.constants.expand(B, -1, -1)], dim=1)
        for block in self.blocks:
            h = block(h)
        return h[:, self.num_tokens:]
