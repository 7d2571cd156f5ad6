"""DETR: End-to-End Object Detection with Transformers (Carion et al. 2020).

``DETR(backbone, transformer, num_classes, num_queries)``: the backbone's feature map (a convnet's,
or a ViT's patch tokens laid back on their grid) is projected to ``d_model`` and flattened; a
transformer encoder-decoder (§3.2, Fig. 2; post-norm layers as in the paper's code) turns N learned
object queries into N predictions: class logits over C classes + "no object" (index C) and a box
(cx, cy, w, h) in [0, 1] from a 3-layer MLP with a sigmoid. Fixed 2D sine position encodings are
added to queries and keys at every attention layer (appendix A.3). Every decoder layer's output,
through the shared final norm and heads, is returned for the auxiliary losses (§3.2, "Auxiliary
decoding losses"). The loss is :class:`vlkit.losses.set_criterion.SetCriterion`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.eval.boxes import cxcywh_to_xyxy
from vlkit.nn.layers import Linear


@dataclass
class DETRConfig:
    num_classes: int = 8
    num_queries: int = 20
    d_model: int = 128
    num_heads: int = 8
    enc_layers: int = 3
    dec_layers: int = 3
    ffn_dim: int = 512
    dropout: float = 0.1
    aux_loss: bool = True


def sine_position_embedding(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's PositionEmbeddingSine (normalised): mask (B, H, W) True = padding -> (B, dim, H, W);
    the first dim/2 channels encode y, the rest x, as interleaved sin / cos of position / T^(2i/d)."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    t = temperature ** (2 * (torch.arange(half, device=mask.device) // 2) / half)
    px, py = x[..., None] / t, y[..., None] / t  # (B, H, W, half)
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], dim=4).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([py, px], dim=3).permute(0, 3, 1, 2)


class QKVAttention(nn.Module):
    """Multi-head attention with separate query / key / value inputs (DETR adds positions to q and k only).

    forward(q (B, T, C), k (B, S, C), v (B, S, C), key_padding_mask (B, S) True = ignore) -> (B, T, C);
    with ``need_weights`` also the attention probabilities averaged over heads (B, T, S), computed
    explicitly (the fused SDPA kernel does not return them)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by num_heads {num_heads}")
        self.h, self.drop = num_heads, dropout
        self.q, self.k, self.v, self.proj = (Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v, key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False):
        B, T, C = q.shape
        split = lambda x: x.view(B, x.shape[1], self.h, C // self.h).transpose(1, 2)  # noqa: E731
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        q, k, v = split(self.q(q)), split(self.k(k)), split(self.v(v))
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            probs = (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(-1)
            out = F.dropout(probs, self.drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.drop if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(B, T, C))
        return (out, probs.mean(1)) if need_weights else out


class FFN(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), Linear(hidden, dim))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: DETRConfig):
        super().__init__()
        self.attn = QKVAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.ffn = FFN(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, pad):
        qk = x + pos
        x = self.norm1(x + self.drop(self.attn(qk, qk, x, pad)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DETRConfig):
        super().__init__()
        self.self_attn = QKVAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.cross_attn = QKVAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.ffn = FFN(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tgt, query_pos, memory, pos, pad, need_weights: bool = False):
        """-> tgt, or (tgt, cross-attention of each query over the memory (B, Q, S)) with ``need_weights``."""
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(qk, qk, tgt)))
        cross = self.cross_attn(tgt + query_pos, memory + pos, memory, pad, need_weights=need_weights)
        cross, weights = cross if need_weights else (cross, None)
        tgt = self.norm2(tgt + self.drop(cross))
        tgt = self.norm3(tgt + self.drop(self.ffn(tgt)))
        return (tgt, weights) if need_weights else tgt


