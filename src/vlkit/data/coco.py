"""COCO-format detection / segmentation datasets: an annotation JSON (``images``, ``annotations``
with ``bbox`` (x, y, w, h) in pixels, ``category_id``, optional ``segmentation`` polygons or RLE,
``categories``) and an image folder.

Samples match the synthetic world's detection / segmentation ones: ``{"image": PIL (side x side),
"boxes": (M, 4) cxcywh in [0, 1], "box_labels": (M,) contiguous class indices, "semantic_mask":
(side, side) int64 with 0 = background, 1 + class index}``. Images are resized to a square
``side`` (boxes are normalised, so they stay right). Crowd annotations are skipped; degenerate
boxes (no area) are dropped and counted; unreadable images give ``None`` (counted by the collate).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlkit.data.images import BadImageError, load_image

log = logging.getLogger(__name__)


class CocoDetection(Dataset):
    def __init__(self, annotations: str | Path, image_root: str | Path, side: int = 64, masks: bool = False):
        self.path = Path(annotations)
        doc = json.loads(self.path.read_text())
        self.root, self.side, self.masks = Path(image_root), side, masks
        cats = sorted(doc.get("categories", []), key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{annotations}: no categories")
        self.cat_index = {c["id"]: i for i, c in enumerate(cats)}
        self.classes = [c["name"] for c in cats]
        self.images = doc.get("images", [])
        self.anns: dict[int, list] = {}
        dropped = 0
        for a in doc.get("annotations", []):
            if a.get("iscrowd", 0):
                continue
            w, h = a["bbox"][2:]
            if w <= 0 or h <= 0 or a["category_id"] not in self.cat_index:
                dropped += 1
                continue
            self.anns.setdefault(a["image_id"], []).append(a)
        if dropped:
            log.warning("%s: %d annotations dropped (empty box or unknown category)", annotations, dropped)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Optional[dict]:
        info = self.images[i]
        try:
            image = load_image(self.root / info["file_name"])
        except BadImageError as e:
            log.warning("skipped %s: %s", e.path, e.reason)
            return None
        W, H = image.size
        anns = self.anns.get(info["id"], [])
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.stack([(xywh[:, 0] + xywh[:, 2] / 2) / W, (xywh[:, 1] + xywh[:, 3] / 2) / H,
                             xywh[:, 2] / W, xywh[:, 3] / H], dim=-1).clamp(0, 1)
        sample = {"image": image.resize((self.side, self.side), Image.BILINEAR), "boxes": boxes,
                  "box_labels": torch.tensor([self.cat_index[a["category_id"]] for a in anns], dtype=torch.long),
                  "label": 0}
        if self.masks:
            sample["semantic_mask"] = self._semantic(anns, H, W)
        return sample

    def _semantic(self, anns: list, H: int, W: int) -> torch.Tensor:
        from pycocotools import mask as mask_utils

        canvas = np.zeros((H, W), dtype=np.int64)
        for a in anns:  # later annotations paint over earlier ones
            seg = a.get("segmentation")
            if not seg:
                continue
            rle = mask_utils.frPyObjects(seg, H, W) if isinstance(seg, list) else seg
            m = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle)
            canvas[m > 0] = 1 + self.cat_index[a["category_id"]]
        small = Image.fromarray(canvas.astype(np.int32)).resize((self.side, self.side), Image.NEAREST)
        return torch.from_numpy(np.asarray(small, dtype=np.int64))
