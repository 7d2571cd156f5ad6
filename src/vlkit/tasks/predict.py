"""Classify image files with a trained run (classifier or DyTox), a vlkit model folder, a HF ViT/DeiT folder
or a timm ViT folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

import vlkit
from vlkit.checkpoints.hub import model_folder, read_model_config
from vlkit.checkpoints.timm_vit import is_timm_config, timm_preprocessing
from vlkit.config import from_dict
from vlkit.data.images import BadImageError, load_image
from vlkit.data.transforms import TransformConfig, build_transform


def preprocessing(path: str | Path) -> tuple[list[str], TransformConfig]:
    """(class names, eval transform config) the model at ``path`` was trained with.

    vlkit folders store them in ``meta``; HF folders in ``id2label`` and ``preprocessor_config.json``; timm
    folders in ``label_names`` and ``pretrained_cfg``."""
    doc = read_model_config(path)
    if doc.get("format") == "vlkit":
        meta = doc.get("meta", {})
        num_classes = doc["config"].get("num_classes", 0)
        classes = meta.get("classes") or [str(i) for i in range(num_classes)]
        return classes, from_dict(TransformConfig, meta.get("transform", {}))
    if is_timm_config(doc):
        classes, fields = timm_preprocessing(doc)
        return classes, from_dict(TransformConfig, fields)
    id2label = doc.get("id2label") or {}
    classes = [id2label.get(str(i), str(i)) for i in range(len(id2label))]
    prep_file = model_folder(path) / "preprocessor_config.json"
    prep = json.loads(prep_file.read_text()) if prep_file.exists() else {}
    size = doc.get("image_size", 224)
    cfg = TransformConfig(image_size=size, mean=tuple(prep.get("image_mean", (0.5, 0.5, 0.5))),
                          std=tuple(prep.get("image_std", (0.5, 0.5, 0.5))), crop_pct=1.0, interpolation="bilinear")
    return classes, cfg


@torch.no_grad()
def predict_files(path: str | Path, images: Sequence[str | Path], top_k: int = 3, batch_size: int = 64) -> list[dict]:
    """Per image ``{"path", "top": [(class, probability) x top_k]}``, or ``{"path", "error"}`` when the
    file cannot be used (missing, corrupt, not an image): reported, never fatal."""
    model = vlkit.load(path)
    classes, tcfg = preprocessing(path)
    transform = build_transform(tcfg, train=False)
    results, pending = [], []
    for image_path in images:
        try:
            pending.append((len(results), transform(load_image(image_path), torch.Generator())))
            results.append({"path": str(image_path)})
        except BadImageError as e:
            results.append({"path": str(image_path), "error": e.reason})
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        out = model(torch.stack([x for _, x in chunk]))
        probs = (out["logits"] if isinstance(out, dict) else out).softmax(-1)  # DyTox returns a dict
        p, idx = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for (i, _), ps, ids in zip(chunk, p.tolist(), idx.tolist()):
            names = [classes[j] if j < len(classes) else str(j) for j in ids]
            results[i]["top"] = list(zip(names, ps))
    return results
