"""DETR: End-to-End Object Detection with Transformers (Carion et al. 2020).

``DETR(backbone, transformer, num_classes, num_queries)``: the backbone's feature map (a convnet's,
or a ViT's patch tokens laid back on their grid) is projected to ``d_model`` and flattened; a
transformer encoder-decoder (§3.2, Fig. 2; post-norm layers as in the paper's code) turns N learned
object queries into N predictions: class logits over C classes + "no object" (index C) and a box
(cx, cy, w, h) in [0, 1] from a 3-layer MLP with a sigmoid. Fixed 2D sine position encodings are
added to queries and keys at every attention layer (appendix A.3). Every decoder layer's output,
through the shared final norm and heads, is returned for the auxiliary losses (§3.2, "Auxiliary
decoding losses"). The loss is :class:`vlkit.losses.set_criterion.SetCriterion`.

Remedies for DETR's slow convergence, options of :class:`DETRConfig`:

- ``queries="anchor"`` (DAB-DETR, Liu et al. 2022): each query is a learned 4-d anchor box; its
  positional query is an MLP of the anchor's sine embedding (scaled by the content, as Conditional
  DETR), and every decoder layer predicts its box as a refinement of the previous layer's
  (``sigmoid(delta + logit(anchor))``, the gradient stopped between layers).
- ``dn_groups=G`` (DN-DETR, Li et al. 2022; needs anchor queries): during training, G noised copies
  of the ground truth (boxes shifted and rescaled by up to ``dn_box_noise``, labels flipped with
  probability ``dn_label_noise``) are fed as extra queries that must reconstruct their box and class,
  without matching; an attention mask keeps them invisible to the matching queries and to each other's
  groups. Their outputs are returned as "dn_outputs" for the criterion.
- ``focal=True`` (Deformable DETR, after RetinaNet): independent sigmoid classes trained with the focal
  loss instead of a softmax with a down-weighted "no object" class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigError
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
    queries: str = "learned"  # "learned" (DETR) or "anchor" (DAB-DETR: 4-d anchor boxes refined per layer)
    dn_groups: int = 0  # DN-DETR denoising groups at training (0 = off; needs queries="anchor")
    dn_label_noise: float = 0.2  # probability that a denoising query's label is flipped to a random class
    dn_box_noise: float = 0.4  # box noise scale: centres move up to 0.4 * w / 2, sizes scale by 1 +- 0.4
    focal: bool = False  # sigmoid classes and the focal loss (Deformable DETR), no "no object" logit

    def __post_init__(self):
        if self.queries not in ("learned", "anchor"):
            raise ConfigError("queries", f"must be 'learned' or 'anchor', not {self.queries!r}")
        if self.dn_groups < 0:
            raise ConfigError("dn_groups", f"must be >= 0, not {self.dn_groups}")
        if self.dn_groups and self.queries != "anchor":
            raise ConfigError("dn_groups", "needs detr.queries=anchor (denoising queries are noised boxes)")
        if self.queries == "anchor" and self.dec_layers < 2:
            raise ConfigError("dec_layers", "anchor queries refine boxes layer by layer: need >= 2 decoder layers")
        if not 0 <= self.dn_label_noise <= 1 or self.dn_box_noise < 0:
            raise ConfigError("dn_label_noise", f"need 0 <= dn_label_noise <= 1 and dn_box_noise >= 0, got "
                                                f"{self.dn_label_noise}, {self.dn_box_noise}")


def _sine(v: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """v (...) -> (..., dim): interleaved sin / cos of v / T^(2i/dim)."""
    t = temperature ** (2 * (torch.arange(dim, device=v.device) // 2) / dim)
    p = v[..., None] / t
    return torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], dim=-1).flatten(-2)


def sine_position_embedding(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's PositionEmbeddingSine (normalised): mask (B, H, W) True = padding -> (B, dim, H, W);
    the first dim/2 channels encode y, the rest x, as interleaved sin / cos of position / T^(2i/d)."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    return torch.cat([_sine(y, dim // 2, temperature), _sine(x, dim // 2, temperature)], dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DAB-DETR's embedding of boxes (..., 4) cxcywh in [0, 1] -> (..., 2 * dim): y, x, w, h each on dim / 2
    channels, in the frequencies of :func:`sine_position_embedding` (whose cell i sits at (i + 1) / h, half
    a cell from a box centred on it: the anchor MLP learns the offset)."""
    v = boxes * (2 * math.pi)
    return torch.cat([_sine(v[..., i], dim // 2, temperature) for i in (1, 0, 2, 3)], dim=-1)


class QKVAttention(nn.Module):
    """Multi-head attention with separate query / key / value inputs (DETR adds positions to q and k only).

    forward(q (B, T, C), k (B, S, C), v (B, S, C), key_padding_mask (B, S) True = ignore, attn_mask
    (B or 1, T, S) True = blocked) -> (B, T, C); with ``need_weights`` also the attention probabilities
    averaged over heads (B, T, S), computed explicitly (the fused SDPA kernel does not return them)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by num_heads {num_heads}")
        self.h, self.drop = num_heads, dropout
        self.q, self.k, self.v, self.proj = (Linear(dim, dim) for _ in range(4))

    def forward(self, q, k, v, key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None):
        B, T, C = q.shape
        split = lambda x: x.view(B, x.shape[1], self.h, C // self.h).transpose(1, 2)  # noqa: E731
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = allowed
        if attn_mask is not None:
            mask = ~attn_mask[:, None] if mask is None else mask & ~attn_mask[:, None]
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

    def forward(self, tgt, query_pos, memory, pos, pad, need_weights: bool = False, self_mask=None):
        """-> tgt, or (tgt, cross-attention of each query over the memory (B, Q, S)) with ``need_weights``;
        ``self_mask`` (B, Q, Q) True = query i may not see query j (the denoising groups)."""
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(qk, qk, tgt, attn_mask=self_mask)))
        cross = self.cross_attn(tgt + query_pos, memory + pos, memory, pad, need_weights=need_weights)
        cross, weights = cross if need_weights else (cross, None)
        tgt = self.norm2(tgt + self.drop(cross))
        tgt = self.norm3(tgt + self.drop(self.ffn(tgt)))
        return (tgt, weights) if need_weights else tgt


class DETR(nn.Module):
    """forward(images (B, 3, H, W), targets=None) -> {"logits" (B, N, C+1), "boxes" (B, N, 4) cxcywh in
    [0, 1], "aux_outputs": [{"logits", "boxes"}] of the earlier decoder layers}; with ``return_attention``
    also "cross_attention": per decoder layer the head-averaged attention of each object query over the
    feature map (B, N, h * w), and "grid": (h, w), to see where each query looks (DETR's figure 6).
    Training with ``dn_groups`` and ``targets`` ([{"labels", "boxes"}]) adds "dn_outputs" (per decoder
    layer {"logits", "boxes"} of the denoising queries) and "dn_targets" ({"labels", "true_boxes",
    "valid"} they must reconstruct). With ``focal`` the logits are (B, N, C): no "no object" class.

    ``backbone(images)`` must return a feature map (B, C_b, h, w) (see :class:`FeatureMap`)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, cfg: DETRConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        d = cfg.d_model
        self.input_proj = nn.Conv2d(backbone_dim, d, 1)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        if cfg.queries == "learned":
            self.query_embed = nn.Embedding(cfg.num_queries, d)
        else:
            self.anchors = nn.Embedding(cfg.num_queries, 4)  # logit of (cx, cy, w, h)
            self.label_embed = nn.Embedding(cfg.num_classes + 1, d)  # content: a noised label, or C = unknown
            self.anchor_head = nn.Sequential(Linear(2 * d, d), nn.ReLU(), Linear(d, d))
            self.query_scale = nn.Sequential(Linear(d, d), nn.ReLU(), Linear(d, d))
        self.class_embed = Linear(d, cfg.num_classes + (0 if cfg.focal else 1))
        self.bbox_embed = nn.Sequential(Linear(d, d), nn.ReLU(), Linear(d, d), nn.ReLU(), Linear(d, 4))
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if not name.startswith("backbone.") and p.dim() > 1:
                nn.init.xavier_uniform_(p)  # as DETR's transformer
        if self.cfg.focal:  # every class starts at probability 0.01 (RetinaNet's prior)
            nn.init.constant_(self.class_embed.bias, -math.log(99))
        if self.cfg.queries == "learned":
            nn.init.normal_(self.query_embed.weight)
            return
        with torch.no_grad():  # anchors spread over the image; the first boxes are the anchors themselves
            self.anchors.weight[:, :2].uniform_(0.05, 0.95).logit_()
            self.anchors.weight[:, 2:].uniform_(0.05, 0.4).logit_()
        nn.init.zeros_(self.bbox_embed[-1].weight)
        nn.init.zeros_(self.bbox_embed[-1].bias)

    def forward(self, images: torch.Tensor, pad_mask: Optional[torch.Tensor] = None,
                return_attention: bool = False, targets: Optional[list[dict]] = None) -> dict:
        fmap = self.input_proj(self.backbone(images))  # (B, d, h, w)
        B, d, h, w = fmap.shape
        mask = torch.zeros(B, h, w, dtype=torch.bool, device=fmap.device) if pad_mask is None else \
            F.interpolate(pad_mask[:, None].float(), size=(h, w))[:, 0].bool()
        pos = sine_position_embedding(mask, d).flatten(2).transpose(1, 2)  # (B, h w, d)
        memory, pad = fmap.flatten(2).transpose(1, 2), mask.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, pos, pad)
        dn = self._denoising_queries(targets, B) if self.training and self.cfg.dn_groups and targets else None
        if self.cfg.queries == "learned":
            query_pos, ref, self_mask = self.query_embed.weight[None].expand(B, -1, -1), None, None
            tgt = torch.zeros_like(query_pos)
        else:
            query_pos, self_mask = None, None if dn is None else dn["mask"]
            ref = self.anchors.weight.sigmoid()[None].expand(B, -1, -1)
            tgt = self.label_embed.weight[-1].expand(B, self.cfg.num_queries, d)
            if dn is not None:
                tgt, ref = torch.cat([dn["content"], tgt], 1), torch.cat([dn["boxes"], ref], 1)
        preds, attention = self._decode(tgt, ref, query_pos, memory, pos, pad, self_mask, return_attention)
        out = {}
        if dn is not None:  # the denoising queries come first
            n = dn["labels"].shape[1]
            layers = preds if self.cfg.aux_loss else preds[-1:]
            out["dn_outputs"] = [{k: v[:, :n] for k, v in p.items()} for p in layers]
            out["dn_targets"] = {k: dn[k] for k in ("labels", "true_boxes", "valid")}
            preds = [{k: v[:, n:] for k, v in p.items()} for p in preds]
        out.update(preds[-1], aux_outputs=preds[:-1] if self.cfg.aux_loss else [])
        return {**out, "cross_attention": attention, "grid": (h, w)} if return_attention else out

    def _decode(self, tgt, ref, query_pos, memory, pos, pad, self_mask, return_attention: bool):
        """The decoder layers -> ([{"logits", "boxes"}] per layer, [cross-attention] per layer). With anchors
        (``ref`` (B, Q, 4)) each layer's positional query comes from the current boxes, which it refines."""
        preds, attention = [], []
        for i, layer in enumerate(self.decoder):
            if ref is not None:
                query_pos = self.anchor_head(box_sine_embedding(ref, self.cfg.d_model))
                query_pos = query_pos * self.query_scale(tgt) if i else query_pos
            res = layer(tgt, query_pos, memory, pos, pad, need_weights=return_attention, self_mask=self_mask)
            tgt = res[0] if return_attention else res
            if return_attention:
                attention.append(res[1])
            o = self.decoder_norm(tgt)
            delta = self.bbox_embed(o)
            boxes = delta.sigmoid() if ref is None else (delta + torch.logit(ref, eps=1e-3)).sigmoid()
            ref = None if ref is None else boxes.detach()
            preds.append({"logits": self.class_embed(o), "boxes": boxes})
        return preds, attention

    def _denoising_queries(self, targets: list[dict], B: int) -> Optional[dict]:
        """DN-DETR's queries: ``dn_groups`` noised copies of every image's ground truth, padded to the most
        objects of the batch -> {"content" (B, n, d), "boxes" (B, n, 4) noised, "labels" / "true_boxes" /
        "valid" (B, n) to reconstruct, "mask" (B, n + Q, n + Q) True = may not attend (the opposite of SDPA's
        boolean masks; :class:`QKVAttention` inverts it)}."""
        cfg, device = self.cfg, self.anchors.weight.device
        P, G, C = max(len(t["labels"]) for t in targets), cfg.dn_groups, cfg.num_classes
        if P == 0:
            return None
        labels = torch.full((B, P), C, dtype=torch.long, device=device)
        boxes = torch.zeros(B, P, 4, device=device)
        valid = torch.zeros(B, P, dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            m = len(t["labels"])
            labels[b, :m], boxes[b, :m], valid[b, :m] = t["labels"], t["boxes"].to(boxes), True
        labels, boxes, valid = labels.repeat(1, G), boxes.repeat(1, G, 1), valid.repeat(1, G)
        flip = torch.rand(labels.shape, device=device) < cfg.dn_label_noise
        noised_labels = torch.where(flip & valid, torch.randint_like(labels, C), labels)
        spread = torch.cat([boxes[..., 2:] / 2, boxes[..., 2:]], -1)  # centres move by w/2, sizes by w
        noised = (boxes + (torch.rand_like(boxes) * 2 - 1) * spread * cfg.dn_box_noise).clamp(0, 1)
        n, total = G * P, G * P + cfg.num_queries
        group = torch.arange(n, device=device) // P
        blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
        blocked[n:, :n] = True  # the matching queries never see the ground truth
        blocked[:n, :n] = group[:, None] != group[None, :]  # nor a group another group
        mask = blocked[None].repeat(B, 1, 1)
        mask[:, :, :n] |= ~valid[:, None, :]  # padding is seen by no one but itself
        diag = torch.arange(n, device=device)
        mask[:, diag, diag] = False
        return {"content": self.label_embed(noised_labels), "boxes": noised, "labels": labels,
                "true_boxes": boxes, "valid": valid, "mask": mask}


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
def postprocess(outputs: dict, sizes: torch.Tensor, threshold: float = 0.0, focal: bool = False,
                min_boxes: int = 0) -> list[dict]:
    """Per image {"scores" (K,), "labels" (K,), "boxes" (K, 4) xyxy in pixels, clipped, "queries" (K,) the
    object queries they come from} of the predictions whose best real class scores above ``threshold``,
    and at least the ``min_boxes`` best-scored ones whatever their score (in query order, not by score);
    ``sizes`` (B, 2) = (height, width); ``focal``: the logits are per-class sigmoids (``DETRConfig.focal``)."""
    probs = outputs["logits"].sigmoid() if focal else outputs["logits"].softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None].to(outputs["boxes"])
    boxes = torch.min(cxcywh_to_xyxy(outputs["boxes"]).clamp(min=0) * scale, scale)  # clipped to the image
    keep = scores > threshold
    if min_boxes > 0:
        best = scores.topk(min(min_boxes, scores.shape[-1]), dim=-1).indices
        keep = keep.scatter(-1, best, True)
    return [{"scores": s[k], "labels": lab[k], "boxes": b[k], "queries": torch.nonzero(k)[:, 0]}
            for s, lab, b, k in zip(scores, labels, boxes, keep)]
