"""Attention maps over images: a heat map of where the class token looks, per image and layer."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlkit.viz.grid import save_figure, to_display  # noqa: E402


def attention_to_heatmap(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """CLS-to-patch attention (B, N) with N = gh * gw -> (B, H, W) upsampled and scaled to [0, 1]."""
    b = attn.shape[0]
    maps = attn.float().reshape(b, 1, *grid)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp(min=1e-8)


def save_attention_grid(images: torch.Tensor, layer_maps: Sequence[torch.Tensor], grid: tuple[int, int],
                        path: str | Path, layer_names: Sequence[str], titles: Sequence[str] = ()) -> Path:
    """One row per image: the image, then the head-averaged class-token attention of each layer.

    ``images``: (B, C, H, W); ``layer_maps``: per layer a (B, N) attention of the class token over
    the N = gh * gw patches (heads already averaged).
    """
    b = len(images)
    size = tuple(images.shape[-2:])
    heat = [attention_to_heatmap(m, grid, size) for m in layer_maps]
    cols = 1 + len(heat)
    fig, axes = plt.subplots(b, cols, figsize=(1.7 * cols, 1.7 * b), squeeze=False)
    for i in range(b):
        shown = to_display(images[i])
        axes[i, 0].imshow(shown, interpolation="nearest")
        title = titles[i] if i < len(titles) else "image"
        axes[i, 0].set_title("\n".join(textwrap.fill(line, 30) for line in title.split("\n")), fontsize=7)
        for j, h in enumerate(heat):
            axes[i, j + 1].imshow(shown.mean(-1), cmap="gray", interpolation="nearest")
            axes[i, j + 1].imshow(h[i].numpy(), cmap="jet", alpha=0.5, interpolation="bilinear")
            if i == 0:
                axes[i, j + 1].set_title(layer_names[j], fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return save_figure(fig, path)
