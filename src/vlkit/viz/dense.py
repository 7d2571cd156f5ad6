"""Drawing dense predictions on images: boxes with labels and scores (DETR), class masks (Segmenter)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_boxes(image: Image.Image, boxes: torch.Tensor, labels: Sequence[int], names: Sequence[str],
               scores: Optional[Sequence[float]] = None, scale: int = 4) -> Image.Image:
    """``image`` enlarged ``scale`` times with xyxy pixel ``boxes`` drawn, each titled "name score"."""
    out = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels)):
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = names[int(label)] + (f" {scores[i]:.2f}" if scores is not None else "")
        draw.text((x0 + 2, max(0, y0 - 11)), text, fill=colour)
    return out


def draw_mask(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5, scale: int = 4) -> Image.Image:
    """``image`` with the class ``mask`` (H, W) ints (0 = background, left clear) blended over it."""
    base = np.asarray(image.convert("RGB").resize(mask.shape[::-1]), dtype=np.float32)
    colours = np.array([(0, 0, 0)] + PALETTE, dtype=np.float32)
    m = mask.cpu().numpy() % len(colours)
    over = np.where((m > 0)[..., None], (1 - alpha) * base + alpha * colours[m], base)
    out = Image.fromarray(over.clip(0, 255).astype(np.uint8))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)
