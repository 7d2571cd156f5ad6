"""Idefics2's connector (Laurençon et al. 2024, "What matters when building vision-language models?", §2.2
and §3): a SwiGLU *modality projection* of the visual tokens to the language model's width, then a
Perceiver resampler in that width (64 latents, 3 layers in Idefics2) built from the language model's own
parts: RMSNorm, grouped-query attention without biases (latents attend to [visual tokens; latents], as
Flamingo's), a SwiGLU feed-forward, and a final RMSNorm instead of Flamingo's output projection.

The latents start at ones, as transformers' ``Idefics2PerceiverResampler``: they are told apart by the
language model's positions. :func:`idefics2_state_from_hf` maps transformers' ``Idefics2Connector``
weights (``model.connector.*`` of an Idefics2 checkpoint, prefix removed) to this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.layers import Linear, RMSNorm
from vlkit.nn.mlp import SwiGLU


class PerceiverGQA(nn.Module):
    """q = W_q latents; k, v = W_kv [x; latents] with ``kv_heads`` shared by groups of query heads; no biases.

    forward(latents (B, K, C), x (B, N, C), mask (B, N) bool | None: False = padding) -> (B, K, C)."""

    def __init__(self, dim: int, num_heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        if num_heads % kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        self.q = Linear(dim, num_heads * head_dim, bias=False)
        self.kv = Linear(dim, 2 * kv_heads * head_dim, bias=False)  # [k; v]
        self.proj = Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, K, _ = latents.shape
        H, Hkv, D = self.num_heads, self.kv_heads, self.head_dim
        context = torch.cat([x, latents], dim=1)  # (B, N + K, C)
        q = self.q(latents).view(B, K, H, D).transpose(1, 2)  # (B, H, K, D)
        k, v = self.kv(context).view(B, -1, 2, Hkv, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, Hkv, N + K, D)
        if mask is not None:  # the latents always attend to themselves
            mask = torch.cat([mask.bool(), mask.new_ones(B, K, dtype=torch.bool)], dim=1)[:, None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
        return self.proj(out.transpose(1, 2).reshape(B, K, H * D))


class Idefics2ResamplerLayer(nn.Module):
    """latents += attn(rms(latents), rms(x)); latents += swiglu(rms(latents))."""

    def __init__(self, dim: int, num_heads: int, kv_heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm_latents, self.norm_x, self.norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn = PerceiverGQA(dim, num_heads, kv_heads, head_dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, latents: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.attn(self.norm_latents(latents), self.norm_x(x), mask)
        return latents + self.mlp(self.norm2(latents))


class Idefics2Connector(nn.Module):
    """forward(x (B, N, C_v), mask (B, N) | None) -> (B, num_tokens, C_l).

    ``hidden``: the modality projection's inner width (Idefics2: the language model's intermediate size);
    ``head_dim`` 0 = C_l / num_heads; ``kv_heads`` 0 = num_heads; ``mlp_ratio``: the resampler's feed-forward
    width / C_l (Idefics2: 4)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, num_tokens: int = 64, depth: int = 3,
                 num_heads: int = 16, kv_heads: int = 0, head_dim: int = 0, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        head_dim = head_dim or out_dim // num_heads
        self.projection = SwiGLU(in_dim, hidden, out_dim)
        self.latents = nn.Parameter(torch.ones(num_tokens, out_dim))
        self.layers = nn.ModuleList(Idefics2ResamplerLayer(out_dim, num_heads, kv_heads or num_heads, head_dim,
                                                           mlp_ratio, eps) for _ in range(depth))
        self.norm = RMSNorm(out_dim, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.projection(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x, mask)
        return self.norm(latents)


_HF_RENAMES = (("modality_projection.", "projection."), ("perceiver_resampler.", ""),
               ("input_latents_norm", "norm_latents"), ("input_context_norm", "norm_x"),
               ("post_attention_layernorm", "norm2"), ("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.kv"),
               ("self_attn.o_proj", "attn.proj"), ("gate_proj", "fc"), ("down_proj", "proj"))


def idefics2_state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``Idefics2Connector`` state dict -> :class:`Idefics2Connector`'s ([gate; up] and [k; v] fused)."""
    out = {}
    for key, value in state.items():
        if key.endswith(("up_proj.weight", "v_proj.weight")):
            continue  # fused into its gate / k partner below
        if key.endswith("gate_proj.weight"):
            value = torch.cat([value, state[key.replace("gate_proj", "up_proj")]])
        elif key.endswith("k_proj.weight"):
            value = torch.cat([value, state[key.replace("k_proj", "v_proj")]])
        for hf, ours in _HF_RENAMES:
            key = key.replace(hf, ours)
        out[key] = value
    return out
