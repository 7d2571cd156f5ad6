"""``vlkit predict`` for dense models: DETR runs draw their boxes, Segmenter runs their masks, into
``--out`` (one PNG per image, plus a JSON of the detections / class areas)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import vlkit
from vlkit.checkpoints.hub import read_model_config
from vlkit.config import from_dict
from vlkit.data.images import BadImageError, load_image
from vlkit.data.transforms import TransformConfig, build_transform
from vlkit.models.detr import postprocess
from vlkit.viz.dense import draw_boxes, draw_mask


@torch.no_grad()
def predict_dense(run: str | Path, images: Sequence[str | Path], out_dir: str | Path, threshold: float = 0.5) -> list[dict]:
    doc = read_model_config(run)
    arch, classes = doc["architecture"], doc.get("meta", {}).get("classes", [])
    tcfg = from_dict(TransformConfig, doc["config"]["transform"])
    transform, model = build_transform(tcfg, train=False), vlkit.load(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in images:
        try:
            image = load_image(path)
        except BadImageError as e:
            results.append({"path": str(path), "error": e.reason})
            continue
        pixels = transform(image, torch.Generator())[None]
        shown = image.resize((tcfg.image_size, tcfg.image_size))
        target = out_dir / f"{Path(path).stem}_{arch}.png"
        if arch == "detr":
            det = postprocess(model(pixels), torch.tensor([[tcfg.image_size] * 2]), threshold)[0]
            draw_boxes(shown, det["boxes"], det["labels"].tolist(), classes, det["scores"].tolist()).save(target)
            results.append({"path": str(path), "picture": str(target),
                            "detections": [{"label": classes[int(lab)], "score": float(s), "box": b}
                                           for lab, s, b in zip(det["labels"], det["scores"], det["boxes"].tolist())]})
        else:
            mask = model(pixels).argmax(1)[0]
            draw_mask(shown, mask).save(target)
            area = torch.bincount(mask.flatten(), minlength=len(classes)).float() / mask.numel()
            results.append({"path": str(path), "picture": str(target),
                            "classes": {classes[i]: round(float(a), 4) for i, a in enumerate(area) if a > 0}})
    return results
