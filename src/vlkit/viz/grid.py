"""Sample grids: images with their predicted and true labels, written as PNG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def to_display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float image (any range) -> (H, W, C) array in [0, 1] for imshow (min-max if needed)."""
    image = image.detach().float().cpu()
    if image.min() < 0 or image.max() > 1:
        image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def save_prediction_grid(images: torch.Tensor, true: Sequence[str], pred: Sequence[str], path: str | Path,
                         ncols: int = 8, scores: Sequence[float] | None = None, title: str = "") -> Path:
    """Write a grid of ``images`` (N, C, H, W) titled "pred (score) / true", green when right."""
    n = len(images)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(to_display(images[i]), interpolation="nearest")
        label = pred[i] if scores is None else f"{pred[i]} {scores[i]:.2f}"
        ax.set_title(f"{label}\n({true[i]})", fontsize=7, color="green" if pred[i] == true[i] else "red")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
