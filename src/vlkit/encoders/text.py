"""Text encoders. :class:`CLIPTextTransformer`: OpenAI CLIP's text tower (pre-LN causal
transformer, pooled at the end-of-text token, linear projection), or SigLIP's (bidirectional,
pooled at the last position of a sequence padded to its context length). :class:`BertEncoder`: a BERT-style encoder (Devlin et al. 2019): token + position + segment embeddings, post-LN
transformer blocks with bidirectional attention through SDPA; sentence embeddings by mean pooling
over the real tokens, L2-normalised (Sentence-BERT, Reimers & Gurevych 2019).

:func:`load_hf_bert` reads an HF-format BERT folder (``config.json`` + ``model.safetensors``),
e.g. the pretrained all-MiniLM-L6-v2 of ASSETS.md, giving transformers' hidden states;
:func:`convert_hf_clip_text` maps the text half of an HF ``CLIPModel``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vlkit.encoders.vit import ACT_LAYERS, Block
from vlkit.nn.attention import Attention
from vlkit.nn.mlp import Mlp


@dataclass
class BertConfig:
    """Sizes of a BERT encoder (the fields of an HF ``BertConfig`` that matter here)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (gelu, gelu_new)")


class BertLayer(nn.Module):
    """Post-LN block: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        act = (lambda: nn.GELU()) if cfg.hidden_act == "gelu" else (lambda: nn.GELU(approximate="tanh"))
        self.attn = Attention(cfg.hidden_size, cfg.num_attention_heads, qkv_bias=True)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.intermediate_size, act_layer=act)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask=mask))
        return self.norm2(x + self.mlp(x))


class BertEncoder(nn.Module):
    """forward(input_ids (B, T), attention_mask (B, T) 1 = token | None, token_type_ids | None)
    -> hidden states (B, T, hidden_size). :meth:`encode` -> pooled, normalised (B, hidden_size)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.hidden_size
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"{T} tokens > max_position_embeddings {self.cfg.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        x = self.word_embed(input_ids) + self.pos_embed(positions)[None] + self.type_embed(token_type_ids)
        x = self.embed_norm(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
        for blk in self.blocks:
            x = blk(x, mask)
        return x

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings: mean of the hidden states over real tokens, L2-normalised."""
        hidden = self(input_ids, attention_mask)
        pooled = mean_pool(hidden, attention_mask)
        return F.normalize(pooled, dim=-1) if normalize else pooled


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden (B, T, C), mask (B, T) -> (B, C): the mean over positions where the mask is 1."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, padding embedding zero."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def convert_hf_bert(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """An HF ``BertModel`` state dict (with or without a ``bert.`` prefix) -> :class:`BertEncoder`'s."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    out = {
        "word_embed.weight": state["embeddings.word_embeddings.weight"],
        "pos_embed.weight": state["embeddings.position_embeddings.weight"],
        "type_embed.weight": state["embeddings.token_type_embeddings.weight"],
        "embed_norm.weight": state["embeddings.LayerNorm.weight"],
        "embed_norm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(num_layers):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = torch.cat([state[h + f"attention.self.{n}.{kind}"]
                                                     for n in ("query", "key", "value")])
            out[o + f"attn.proj.{kind}"] = state[h + f"attention.output.dense.{kind}"]
            out[o + f"norm1.{kind}"] = state[h + f"attention.output.LayerNorm.{kind}"]
            out[o + f"mlp.fc1.{kind}"] = state[h + f"intermediate.dense.{kind}"]
            out[o + f"mlp.fc2.{kind}"] = state[h + f"output.dense.{kind}"]
            out[o + f"norm2.{kind}"] = state[h + f"output.LayerNorm.{kind}"]
    return out


