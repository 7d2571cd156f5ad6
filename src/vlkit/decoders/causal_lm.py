"""A causal decoder language model covering the Llama family and GPT-2, one block configured.

- GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU (tanh) MLP, biases, tied embeddings.
- Llama (Touvron et al. 2023): rotary positions (RoPE), RMSNorm, SwiGLU MLP (Shazeer 2020), no
  biases; grouped-query attention (Ainslie et al. 2023: ``num_kv_heads`` < ``num_heads`` key/value
  heads shared by groups of query heads). SmolLM2 is a Llama with tied embeddings.

Read top to bottom: config -> attention -> MLP -> block -> model. Attention is SDPA (with
``enable_gqa``); decoding writes into a :class:`~vlkit.nn.kv_cache.KVCache`. ``forward`` takes
token ids or ``inputs_embeds`` (a VLM splices visual tokens there) and an ``attention_mask`` for
left-padded batches; positions then count real tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.kv_cache import KVCache
from vlkit.nn.layers import Linear, RMSNorm
from vlkit.nn.rope import RotaryEmbedding, apply_rope


# (block index, x (B, T, C), past) -> x, or (x, extra): extra(attention module, its normed input h, rope) -> (B, T, C)
# is added to block i's self-attention output (LLaMA-Adapter's adaption prompts)
LayerHook = Callable[[int, torch.Tensor, int], Union[torch.Tensor, tuple]]


@dataclass
class DecoderConfig:
    """Sizes and choices of a causal decoder (defaults: SmolLM2-135M)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3  # grouped-query attention; = num_heads for multi-head attention
    intermediate_size: int = 1536  # MLP hidden width
    max_position_embeddings: int = 8192
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"  # swiglu: down(silu(gate x) * up x); gelu: proj(gelu_tanh(fc x))
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 100000.0
    attn_bias: bool = False  # biases of the q/k/v and output projections
    mlp_bias: bool = False
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    init_std: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


DECODER_CONFIGS = {
    "smollm2_135m": dict(),
    "gpt2": dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                 intermediate_size=3072, max_position_embeddings=1024, norm="layernorm", mlp="gelu",
                 positions="learned", attn_bias=True, mlp_bias=True, bos_token_id=50256, eos_token_id=50256),
}


def decoder_config(name: str, **overrides) -> DecoderConfig:
    if name not in DECODER_CONFIGS:
        raise KeyError(f"unknown decoder {name!r}; known: {', '.join(DECODER_CONFIGS)}")
    return DecoderConfig(**{**DECODER_CONFIGS[name], **overrides})


class DecoderAttention(nn.Module):
    """Causal self-attention with grouped-query heads, RoPE and a KV cache.

    forward(x (B, T, C), rope (cos, sin) | None, mask, is_causal, cache, layer) -> (B, T, C)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=cfg.attn_bias)
        self.proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attn_bias)

    def forward(self, x: torch.Tensor, rope: Optional[tuple], mask: Optional[torch.Tensor], is_causal: bool,
                cache: Optional[KVCache] = None, layer: int = 0, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # (B, Hkv, S, D): S = past + T, or max_len for a fixed-shape step at ``slot``
            k, v = cache.update(layer, k, v) if slot is None else cache.write(layer, k, v, slot)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=H != Hkv)
        return self.proj(out.transpose(1, 2).reshape(B, T, H * D))


class DecoderMLP(nn.Module):
    """SwiGLU (gate and up projections fused in one matmul) or GPT-2's GELU MLP."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = 2 * cfg.intermediate_size if self.swiglu else cfg.intermediate_size
        self.fc = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)  # swiglu: [gate; up]
        self.proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(h, approximate="tanh"))


