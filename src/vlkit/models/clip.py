"""CLIP-style dual encoders (Radford et al. 2021; LiT, Zhai et al. 2022; SigLIP, Zhai et al. 2023):
any vlkit image encoder + any text encoder, each followed by a linear projection to a shared space,
and a learnable temperature (``logit_scale = log(1 / T)``, clamped so that exp <= 100).

``encode_image(pixels)`` / ``encode_text(ids)`` return the projected, UNnormalised embeddings (HF's
``get_image_features`` / ``get_text_features``); ``forward`` returns them normalised with the
scale (and SigLIP's bias), ready for :mod:`vlkit.losses.contrastive`.

:func:`load_hf_clip` reads an HF-format ``CLIPModel`` folder (config.json + model.safetensors),
:func:`load_hf_siglip` a ``SiglipModel`` one (unclamped scale, its bias; the text padded to the
context length as SigLIP was trained, no attention mask), :func:`load_hf_siglip_vision` a
``SiglipVisionModel`` one (an image encoder for any vlkit model, e.g. a VLM's vision tower).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict
from vlkit.encoders.text import BertEncoder, CLIPTextConfig, CLIPTextTransformer, convert_hf_clip_layer, \
    convert_hf_clip_text
from vlkit.encoders.vit import ViTConfig, VisionTransformer


class CLIP(nn.Module):
    """forward(images (B, C, H, W), input_ids (B, T), attention_mask | None) -> {"image_embeds",
    "text_embeds" (L2-normalised, (B, embed_dim)), "logit_scale" (exp'd, clamped), "logit_bias"}.

    ``image_encoder(pixels)`` must return pooled features ``(B, num_features)`` (a ViT with
    ``num_classes=0``); the text encoder is a :class:`CLIPTextTransformer` (pooled at the end token)
    or a :class:`BertEncoder` (mean pooled over the mask), built without its own projection.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 512,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, init_logit_bias: float = 0.0,
                 visual_proj: bool = True, text_proj_bias: bool = False):
        super().__init__()
        self.visual, self.text = image_encoder, text_encoder
        if not visual_proj and image_encoder.num_features != embed_dim:
            raise ValueError(f"visual_proj=False needs image features of width embed_dim ({embed_dim}), "
                             f"got {image_encoder.num_features}")
        # SigLIP: the image tower's pooling head is its projection; the text projection has a bias
        self.visual_proj = nn.Linear(image_encoder.num_features, embed_dim, bias=False) if visual_proj \
            else nn.Identity()
        self.text_proj = nn.Linear(text_encoder.num_features, embed_dim, bias=text_proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))  # used by the SigLIP loss only
        self.max_log_scale = math.log(max_logit_scale)
        self._locked: dict[str, int] = {}  # tower -> unlocked layers (see lock)
        for proj in (self.visual_proj, self.text_proj):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    def lock(self, tower: str, unlocked_layers: int = 0) -> int:
        """LiT: freeze ``tower`` ("visual" or "text") except its last ``unlocked_layers`` blocks (with
        its final norm when any are unlocked); its projection stays trainable. A fully locked tower
        also stays in eval mode (no dropout / stochastic depth). Returns the trainable parameter
        count of the tower. Per-tower learning rates: ``train.param_groups`` with patterns
        ``visual.`` / ``text.`` and an ``lr_scale``."""
        module = {"visual": self.visual, "text": self.text}.get(tower)
        if module is None:
            raise ValueError(f"tower must be 'visual' or 'text', got {tower!r}")
        blocks = getattr(module, "blocks", None)
        if unlocked_layers and blocks is None:
            raise ValueError(f"the {tower} tower has no .blocks to unlock")
        if not 0 <= unlocked_layers <= (len(blocks) if blocks is not None else 0):
            raise ValueError(f"unlocked_layers {unlocked_layers} is not in [0, {len(blocks)}]")
        module.requires_grad_(False)
        if unlocked_layers:
            blocks[len(blocks) - unlocked_layers:].requires_grad_(True)
            for name in ("norm", "attn_pool"):  # the final norm; SigLIP's pooling head (its projection)
                part = getattr(module, name, None)
                if isinstance(part, nn.Module):
                    part.requires_grad_(True)
        self._locked[tower] = unlocked_layers
        self.train(self.training)
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def train(self, mode: bool = True):
        super().train(mode)
        for tower, unlocked in self._locked.items():
            if unlocked == 0:
                getattr(self, tower).eval()
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_proj(self.visual(pixels))

    def text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The text tower's pooled output, before the projection (B, text.num_features)."""
        if isinstance(self.text, BertEncoder):
            return self.text.encode(input_ids, attention_mask, normalize=False)
        return self.text(input_ids)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text_proj(self.text_features(input_ids, attention_mask))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), the log clamped to [0, log(max_logit_scale)] (gradient passes inside);
        not clamped at all without a maximum (SigLIP)."""
        if math.isinf(self.max_log_scale):
            return self.logit_scale.exp()
        return self.logit_scale.clamp(0, self.max_log_scale).exp()

    def forward(self, images: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, text_features: Optional[torch.Tensor] = None) -> dict:
        """``text_features`` (the tower's output, e.g. cached from a locked tower) replaces ``input_ids``."""
        if text_features is None:
            if input_ids is None:
                raise ValueError("CLIP.forward needs input_ids or text_features")
            text_features = self.text_features(input_ids, attention_mask)
        return {"image_embeds": F.normalize(self.encode_image(images), dim=-1),
                "text_embeds": F.normalize(self.text_proj(text_features), dim=-1),
                "logit_scale": self.scale(), "logit_bias": self.logit_bias}


def _vision_config(v: dict) -> ViTConfig:
    return ViTConfig(image_size=v["image_size"], patch_size=v["patch_size"], num_classes=0,
                     embed_dim=v["hidden_size"], depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                     mlp_ratio=v["intermediate_size"] / v["hidden_size"], act=_act(v.get("hidden_act")),
                     pre_norm=True, patch_bias=False, norm_eps=v.get("layer_norm_eps", 1e-5))


def _act(name: Optional[str]) -> str:
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", None: "quick_gelu"}
    if name not in acts:
        raise ValueError(f"CLIP hidden_act {name!r} is not supported (quick_gelu, gelu)")
    return acts[name]


def _text_config(t: dict) -> CLIPTextConfig:
    eos = t.get("eos_token_id", 2)
    return CLIPTextConfig(vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
                          num_heads=t["num_attention_heads"], mlp_ratio=t["intermediate_size"] / t["hidden_size"],
                          context_length=t["max_position_embeddings"], embed_dim=0, act=_act(t.get("hidden_act")),
                          eos_token_id=None if eos == 2 else eos, layer_norm_eps=t.get("layer_norm_eps", 1e-5))


def convert_hf_clip_vision(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The vision half of an HF ``CLIPModel`` state dict -> a :class:`VisionTransformer`'s."""
    v = "vision_model."
    out = {"cls_token": state[v + "embeddings.class_embedding"].view(1, 1, -1),
           "pos_embed": state[v + "embeddings.position_embedding.weight"][None],
           "patch_embed.proj.weight": state[v + "embeddings.patch_embedding.weight"]}
    for kind in ("weight", "bias"):
        out[f"norm_pre.{kind}"] = state[v + f"pre_layrnorm.{kind}"]
        out[f"norm.{kind}"] = state[v + f"post_layernorm.{kind}"]
    for i in range(depth):
        out.update(convert_hf_clip_layer(state, f"{v}encoder.layers.{i}.", f"blocks.{i}."))
    return out


def _read_hf(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (only safetensors weights are read, never pickles)")
    return json.loads((folder / "config.json").read_text()), load_file(str(weights))


def load_hf_clip(folder: str | Path) -> CLIP:
    """An HF-format ``CLIPModel`` folder as a :class:`CLIP` (weights from safetensors only)."""
    raw, state = _read_hf(folder)
    vcfg, tcfg = _vision_config(raw["vision_config"]), _text_config(raw["text_config"])
    model = CLIP(VisionTransformer(vcfg), CLIPTextTransformer(tcfg), raw.get("projection_dim", 512))
    ours = {f"visual.{k}": w for k, w in convert_hf_clip_vision(state, vcfg.depth).items()}
    text = convert_hf_clip_text(state, tcfg.depth)
    text.pop("proj.weight", None)  # the CLIP owns the text projection
    ours.update({f"text.{k}": w for k, w in text.items()})
    ours.update({"visual_proj.weight": state["visual_projection.weight"],
                 "text_proj.weight": state["text_projection.weight"], "logit_scale": state["logit_scale"],
                 "logit_bias": model.logit_bias.detach().clone()})
    model.load_state_dict(ours)
    return model.eval()


# transformers' defaults: configs saved by older versions omit the values equal to them
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16, layer_norm_eps=1e-6)
SIGLIP_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=64, layer_norm_eps=1e-6)


def siglip_vision_config(v: dict) -> ViTConfig:
    v = {**SIGLIP_VISION_DEFAULTS, **v}
    return ViTConfig(image_size=v["image_size"], patch_size=v["patch_size"], num_classes=0,
                     embed_dim=v["hidden_size"], depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                     mlp_ratio=v["intermediate_size"] / v["hidden_size"], act=_siglip_act(v.get("hidden_act")),
                     class_token=False, global_pool="map" if v.get("vision_use_head", True) else "avg",
                     drop_remainder=True,
                     norm_eps=v.get("layer_norm_eps", 1e-6))


def _siglip_act(name: Optional[str]) -> str:
    acts = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", None: "gelu_tanh", "gelu": "gelu"}
    if name not in acts:
        raise ValueError(f"SigLIP hidden_act {name!r} is not supported (gelu_pytorch_tanh, gelu)")
    return acts[name]


def convert_hf_siglip_vision(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The vision tower of an HF ``SiglipModel`` / ``SiglipVisionModel`` state dict -> a
    :class:`VisionTransformer`'s (``global_pool='map'``: the attention-pooling head too, if present)."""
    v = "vision_model."
    out = {"pos_embed": state[v + "embeddings.position_embedding.weight"][None]}
    for kind in ("weight", "bias"):
        out[f"patch_embed.proj.{kind}"] = state[v + f"embeddings.patch_embedding.{kind}"]
        out[f"norm.{kind}"] = state[v + f"post_layernorm.{kind}"]
    for i in range(depth):
        out.update(convert_hf_clip_layer(state, f"{v}encoder.layers.{i}.", f"blocks.{i}."))
    if v + "head.probe" in state:
        h, D = v + "head.", state[v + "head.probe"].shape[-1]
        out["attn_pool.probe"] = state[h + "probe"]
        for kind in ("weight", "bias"):
            packed = state[h + f"attention.in_proj_{kind}"]  # (3D, ...): q, k, v
            out[f"attn_pool.attn.q.{kind}"], out[f"attn_pool.attn.kv.{kind}"] = packed[:D], packed[D:]
            out[f"attn_pool.attn.proj.{kind}"] = state[h + f"attention.out_proj.{kind}"]
            out[f"attn_pool.norm.{kind}"] = state[h + f"layernorm.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"attn_pool.mlp.{fc}.{kind}"] = state[h + f"mlp.{fc}.{kind}"]
    return out


def load_hf_siglip_vision(folder: str | Path) -> VisionTransformer:
    """An HF-format ``SiglipVisionModel`` folder as a :class:`VisionTransformer`: ``forward_features``
    gives HF's ``last_hidden_state``, ``forward`` its ``pooler_output``."""
    raw, state = _read_hf(folder)
    if not any(k.startswith("vision_model.") for k in state):  # transformers 5 saves the tower unprefixed
        state = {f"vision_model.{k}": w for k, w in state.items()}
    cfg = siglip_vision_config(raw.get("vision_config", raw))
    model = VisionTransformer(cfg)
    load_state_dict_strict(model, convert_hf_siglip_vision(state, cfg.depth), source=str(folder))
    return model.eval()


def load_hf_siglip(folder: str | Path) -> CLIP:
    """An HF-format ``SiglipModel`` folder as a :class:`CLIP` with SigLIP's towers: ``encode_image`` /
    ``encode_text`` give HF's image / text ``pooler_output``, ``forward`` the normalised embeddings with
    the learned scale (not clamped) and bias: logits = scale * image @ text.T + bias."""
    raw, state = _read_hf(folder)
    vcfg = siglip_vision_config(raw.get("vision_config", {}))
    t = {**SIGLIP_TEXT_DEFAULTS, **raw.get("text_config", {})}
    tcfg = CLIPTextConfig(vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
                          num_heads=t["num_attention_heads"], mlp_ratio=t["intermediate_size"] / t["hidden_size"],
                          context_length=t["max_position_embeddings"], embed_dim=0,
                          act=_siglip_act(t.get("hidden_act")), layer_norm_eps=t.get("layer_norm_eps", 1e-6),
                          causal=False, pool="last")
    if vcfg.global_pool != "map":
        raise CheckpointError(f"{folder}: a SiglipModel needs its vision head (vision_use_head=true)")
    model = CLIP(VisionTransformer(vcfg), CLIPTextTransformer(tcfg), t.get("projection_size", t["hidden_size"]),
                 max_logit_scale=math.inf, visual_proj=False, text_proj_bias=True)
    ours = {f"visual.{k}": w for k, w in convert_hf_siglip_vision(state, vcfg.depth).items()}
    ours.update({f"text.{k}": w for k, w in convert_hf_clip_text(state, tcfg.depth).items()})
    ours.update({"text_proj.weight": state["text_model.head.weight"], "text_proj.bias": state["text_model.head.bias"],
                 "logit_scale": state["logit_scale"].reshape(()), "logit_bias": state["logit_bias"].reshape(())})
    load_state_dict_strict(model, ours, source=str(folder))
    return model.eval()
