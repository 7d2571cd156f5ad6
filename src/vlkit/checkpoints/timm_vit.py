"""timm ViT checkpoints (ViT, DeiT, DeiT III, CLIP, SigLIP, DINOv2) -> :class:`VisionTransformer`.

Reads the folder timm writes with ``save_pretrained`` / ``push_to_hub`` (the layout of the Hugging Face
Hub's ``timm/...`` repositories): ``config.json`` with the ``architecture`` name (``vit_base_patch16_224``),
``num_classes``, ``global_pool``, optional ``model_args`` and ``label_names``, and ``pretrained_cfg``
(input size, mean, std, crop); the weights in ``model.safetensors``. Nothing is unpickled: a folder with
only ``pytorch_model.bin`` is refused.

vlkit's ViT uses timm's parameter names, so the state dict is mostly kept as it is:

- The architecture comes from the tensors (width, depth, patch, grid, MLP ratio, biases, class and
  distillation tokens, LayerScale, pre-norm, attention pooling, norm after pooling). What tensors do
  not show (heads, activation, LayerNorm epsilon) comes from ``model_args`` in config.json, else from
  the table of timm's registry (:mod:`vlkit.checkpoints.timm_vit_table`, written from timm itself by
  scripts/timm_vit_table.py: timm's SigLIP 1 towers use exact GELU, its SigLIP 2 ones tanh GELU), else
  timm's defaults with a warning.
- A position embedding without rows for the class token (``no_embed_class``: DeiT III) gets zero rows
  for the prefix tokens: every token gets the same sum.
- SigLIP's attention pooling: ``attn_pool.latent`` is vlkit's ``attn_pool.probe``, its ``q``, ``kv``
  and ``proj`` sit under ``attn_pool.attn``.

Variants vlkit's ViT does not have (register tokens, hybrid convnet stems, qk-norm, SwiGLU MLPs, EVA's
rotary embedding, ...) are refused with :class:`CheckpointError` naming the first foreign key. At other
image sizes the grid is interpolated as vlkit does (bicubic, as HF; timm's dynamic sizes antialias).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping

import torch

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict, read_safetensors
from vlkit.checkpoints.timm_vit_table import TIMM_NOT_VITS, TIMM_VERSION, TIMM_VITS
from vlkit.encoders.vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

__all__ = ["HEADS_BY_WIDTH", "TIMM_VITS", "is_timm_config", "timm_vit_config", "convert_timm_vit_state_dict",
           "load_timm_vit", "timm_preprocessing"]

# The usual head count of timm's ViTs of a width (tiny ... gigantic): the guess for names missing from TIMM_VITS.
HEADS_BY_WIDTH = {192: 3, 256: 4, 320: 5, 384: 6, 512: 8, 640: 10, 768: 12, 880: 16, 1024: 16, 1152: 16,
                  1280: 16, 1408: 16, 1536: 24, 1664: 16}
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu",
               "swish": "silu"}  # timm's act_layer names -> vlkit's
_POOL_RENAMES = {"attn_pool.latent": "attn_pool.probe", "attn_pool.q.": "attn_pool.attn.q.",
                 "attn_pool.kv.": "attn_pool.attn.kv.", "attn_pool.proj.": "attn_pool.attn.proj."}
# model_args that build, under the same tensor names, blocks or pooling vlkit's ViT does not compute
_MODEL_ARGS_REFUSED = ("block_fn", "mlp_layer", "norm_layer", "attn_layer", "embed_layer", "pool_include_prefix",
                       "dynamic_img_pad")
_POOLS = ("token", "avg", "map", "")  # timm's global_pool values vlkit computes ('': unpooled)
_REFUSED = {"reg_token": "register tokens (ViT-*-reg / DINOv2-reg)", "patch_embed.backbone.": "a hybrid convnet stem",
            "rope": "rotary position embedding (EVA)", "blocks_token_only.": "CaiT's talking-heads layout"}


def is_timm_config(doc: Mapping) -> bool:
    """Whether a parsed ``config.json`` is timm's (an ``architecture`` name, no HF ``model_type``)."""
    return isinstance(doc.get("architecture"), str) and "model_type" not in doc and doc.get("format") != "vlkit"


