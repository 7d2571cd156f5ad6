"""``vlkit.load(path)``: one entry point for every checkpoint layout vlkit reads.

Architectures are data: :data:`ARCHITECTURES` maps the ``architecture`` name written in a vlkit
``config.json`` to its config dataclass and a builder; foreign layouts (HF ``model_type``) map to
converters in :data:`FOREIGN`. Later model families register themselves here.

Layouts recognised for ``path``:
- a vlkit model folder: ``config.json`` with ``"format": "vlkit"`` + ``model.safetensors``;
- a run folder (``vlkit train`` output): its ``model/`` subfolder;
- a HF folder: ``config.json`` with a ``model_type`` in :data:`FOREIGN` + safetensors;
- a ``.gguf`` file (llama architecture): dequantised into a :class:`~vlkit.decoders.causal_lm.CausalLM`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict, read_safetensors, save_pretrained
from vlkit.checkpoints.timm_vit import is_timm_config, load_timm_vit
from vlkit.config import from_dict, replace, to_dict

log = logging.getLogger(__name__)

# architecture name -> (config dataclass, builder(config) -> fresh module ready for a strict load)
ARCHITECTURES: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {}
# HF model_type -> loader(folder) -> module
FOREIGN: dict[str, Callable[[Path], nn.Module]] = {}


def register_architecture(name: str, config_cls: type, build: Callable[[Any], nn.Module]) -> None:
    ARCHITECTURES[name] = (config_cls, build)


def _register_builtin() -> None:
    if "classifier" in ARCHITECTURES:
        return
    from vlkit.checkpoints.hf_vit import load_hf_vit
    from vlkit.models.classifier import ClassifierConfig, build_classifier

    # weights come from the file: never fetch the pretrained convnet again
    register_architecture("classifier", ClassifierConfig, lambda cfg: build_classifier(replace(cfg, pretrained=False)))
    for model_type in ("vit", "deit"):
        FOREIGN[model_type] = load_hf_vit
    from vlkit.encoders.text import load_hf_bert
    from vlkit.models.clip import load_hf_clip, load_hf_siglip, load_hf_siglip_vision
    from vlkit.tasks.contrastive import ContrastiveConfig, build_clip

    register_architecture("clip", ContrastiveConfig, build_clip)
    FOREIGN["clip"] = load_hf_clip
    FOREIGN["siglip"] = load_hf_siglip
    FOREIGN["siglip_vision_model"] = load_hf_siglip_vision
    from vlkit.checkpoints.hf_idefics2 import load_hf_idefics2

    FOREIGN["idefics2"] = load_hf_idefics2
    FOREIGN["bert"] = load_hf_bert
    from vlkit.decoders.causal_lm import DecoderConfig
    from vlkit.decoders.loading import build_causal_lm, load_hf_gpt2, load_hf_llama

    register_architecture("causal_lm", DecoderConfig, build_causal_lm)
    from vlkit.checkpoints.convert import TowersConfig, build_towers
    from vlkit.encoders.text import BertConfig, BertEncoder
    from vlkit.encoders.vit import ViTConfig, VisionTransformer

    register_architecture("clip_towers", TowersConfig, build_towers)  # written by vlkit convert
    register_architecture("vit", ViTConfig, VisionTransformer)
    register_architecture("bert", BertConfig, BertEncoder)
    from vlkit.tasks.detection import DetectionConfig, build_detr

    register_architecture("detr", DetectionConfig, build_detr)
    from vlkit.tasks.segmentation import SegmentationConfig, build_segmenter

    register_architecture("segmenter", SegmentationConfig, build_segmenter)
    from vlkit.models.dytox import DyToxConfig, build_dytox

    register_architecture("dytox", DyToxConfig, build_dytox)
    FOREIGN["llama"] = load_hf_llama
    FOREIGN["mistral"] = load_hf_llama  # Llama's layout; its sliding window is not applied (exact up to its length)
    FOREIGN["gpt2"] = load_hf_gpt2


def save_model(model: nn.Module, folder: str | Path, architecture: str, cfg: Any, meta: dict | None = None) -> Path:
    """Write ``model`` (built from dataclass ``cfg``) as a vlkit folder that :func:`load` reads back."""
    _register_builtin()
    if architecture not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {architecture!r}; registered: {', '.join(ARCHITECTURES)}")
    return save_pretrained(model, folder, architecture, to_dict(cfg), meta=meta)


def model_folder(path: str | Path) -> Path:
    """The folder holding the model's ``config.json`` (``path`` itself, or a run's ``model/``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        path = path.parent
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a model folder (no config.json) nor a run folder (no model/)")
    return path


def read_model_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of the model at ``path`` (vlkit or HF layout)."""
    return json.loads((model_folder(path) / "config.json").read_text())


def load(path: str | Path) -> nn.Module:
    """The model at ``path`` in eval mode; ``forward(images)`` returns logits for classifiers.

    Every key and shape must match (else :class:`CheckpointError` naming the first mismatch).
    """
    _register_builtin()
    if Path(path).suffix == ".gguf":
        from vlkit.decoders.loading import load_gguf

        return load_gguf(path).eval()
    folder = model_folder(path)
    doc = read_model_config(folder)
    if doc.get("format") == "vlkit" and doc.get("architecture") == "vlm":
        from vlkit.tasks.vlm import load_vlm

        return load_vlm(folder)[0]
    if doc.get("format") == "vlkit":
        name = doc.get("architecture")
        if name not in ARCHITECTURES:
            raise CheckpointError(f"{folder}: unknown vlkit architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
        config_cls, build = ARCHITECTURES[name]
        model = build(from_dict(config_cls, doc["config"]))
        load_state_dict_strict(model, read_safetensors(folder / "model.safetensors"), source=str(folder))
        log.info("loaded vlkit %s from %s", name, folder)
        return model.eval()
    if is_timm_config(doc):
        return load_timm_vit(folder)
    model_type = doc.get("model_type")
    if model_type in FOREIGN:
        return FOREIGN[model_type](folder).eval()
    raise CheckpointError(f"{folder}: config.json is neither vlkit's nor a supported HF model_type "
                          f"({model_type!r}; supported: {', '.join(FOREIGN)}) nor timm's (an 'architecture' name)")
