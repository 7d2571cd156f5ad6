"""Multi-head attention: self, cross and class attention, through ``F.scaled_dot_product_attention``.

Scaled dot-product attention, Vaswani et al. 2017, "Attention Is All You Need", eq. 1::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Class attention, Touvron et al. 2021, "Going deeper with Image Transformers" (CaiT), §3: only the
class token is the query; keys and values come from the class token and all patch tokens.

The fast path is SDPA. A manual path computes the same thing and also returns the attention
weights; it runs only when they are asked for (``return_attn=True``), and a test checks that both
agree. The pieces are split so later features slot in: ``project`` (where RoPE will rotate q/k and
GQA will narrow k/v), ``attend`` (masks, causal flag) and the output projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.layers import Linear


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask (q_len, k_len), True = may attend. Queries are the last ``q_len`` positions of
    the key sequence (bottom-right aligned), which is what a KV cache needs."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def merge_masks(mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int,
                device: torch.device) -> torch.Tensor | None:
    """One SDPA ``attn_mask`` from a user mask and the causal flag.

    ``mask``: bool (True = attend) or float (added to the logits), broadcastable to (B, H, Tq, Tk).
    """
    if not causal:
        return mask
    keep = causal_mask(q_len, k_len, device)  # (Tq, Tk)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask): q (B, H, Tq, D), k (B, H, Tk, D) -> (B, H, Tq, Tk)."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head attention with an output projection.

    Self-attention (``kv_dim=None``) uses one fused ``qkv`` Linear; cross-attention (``kv_dim`` set)
    uses ``q`` on the queries and a fused ``kv`` Linear on a context sequence of width ``kv_dim``.

    forward(x (B, T, C), context (B, S, kv_dim) | None, mask | None, return_attn) -> (B, T, C),
    or ``(out, attn (B, H, T, S))`` when ``return_attn``. ``mask``: bool (True = attend) or additive
    float, broadcastable to (B, H, T, S). ``causal``: each query sees only keys at or before it.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kv_dim: int | None = None, causal: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q = Linear(dim, dim, bias=qkv_bias)
            self.kv = Linear(kv_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x (B, T, C), context (B, S, kv_dim) -> q (B, H, T, D), k and v (B, H, S, D)."""
        B, T, _ = x.shape
        if not self.is_cross:
            if context is not None:
                raise ValueError("self-attention got a context; build Attention(kv_dim=...) for cross-attention")
            qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)  # 3 x (B, H, T, D)
        if context is None:
            raise ValueError("cross-attention needs a context sequence")
        S = context.shape[1]
        q = self.q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        kv = self.kv(context).reshape(B, S, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, H, S, D)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               return_attn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, T, D), k, v (B, H, S, D) -> (out (B, H, T, D), attn (B, H, T, S) or None)."""
        drop = self.attn_drop.p if self.training else 0.0
        if not return_attn:
            if self.causal and mask is None and q.shape[2] == k.shape[2]:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True), None
            mask = merge_masks(mask, self.causal, q.shape[2], k.shape[2], q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop), None
        attn = attention_weights(q, k, merge_masks(mask, self.causal, q.shape[2], k.shape[2], q.device))
        return self.attn_drop(attn) @ v, attn

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_attn: bool = False):
        B, T, C = x.shape
        q, k, v = self.project(x, context)
        out, attn = self.attend(q, k, v, mask, return_attn)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)
        return (out, attn) if return_attn else out


class ClassAttention(Attention):
    """CaiT class attention (Touvron et al. 2021, §3, eq. in Fig. 3): the class token is the only query.

    forward(x (B, 1 + N, C)) -> (B, 1, C): query x[:, :1], keys/values all of x. Passing ``context``
    explicitly (as :class:`~vlkit.encoders.vit.Block` does) gives the same thing with x = (B, 1, C).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, kv_dim=dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_attn: bool = False):
        if context is None:
            x, context = x[:, :1], x
        return super().forward(x, context, mask, return_attn)
