"""Hugging Face ViT / DeiT checkpoints -> :class:`vlkit.encoders.vit.VisionTransformer`.

Reads a folder written by ``save_pretrained`` (``config.json`` + ``model.safetensors``, or a sharded
``model.safetensors.index.json``) of one of :data:`HF_ARCHITECTURES`, converts the state dict with
the pure function :func:`convert_hf_vit_state_dict`, and loads it strictly: every key and shape must
match or :class:`~vlkit.checkpoints.io.CheckpointError` names the first mismatch. Nothing is unpickled.

HF keeps separate query/key/value projections; vlkit fuses them into one ``qkv`` Linear
(rows [q; k; v]). Both the on-disk names (``encoder.layer.N.attention.attention.query``) and the
transformers-5 module names (``layers.N.attention.q_proj``) are understood.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict, read_safetensors
from vlkit.config import ConfigError
from vlkit.encoders.vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

__all__ = ["HF_ARCHITECTURES", "convert_hf_vit_state_dict", "vit_config_from_hf", "load_hf_vit",
           "load_state_dict_strict"]

# HF class -> (has a classifier, head on the distillation token). DeiT checkpoints always carry the token.
HF_ARCHITECTURES = {
    "ViTModel": (False, False),
    "ViTForImageClassification": (True, False),
    "DeiTModel": (False, False),
    "DeiTForImageClassification": (True, False),
    "DeiTForImageClassificationWithTeacher": (True, True),
}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_P = r"\.(weight|bias)$"
_RENAMES = [  # (pattern on the HF key without its 'vit.'/'deit.' prefix, vlkit key)
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection" + _P, r"patch_embed.proj.\1"),
    (r"^" + _LAYER + r"layernorm_before" + _P, r"blocks.\1.norm1.\2"),
    (r"^" + _LAYER + r"layernorm_after" + _P, r"blocks.\1.norm2.\2"),
    (r"^" + _LAYER + r"attention\.(?:output\.dense|o_proj)" + _P, r"blocks.\1.attn.proj.\2"),
    (r"^" + _LAYER + r"(?:intermediate\.dense|mlp\.fc1)" + _P, r"blocks.\1.mlp.fc1.\2"),
    (r"^" + _LAYER + r"(?:output\.dense|mlp\.fc2)" + _P, r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm" + _P, r"norm.\1"),
    (r"^(?:classifier|cls_classifier)" + _P, r"head.\1"),
    (r"^distillation_classifier" + _P, r"head_dist.\1"),
]
_QKV = re.compile(r"^" + _LAYER + r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)" + _P)
_DROPPED = re.compile(r"^pooler\.dense" + _P)  # ViTModel's tanh pooler: not part of the encoder


def _strip_prefix(key: str) -> str:
    for prefix in ("vit.", "deit."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _rename(key: str) -> str | None:
    for pattern, target in _RENAMES:
        new, n = re.subn(pattern, target, key)
        if n:
            return new
    return None


def convert_hf_vit_state_dict(sd: Mapping[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """HF ViT/DeiT state dict -> VisionTransformer state dict (pure: ``sd`` is not modified).

    q/k/v weights and biases of each layer are concatenated into ``blocks.N.attn.qkv``; the
    ViTModel pooler is dropped; any other unknown key raises :class:`CheckpointError`.
    ``cfg`` is the target architecture: the checkpoint must have ``cfg.depth`` layers.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for hf_key, tensor in sd.items():
        key = _strip_prefix(hf_key)
        if m := _QKV.match(key):
            layer, hf_name, short, param = m.groups()
            qkv.setdefault((int(layer), param), {})[(hf_name or short)[0]] = tensor
        elif _DROPPED.match(key):
            log.info("dropping %s (ViTModel pooler, not used by VisionTransformer)", hf_key)
        elif (new := _rename(key)) is not None:
            out[new] = tensor
        else:
            raise CheckpointError(f"unexpected key '{hf_key}' in HF ViT checkpoint")
    for (layer, param), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"layer {layer}: {param} of query/key/value incomplete (have {sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    depth = len({layer for layer, _ in qkv})
    if depth != cfg.depth:
        raise CheckpointError(f"checkpoint has {depth} layers, config depth is {cfg.depth}")
    return out


def _square(value, field: str) -> int:
    """HF allows int or [h, w]; vlkit's ViTConfig is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(field, f"only square sizes are supported, got {value}")
        value = value[0]
    return int(value)


def vit_config_from_hf(hf: Mapping) -> ViTConfig:
    """HF ``config.json`` (dict) of a ViT/DeiT model -> a new :class:`ViTConfig`; raises ConfigError."""
    if hf.get("model_type") not in ("vit", "deit"):
        raise ConfigError("model_type", f"expected 'vit' or 'deit', got {hf.get('model_type')!r}")
    arch = (hf.get("architectures") or ["ViTModel" if hf["model_type"] == "vit" else "DeiTModel"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ConfigError("architectures", f"{arch!r} is not one of {list(HF_ARCHITECTURES)}")
    has_head, dist_head = HF_ARCHITECTURES[arch]
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ConfigError("hidden_act", f"{act!r} is not one of {list(HF_ACTIVATIONS)}")
    dim, hidden = hf["hidden_size"], hf["intermediate_size"]
    if int(dim * (hidden / dim)) != hidden:
        raise ConfigError("intermediate_size", f"{hidden} is not int(hidden_size * mlp_ratio) for any mlp_ratio")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    return ViTConfig(
        image_size=_square(hf.get("image_size", 224), "image_size"),
        patch_size=_square(hf.get("patch_size", 16), "patch_size"), in_chans=hf.get("num_channels", 3),
        num_classes=num_labels if has_head else 0, embed_dim=dim, depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_ratio=hidden / dim, qkv_bias=hf.get("qkv_bias", True),
        act=HF_ACTIVATIONS[act], num_dist_tokens=int(hf["model_type"] == "deit"), dist_head=dist_head,
        drop_rate=hf.get("hidden_dropout_prob", 0.0), attn_drop_rate=hf.get("attention_probs_dropout_prob", 0.0),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
    )


def read_hf_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``, or every shard listed in ``model.safetensors.index.json``."""
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        sd.update(read_safetensors(folder / shard))
    return sd


def load_hf_vit(folder: str | Path) -> VisionTransformer:
    """A HF ViT/DeiT folder (config.json + safetensors) -> VisionTransformer in eval mode, loaded strictly."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json: not a HF model folder")
    cfg = vit_config_from_hf(json.loads((folder / "config.json").read_text()))
    model = VisionTransformer(cfg)
    load_state_dict_strict(model, convert_hf_vit_state_dict(read_hf_safetensors(folder), cfg), source=str(folder))
    log.info("loaded HF %s from %s", "DeiT" if cfg.num_dist_tokens else "ViT", folder)
    return model.eval()