def bert_config(folder: str | Path) -> BertConfig:
    """The :class:`BertConfig` of an HF-format BERT folder's ``config.json``."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    known = {f.name for f in fields(BertConfig)}
    return BertConfig(**{k: v for k, v in raw.items() if k in known})


def load_hf_bert(folder: str | Path) -> BertEncoder:
    """An HF-format BERT folder (``config.json`` + ``model.safetensors``) as a :class:`BertEncoder`."""
    folder = Path(folder)
    cfg = bert_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (only safetensors weights are read, never pickles)")
    model = BertEncoder(cfg)
    model.load_state_dict(convert_hf_bert(load_file(str(weights)), cfg.num_hidden_layers))
    return model.eval()


@dataclass
class CLIPTextConfig:
    """OpenAI CLIP's text tower (defaults: ViT-B/32's, 63 M parameters)."""

    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    context_length: int = 77
    embed_dim: int = 512  # output of the projection; 0 = no projection
    act: str = "quick_gelu"  # quick_gelu (OpenAI) | gelu | gelu_tanh (SigLIP)
    eos_token_id: Optional[int] = None  # None: pool at the highest id (OpenAI's end-of-text is the last id)
    layer_norm_eps: float = 1e-5
    causal: bool = True  # False: bidirectional attention (SigLIP)
    pool: str = "eos"  # eos: at the end-of-text token | last: at the last position (SigLIP, padded to max length)

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.act not in ("quick_gelu", "gelu", "gelu_tanh"):
            raise ValueError(f"act must be quick_gelu, gelu or gelu_tanh, got {self.act!r}")
        if self.pool not in ("eos", "last"):
            raise ValueError(f"pool must be eos or last, got {self.pool!r}")


class CLIPTextTransformer(nn.Module):
    """forward(input_ids (B, T), T <= context_length) -> projected text embeddings (B, embed_dim),
    unnormalised (HF's ``get_text_features``). :meth:`forward_tokens` -> all hidden states after the
    final LayerNorm (B, T, width). Causal attention: a token never sees the padding after it (SigLIP's
    bidirectional tower reads the padding: it was trained on sequences padded to the context length)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.embed_dim or cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        norm = partial(nn.LayerNorm, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(  # ViT's pre-LN block with causal attention
            Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, act_layer=ACT_LAYERS[cfg.act],
                  norm_layer=norm, attn_layer=partial(Attention, causal=cfg.causal)) for _ in range(cfg.depth))
        self.norm = norm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False) if cfg.embed_dim else nn.Identity()
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"{T} tokens > context_length {self.cfg.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:T]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of each row's end-of-text token (the first one when ``eos_token_id`` is set)."""
        if self.cfg.eos_token_id is None:
            return input_ids.argmax(-1)
        hits = input_ids == self.cfg.eos_token_id
        if not hits.any(-1).all():
            raise ValueError(f"a row has no end-of-text token {self.cfg.eos_token_id}")
        return hits.int().argmax(-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(input_ids)
        if self.cfg.pool == "last":
            return self.proj(x[:, -1])
        pooled = x[torch.arange(len(x), device=x.device), self.eos_positions(input_ids)]
        return self.proj(pooled)


def convert_hf_clip_text(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The text half of an HF ``CLIPModel`` / ``CLIPTextModelWithProjection`` state dict ->
    :class:`CLIPTextTransformer`'s."""
    t = "text_model."
    out = {"token_embed.weight": state[t + "embeddings.token_embedding.weight"],
           "pos_embed": state[t + "embeddings.position_embedding.weight"],
           "norm.weight": state[t + "final_layer_norm.weight"], "norm.bias": state[t + "final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out["proj.weight"] = state["text_projection.weight"]
    for i in range(depth):
        out.update(convert_hf_clip_layer(state, f"{t}encoder.layers.{i}.", f"blocks.{i}."))
    return out


def convert_hf_clip_layer(state: dict[str, torch.Tensor], hf: str, ours: str) -> dict[str, torch.Tensor]:
    """One HF CLIP encoder layer (prefix ``hf``) -> a vlkit pre-LN :class:`Block` (prefix ``ours``)."""
    out = {}
    for kind in ("weight", "bias"):
        out[ours + f"attn.qkv.{kind}"] = torch.cat([state[hf + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
        out[ours + f"attn.proj.{kind}"] = state[hf + f"self_attn.out_proj.{kind}"]
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[ours + f"{a}.{kind}"] = state[hf + f"{b}.{kind}"]
    return out
