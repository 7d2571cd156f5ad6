"""COCO detection metrics through ``pycocotools`` (the reference implementation): AP averaged over
IoU 0.50:0.95, AP50, AP75 and AP for small / medium / large objects, from predictions and ground
truth given as tensors (no files): both are converted to COCO's in-memory format first.
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import torch

from vlkit.eval.boxes import cxcywh_to_xyxy

STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def coco_map(predictions: Sequence[dict], targets: Sequence[dict], sizes: Sequence[tuple[int, int]],
             num_classes: int) -> dict[str, float]:
    """``predictions`` [{"scores", "labels", "boxes" xyxy pixels}], ``targets`` [{"labels", "boxes" cxcywh
    in [0, 1]}], ``sizes`` [(height, width)] per image -> {AP, AP50, ...} in % (-1 where undefined)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (t, p, (h, w)) in enumerate(zip(targets, predictions, sizes)):
        images.append({"id": i, "height": int(h), "width": int(w)})
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        for label, box in zip(t["labels"].tolist(), cxcywh_to_xyxy(t["boxes"].float()) * scale):
            x0, y0, x1, y1 = box.tolist()
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label), "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        for score, label, box in zip(p["scores"].tolist(), p["labels"].tolist(), p["boxes"].tolist()):
            x0, y0, x1, y1 = box
            dets.append({"image_id": i, "category_id": int(label), "score": float(score),
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        if not dets:
            return {k: 0.0 for k in STATS}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: 100 * float(v) if v >= 0 else -1.0 for k, v in zip(STATS, ev.stats[:6])}