class DETR(nn.Module):
    """forward(images (B, 3, H, W)) -> {"logits" (B, N, C+1), "boxes" (B, N, 4) cxcywh in [0, 1],
    "aux_outputs": [{"logits", "boxes"}] of the earlier decoder layers}; with ``return_attention`` also
    "cross_attention": per decoder layer the head-averaged attention of each object query over the
    feature map (B, N, h * w), and "grid": (h, w), to see where each query looks (DETR's figure 6).

    ``backbone(images)`` must return a feature map (B, C_b, h, w) (see :class:`FeatureMap`)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, cfg: DETRConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.input_proj = nn.Conv2d(backbone_dim, cfg.d_model, 1)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(cfg.d_model)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)
        self.class_embed = Linear(cfg.d_model, cfg.num_classes + 1)
        self.bbox_embed = nn.Sequential(Linear(cfg.d_model, cfg.d_model), nn.ReLU(), Linear(cfg.d_model, cfg.d_model),
                                        nn.ReLU(), Linear(cfg.d_model, 4))
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if not name.startswith("backbone.") and p.dim() > 1:
                nn.init.xavier_uniform_(p)  # as DETR's transformer
        nn.init.normal_(self.query_embed.weight)

    def forward(self, images: torch.Tensor, pad_mask: Optional[torch.Tensor] = None,
                return_attention: bool = False) -> dict:
        fmap = self.input_proj(self.backbone(images))  # (B, d, h, w)
        B, d, h, w = fmap.shape
        mask = torch.zeros(B, h, w, dtype=torch.bool, device=fmap.device) if pad_mask is None else \
            F.interpolate(pad_mask[:, None].float(), size=(h, w))[:, 0].bool()
        pos = sine_position_embedding(mask, d).flatten(2).transpose(1, 2)  # (B, h w, d)
        memory, pad = fmap.flatten(2).transpose(1, 2), mask.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, pos, pad)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outs, attention = [], []
        for layer in self.decoder:
            if return_attention:
                tgt, weights = layer(tgt, query_pos, memory, pos, pad, need_weights=True)
                attention.append(weights)
            else:
                tgt = layer(tgt, query_pos, memory, pos, pad)
            outs.append(self.decoder_norm(tgt))
        preds = [{"logits": self.class_embed(o), "boxes": self.bbox_embed(o).sigmoid()} for o in outs]
        out = {**preds[-1], "aux_outputs": preds[:-1] if self.cfg.aux_loss else []}
        return {**out, "cross_attention": attention, "grid": (h, w)} if return_attention else out


class FeatureMap(nn.Module):
    """A vlkit encoder as a DETR backbone: a convnet's ``forward_features`` map, or a ViT's patch
    tokens laid back on their (h, w) grid. ``dim`` is the channel count."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.is_vit = hasattr(encoder, "num_prefix_tokens") and hasattr(encoder, "blocks")
        self.dim = encoder.cfg.embed_dim if self.is_vit else encoder.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            return self.encoder.forward_features(images)
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]  # (B, N, D)
        gh, gw = images.shape[-2] // self.encoder.cfg.patch_size, images.shape[-1] // self.encoder.cfg.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


@torch.no_grad()
def postprocess(outputs: dict, sizes: torch.Tensor, threshold: float = 0.0) -> list[dict]:
    """Per image {"scores" (K,), "labels" (K,), "boxes" (K, 4) xyxy in pixels, clipped, "queries" (K,) the
    object queries they come from} of the predictions whose best real class scores above ``threshold``;
    ``sizes`` (B, 2) = (height, width)."""
    probs = outputs["logits"].softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None].to(outputs["boxes"])
    boxes = torch.min(cxcywh_to_xyxy(outputs["boxes"]).clamp(min=0) * scale, scale)  # clipped to the image
    return [{"scores": s[s > threshold], "labels": lab[s > threshold], "boxes": b[s > threshold],
             "queries": torch.nonzero(s > threshold)[:, 0]} for s, lab, b in zip(scores, labels, boxes)]
