"""The Q-Former of BLIP-2 (Li et al. 2023, §3.1, Fig. 2), its query branch: K learned queries go
through BERT-style (post-LN) layers of self-attention among the queries, cross-attention to the
frozen image encoder's tokens (every ``cross_attention_every`` layers, every other one in BLIP-2)
and a feed-forward network; a linear layer maps the K outputs into the language model's space.
(BLIP-2's text branch, sharing the self-attention with the queries for its stage-1 losses, is
not built: vlkit trains the Q-Former through the language model, BLIP-2's stage 2.)

``instruction=True``: InstructBLIP's instruction-aware Q-Former (Dai et al. 2023, §2.2, Fig. 3):
the prompt's text tokens (the language model's frozen input embeddings, projected to the Q-Former's
width) join the queries in every self-attention and feed-forward, but only the queries cross-attend
to the image and come out, so the K visual tokens can carry what the question asks about.
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

    def forward(self, h: torch.Tensor, x: torch.Tensor, num_queries: int, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """h (B, K + T, C): the K queries, then T instruction tokens (T = 0 without); mask (B, 1, 1, K + T)."""
        h = self.norm1(h + self.self_attn(h, mask=mask))
        if self.cross_attn is not None:
            q = h[:, :num_queries]
            q = self.norm_cross(q + self.cross_attn(q, x))
            h = torch.cat([q, h[:, num_queries:]], dim=1)
        return self.norm2(h + self.mlp(h))


class QFormer(nn.Module):
    """forward(x (B, N, C_v), text (B, T, C_l) | None, text_mask (B, T) bool | None) -> (B, num_tokens, C_l);
    ``text`` only (and then always) with ``instruction=True``."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 32, depth: int = 2, num_heads: int = 8,
                 width: int = 0, mlp_ratio: float = 4.0, cross_attention_every: int = 1, instruction: bool = False):
        super().__init__()
        width = width or in_dim
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.norm_in = nn.LayerNorm(width)
        self.vision_norm = nn.LayerNorm(in_dim)
        self.layers = nn.ModuleList(QFormerLayer(width, in_dim, num_heads, mlp_ratio, i % cross_attention_every == 0)
                                    for i in range(depth))
        self.proj = Linear(width, out_dim)
        self.reads_text = instruction
        self.text_proj = Linear(out_dim, width) if instruction else None

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        if self.reads_text != (text is not None):
            raise ValueError("an instruction-aware Q-Former needs the prompt's text (and only it takes one)")
        x = self.vision_norm(x)
        B, K = x.shape[0], self.queries.shape[0]
        h, mask = self.queries.expand(B, -1, -1), None
        if text is not None:
            h = torch.cat([h, self.text_proj(text.to(h.dtype))], dim=1)
            if text_mask is not None:
                mask = torch.cat([text_mask.new_ones(B, K), text_mask.bool()], dim=1)[:, None, None, :]
        h = self.norm_in(h)
        for layer in self.layers:
            h = layer(h, x, K, mask)
        return self.proj(h[:, :K])
