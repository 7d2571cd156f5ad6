"""``vlkit predict`` for dense models: DETR runs draw their boxes (and, with ``--attention``, where each
detection's object query looks), Segmenter runs their masks, into ``--out`` (PNGs per image, plus a JSON
of the detections / class areas)."""
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
from vlkit.viz.dense import draw_boxes, draw_mask, draw_query_attention


@torch.no_grad()
def predict_dense(run: str | Path, images: Sequence[str | Path], out_dir: str | Path, threshold: float = 0.5,
                  attention: bool = False, min_boxes: int = 0) -> list[dict]:
    """Draw each image's predictions into ``out_dir``; one result dict per image (``error`` for an unreadable
    one). DETR: the boxes scored above ``threshold`` and at least the ``min_boxes`` best; with
    ``attention`` also ``{stem}_detr_attention.png``, the last decoder layer's cross-attention of each
    drawn detection's query."""
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
            results.append({"path": str(path), **_detect(model, pixels, shown, classes, target, attention,
                                                              threshold, min_boxes)})
        else:
            mask = model(pixels).argmax(1)[0]
            draw_mask(shown, mask).save(target)
            area = torch.bincount(mask.flatten(), minlength=len(classes)).float() / mask.numel()
            results.append({"path": str(path), "picture": str(target),
                            "classes": {classes[i]: round(float(a), 4) for i, a in enumerate(area) if a > 0}})
    return results


def _detect(model, pixels: torch.Tensor, shown, classes: Sequence[str], target: Path, attention: bool,
            threshold: float, min_boxes: int) -> dict:
    out = model(pixels, return_attention=attention)
    det = postprocess(out, torch.tensor([pixels.shape[-2:]]), threshold, focal=model.cfg.focal, min_boxes=min_boxes)[0]
    labels, scores = det["labels"].tolist(), det["scores"].tolist()
    draw_boxes(shown, det["boxes"], labels, classes, scores).save(target)
    result = {"picture": str(target), "detections": [{"label": classes[lab], "score": s, "box": b, "query": int(q)}
                                                     for lab, s, b, q in zip(labels, scores, det["boxes"].tolist(),
                                                                             det["queries"])]}
    if attention:
        maps = out["cross_attention"][-1][0, det["queries"]].reshape(len(labels), *out["grid"])
        picture = target.with_name(f"{target.stem}_attention.png")
        draw_query_attention(shown, maps, det["boxes"], labels, classes, scores).save(picture)
        result["attention_picture"] = str(picture)
    return result