def _norm(cfg: DecoderConfig) -> nn.Module:
    return RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.hidden_size,
                                                                                             eps=cfg.norm_eps)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm1 x), then + mlp(norm2 x)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = _norm(cfg), DecoderAttention(cfg), _norm(cfg), DecoderMLP(cfg)

    def forward(self, x, rope, mask, is_causal, cache=None, layer=0, slot=None, extra=None):
        h = self.norm1(x)
        a = self.attn(h, rope, mask, is_causal, cache, layer, slot)
        x = x + (a if extra is None else a + extra(self.attn, h, rope))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """forward(input_ids (B, T) | inputs_embeds (B, T, C), attention_mask (B, T) 1 = token | None,
    cache | None, logits_to_keep) -> logits (B, T or logits_to_keep, vocab), float32.

    With a cache, ``attention_mask`` covers the NEW tokens only (the cache remembers the past)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) \
            if cfg.positions == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.positions == "rope" else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = _norm(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.num_layers, batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim,
                       dtype or p.dtype, p.device)

    def positions_and_mask(self, B: int, T: int, attention_mask: Optional[torch.Tensor], cache: Optional[KVCache],
                           device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor], bool]:
        """(position ids (B, T), SDPA mask (B, 1, T, S) bool | None, is_causal)."""
        past = cache.length if cache is not None else 0
        given = attention_mask is not None
        new = attention_mask.bool() if given else torch.ones(B, T, dtype=torch.bool, device=device)
        keys = cache.add_keys(new, all_real=not given) if cache is not None else new  # (B, S) real tokens so far
        if past:
            positions = keys[:, :past].sum(1, keepdim=True) + new.long().cumsum(1) - 1
        else:
            positions = new.long().cumsum(1) - 1
        positions = positions.clamp(min=0)
        # no padding anywhere: plain causal attention. Decoding steps (no mask given) read no tensor back.
        no_padding = not cache.padded if cache is not None else (not given or bool(keys.all()))
        if no_padding:
            if T == 1:
                return positions, None, False
            if past == 0:
                return positions, None, True
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None]
        allowed = (k_pos <= q_pos) & keys[:, None, :]  # (B, T, S)
        allowed = allowed | (k_pos == q_pos)  # a padding query sees itself: no fully masked (NaN) row
        return positions, allowed[:, None], False

    def forward_hidden(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                       inputs_embeds: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                       layer_hook: Optional[LayerHook] = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C). ``layer_hook(i, x, past)`` runs before block i and
        returns the new x (VLM injection: gated cross-attention, eP-ALM tokens), or (x, extra) with a term
        for block i's attention output (:data:`LayerHook`); ``past`` is the number of cached positions
        before these T tokens."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        positions, mask, is_causal = self.positions_and_mask(B, T, attention_mask, cache, x.device)
        if self.pos_embed is not None:
            if int(positions.max()) >= self.cfg.max_position_embeddings:
                raise ValueError(f"position {int(positions.max())} >= max_position_embeddings "
                                 f"{self.cfg.max_position_embeddings}")
            x = x + self.pos_embed(positions)
        rope = self.rope(positions) if self.rope is not None else None
        for i, blk in enumerate(self.blocks):
            extra = None
            if layer_hook is not None:
                x = layer_hook(i, x, past)
                if isinstance(x, tuple):
                    x, extra = x
            x = blk(x, rope, mask, is_causal, cache, i, extra=extra)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def decode_step(self, token: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, cache: KVCache
                    ) -> torch.Tensor:
        """One new token per row (B, 1) in shapes that never change, the step torch.compile and CUDA
        graphs need: its keys / values are written at cache index ``slot`` ((1,) long tensor), it
        attends over all ``max_len`` cache positions under the cache's key mask; ``positions`` (B, 1)
        are its position ids. -> logits (B, vocab) float32. The caller advances ``cache.length``."""
        x = self.embed_tokens(token)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        rope = self.rope(positions) if self.rope is not None else None
        cache.key_mask.index_fill_(1, slot, True)
        mask = cache.key_mask[:, None, None, :]  # (B, 1, 1, max_len): real tokens written so far
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, mask, False, cache, i, slot)
        return self.lm_head(self.norm(x))[:, -1].float()

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                logits_to_keep: int = 0, layer_hook: Optional[LayerHook] = None) -> torch.Tensor:
        h = self.forward_hidden(input_ids, attention_mask, inputs_embeds, cache, layer_hook)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h).float()