def _facts(name: str, width: int, model_args: Mapping) -> tuple[int, str, float]:
    """(heads, activation, LayerNorm epsilon): ``model_args`` (what timm builds the model with), else
    timm's registry (:data:`TIMM_VITS`), else timm's defaults (exact GELU, 1e-6; the usual heads for the
    width, :data:`HEADS_BY_WIDTH`, else width / 64), with a warning."""
    heads, act, eps = TIMM_VITS.get(name, (HEADS_BY_WIDTH.get(width, width // 64), "gelu", 1e-6))
    heads, act = int(model_args.get("num_heads", heads)), model_args.get("act_layer", act)
    if name not in TIMM_VITS:
        log.warning("timm %s is not in vlkit's table of timm %s ViTs: assuming %d heads, %s and LayerNorm eps "
                    "1e-6 (model_args.num_heads / act_layer in config.json say otherwise)", name, TIMM_VERSION,
                    heads, act)
    if act not in ACTIVATIONS:
        raise CheckpointError(f"timm {name}: activation {act!r} is not one of {list(ACTIVATIONS)}")
    if heads < 1 or width % heads:
        raise CheckpointError(f"timm {name}: width {width} does not split into {heads} heads; "
                              "write the head count as model_args.num_heads in config.json")
    return heads, ACTIVATIONS[act], eps


def _grid(state: Mapping[str, torch.Tensor], prefix: int, name: str) -> tuple[int, bool]:
    """(grid side, whether the position embedding has rows for the prefix tokens)."""
    rows = state["pos_embed"].shape[1]
    for with_prefix in (True, False):
        side = math.isqrt(rows - prefix * with_prefix)
        if side * side == rows - prefix * with_prefix:
            return side, with_prefix
    raise CheckpointError(f"timm {name}: a position embedding of {rows} rows is not a square grid")


def _image_size(doc: Mapping, side: int, patch: int) -> tuple[int, bool]:
    """(image side, drop_remainder): pretrained_cfg's input size when its grid is the checkpoint's."""
    size = (doc.get("pretrained_cfg") or {}).get("input_size") or [3, side * patch, side * patch]
    if size[-1] != size[-2]:
        raise CheckpointError(f"timm {doc['architecture']}: only square inputs are supported, got {size}")
    if size[-1] // patch != side:
        return side * patch, False
    return int(size[-1]), bool(size[-1] % patch)


def _pool(doc: Mapping, model_args: Mapping, state: Mapping[str, torch.Tensor], name: str) -> str:
    """vlkit's global_pool for timm's (config.json's root, else model_args; '' = unpooled: vlkit pools as the
    tokens allow, forward_features gives timm's tokens)."""
    timm_pool = doc.get("global_pool", model_args.get("global_pool", "map" if "attn_pool.latent" in state else "token"))
    if timm_pool not in _POOLS:
        raise CheckpointError(f"timm {name}: global_pool {timm_pool!r} is not one of vlkit's (token, avg, map)")
    if timm_pool == "map" or "attn_pool.latent" in state:
        if "attn_pool.latent" not in state:
            raise CheckpointError(f"timm {name}: global_pool 'map' without attn_pool tensors")
        if "cls_token" in state or "dist_token" in state:  # timm pools the patch tokens only, vlkit all of them
            raise CheckpointError(f"timm {name}: attention pooling next to a class token is not vlkit's")
        if state["attn_pool.latent"].shape[1] != 1:
            raise CheckpointError(f"timm {name}: attention pooling with {state['attn_pool.latent'].shape[1]} latents")
        return "map"
    if not timm_pool:
        log.warning("timm %s returns its tokens unpooled; vlkit's forward pools them (forward_features: the tokens)",
                    name)
    return "avg" if timm_pool == "avg" or "cls_token" not in state else "token"


def timm_vit_config(doc: Mapping, state: Mapping[str, torch.Tensor]) -> tuple[ViTConfig, bool]:
    """(the :class:`ViTConfig` of a timm ``config.json`` and its state dict, whether the position
    embedding must gain rows for the prefix tokens)."""
    name, args = doc["architecture"], doc.get("model_args") or {}
    if name in TIMM_NOT_VITS:
        raise CheckpointError(f"timm {name}: its tensors are named as a ViT's but it computes otherwise (post-norm "
                              "blocks, rotary embedding or other pooling): not a variant vlkit's ViT has")
    refused = sorted(k for k in _MODEL_ARGS_REFUSED if args.get(k) not in (None, False))
    if refused:
        raise CheckpointError(f"timm {name}: model_args {refused} build a ViT vlkit's does not have")
    for key in state:
        for start, what in _REFUSED.items():
            if key.startswith(start):
                raise CheckpointError(f"timm {name}: {what} is not part of vlkit's ViT (key {key!r})")
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(f"timm {name}: not a ViT (no patch_embed.proj.weight / pos_embed)")
    width, in_chans, patch, patch_w = state["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise CheckpointError(f"timm {name}: only square patches are supported, got {patch} x {patch_w}")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if depth and "blocks.0.mlp.fc1.weight" not in state:
        mlp = sorted(k for k in state if k.startswith("blocks.0.mlp."))
        raise CheckpointError(f"timm {name}: the MLP is not vlkit's fc1 / fc2 (keys {mlp[:3]})")
    prefix = int("cls_token" in state) + int("dist_token" in state)
    side, pos_has_prefix = _grid(state, prefix, name)
    image_size, drop_remainder = _image_size(doc, side, patch)
    pool = _pool(doc, args, state, name)
    head = state.get("head.weight")
    heads, act, eps = _facts(name, width, args)
    cfg = ViTConfig(
        image_size=image_size, patch_size=patch, in_chans=in_chans, num_classes=0 if head is None else head.shape[0],
        embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in state, act=act, pre_norm="norm_pre.weight" in state,
        patch_bias="patch_embed.proj.bias" in state, drop_remainder=drop_remainder,
        class_token="cls_token" in state, num_dist_tokens=int("dist_token" in state),
        dist_head="head_dist.weight" in state, layer_scale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
        norm_eps=eps, global_pool=pool, fc_norm="fc_norm.weight" in state)
    return cfg, not pos_has_prefix


def convert_timm_vit_state_dict(state: Mapping[str, torch.Tensor], cfg: ViTConfig,
                                pad_pos_embed: bool = False) -> dict[str, torch.Tensor]:
    """timm ViT state dict -> VisionTransformer state dict (pure: ``state`` is not modified).

    ``pad_pos_embed``: zero rows for the prefix tokens go in front of the position embedding."""
    out = {}
    for key, tensor in state.items():
        for old, new in _POOL_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = tensor
    if pad_pos_embed:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, cfg.num_prefix_tokens, pos.shape[-1]), pos], dim=1)
    return out


def load_timm_vit(folder: str | Path) -> VisionTransformer:
    """A timm ViT folder (config.json + model.safetensors) -> VisionTransformer in eval mode, loaded strictly."""
    folder = Path(folder)
    doc = json.loads((folder / "config.json").read_text())
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} has no model.safetensors (pytorch_model.bin is a pickle: never "
                              "unpickled; convert it with safetensors where you trust it)")
    state = read_safetensors(folder / "model.safetensors")
    cfg, pad = timm_vit_config(doc, state)
    model = VisionTransformer(cfg)
    try:
        load_state_dict_strict(model, convert_timm_vit_state_dict(state, cfg, pad), source=str(folder))
    except CheckpointError as e:
        raise CheckpointError(f"timm {doc['architecture']} is not a variant vlkit's ViT has: {e}") from None
    log.info("loaded timm %s from %s: ViT d %d x %d, %d heads, patch %d", doc["architecture"], folder,
             cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size)
    return model.eval()


def timm_preprocessing(doc: Mapping) -> tuple[list[str], dict]:
    """(class names, :class:`~vlkit.data.transforms.TransformConfig` fields) of a timm ``config.json``:
    ``label_names`` (a list, or a dict by index) and ``pretrained_cfg``'s input size, mean, std,
    interpolation and crop fraction."""
    labels = doc.get("label_names") or []
    if isinstance(labels, Mapping):
        labels = [str(labels.get(str(i), labels.get(i, i))) for i in range(doc.get("num_classes", len(labels)))]
    pre = doc.get("pretrained_cfg") or {}
    interpolation = pre.get("interpolation", "bicubic")
    fields = {"image_size": int((pre.get("input_size") or [3, 224, 224])[-1]),
              "mean": tuple(pre.get("mean", (0.485, 0.456, 0.406))),
              "std": tuple(pre.get("std", (0.229, 0.224, 0.225))),
              "interpolation": interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bicubic",
              "crop_pct": float(pre.get("crop_pct") or 0.875)}
    if pre.get("crop_mode", "center") == "squash":
        fields["eval_squash"] = True
    return [str(x) for x in labels], fields
