"""Drawing dense predictions on images: boxes with labels and scores (DETR), where each detected object's
query looks, class masks (Segmenter)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def draw_query_attention(image: Image.Image, maps: torch.Tensor, boxes: torch.Tensor, labels: Sequence[int],
                         names: Sequence[str], scores: Sequence[float], scale: int = 4, alpha: float = 0.55
                         ) -> Image.Image:
    """One panel per detection, side by side: the decoder cross-attention of its object query, ``maps``
    (K, h, w) over the feature map, upsampled and blended over the grey image, with the query's box.
    As DETR's figure 6: a trained query attends to the extremities of its object."""
    from matplotlib import colormaps

    size = (image.width * scale, image.height * scale)
    grey = np.asarray(image.convert("L").resize(size, Image.NEAREST), dtype=np.float32)[..., None].repeat(3, -1)
    panels = []
    for k in range(len(maps)):
        heat = F.interpolate(maps[k][None, None].float(), size=size[::-1], mode="bilinear", align_corners=False)[0, 0]
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-8)
        colour = colormaps["jet"](heat.numpy())[..., :3] * 255
        blended = Image.fromarray(((1 - alpha) * grey + alpha * colour).clip(0, 255).astype(np.uint8))
        panels.append(draw_boxes(blended, boxes[k:k + 1] * scale, [labels[k]], names, [scores[k]], scale=1))
    out = Image.new("RGB", (max(1, len(panels)) * (size[0] + 4), size[1]), "white")
    for k, panel in enumerate(panels):
        out.paste(panel, (k * (size[0] + 4), 0))
    return out
