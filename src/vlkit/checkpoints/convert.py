"""``vlkit convert SRC DST``: a checkpoint vlkit reads through a converter (HF ViT/DeiT, CLIP, SigLIP,
BERT, Llama, Mistral and GPT-2 folders, GGUF files) written once as a vlkit folder (``config.json`` +
``model.safetensors``) that :func:`vlkit.load` reads directly: a GGUF file is dequantised once instead
of at every load, HF tensors are renamed and fused once. ``dtype`` stores the weights in bfloat16 or
float16 (half the size; they load back as the model's float32). The folder's tokenizer, chat template and
preprocessing files are copied along, so a converted CLIP / SigLIP serves ``vlkit search`` and a converted
language model ``decoder.kind=hf``.

Models with no self-contained description (a hybrid ViT's convnet, a VLM made of several checkpoints)
are refused with the reason; a vlkit folder is already converted.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vlkit.checkpoints.io import CheckpointError
from vlkit.checkpoints.timm_vit import is_timm_config, timm_preprocessing
from vlkit.encoders.text import BertEncoder, CLIPTextConfig, CLIPTextTransformer
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.models.clip import CLIP

SIDE_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
              "preprocessor_config.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
              "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TowersConfig:
    """A CLIP-style model as loaded from HF: its towers and projections as they are."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    embed_dim: int = 512
    visual_proj: bool = True  # False: SigLIP (the image tower's pooling head is its projection)
    text_proj_bias: bool = False
    max_logit_scale: float = 100.0  # 0: not clamped (SigLIP)


def build_towers(cfg: TowersConfig) -> CLIP:
    return CLIP(VisionTransformer(cfg.vision), CLIPTextTransformer(cfg.text), cfg.embed_dim,
                max_logit_scale=cfg.max_logit_scale or math.inf, visual_proj=cfg.visual_proj,
                text_proj_bias=cfg.text_proj_bias)


def describe_model(model: nn.Module) -> tuple[str, object]:
    """(vlkit architecture, config) that rebuild ``model``."""
    from vlkit.decoders.causal_lm import CausalLM

    if isinstance(model, CausalLM):
        return "causal_lm", model.cfg
    if isinstance(model, VisionTransformer):
        if model.cfg.embed != "patch":
            raise CheckpointError("a hybrid ViT's convnet has no description of its own: not converted")
        return "vit", model.cfg
    if isinstance(model, BertEncoder):
        return "bert", model.cfg
    if isinstance(model, CLIP) and isinstance(model.text, CLIPTextTransformer) and \
            isinstance(model.visual, VisionTransformer):
        scale = math.exp(model.max_log_scale)
        proj = model.text_proj
        return "clip_towers", TowersConfig(model.visual.cfg, model.text.cfg, proj.out_features,
                                           visual_proj=isinstance(model.visual_proj, nn.Linear),
                                           text_proj_bias=proj.bias is not None,
                                           max_logit_scale=0.0 if math.isinf(scale) else scale)
    raise CheckpointError(f"converting a {type(model).__name__} is not offered (language models, ViTs, BERT "
                          "encoders and CLIP/SigLIP models are)")


def convert(src: str | Path, dst: str | Path, dtype: Optional[str] = None) -> Path:
    """Load ``src`` (any format :func:`vlkit.load` reads) and write it to ``dst`` as a vlkit folder."""
    import vlkit
    from vlkit.checkpoints.hub import read_model_config, save_model

    gguf = Path(src).suffix == ".gguf"
    source = {} if gguf else read_model_config(src)
    if source.get("format") == "vlkit":
        raise CheckpointError(f"{src} is a vlkit folder already")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = vlkit.load(src)
    architecture, cfg = describe_model(model)
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    meta = {"converted_from": str(src), "model_type": source.get("model_type", "gguf" if gguf else None),
            "dtype": dtype or "as loaded"}
    if is_timm_config(source):  # vlkit predict reads the classes and the eval transform from meta
        meta["model_type"] = f"timm {source['architecture']}"
        meta["classes"], meta["transform"] = timm_preprocessing(source)
    folder = save_model(model, dst, architecture, cfg, meta=meta)
    if not gguf:  # what reads the model's text and images travels with it (vlkit search, decoder.kind=hf)
        for name in SIDE_FILES:
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, folder / name)
    return folder
