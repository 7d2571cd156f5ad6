"""Sample grids written as PNG: images with their predicted and true labels; retrieval results per query."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def save_figure(fig, path: str | Path, title: str = "", dpi: int = 110) -> Path:
    """Title (optional), tight layout, write ``fig`` to ``path`` (parent folders created), close it."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
    return save_figure(fig, path, title=title)


@dataclass
class RetrievalRow:
    """One query and its results: ``images`` (PIL images or (C, H, W) tensors), a label per image
    (e.g. score and file name), and optionally whether each result is a correct match."""

    query: str
    images: Sequence
    labels: Sequence[str]
    correct: Optional[Sequence[bool]] = None
    query_image: Any = None  # an image query, drawn in the first column


def save_retrieval_grid(rows: Sequence[RetrievalRow], path: str | Path, title: str = "") -> Path:
    """Write one row per query: the query (text, or its image) then its top results, labelled;
    green / red titles where correctness is known."""
    ncols = 1 + max((len(r.images) for r in rows), default=0)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.9 * ncols, 2.1 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        head = axes[r, 0]
        if row.query_image is not None:
            head.imshow(_as_array(row.query_image), interpolation="nearest")
            head.set_title("query image", fontsize=8)
        else:
            head.text(0.5, 0.5, "\n".join(textwrap.wrap(row.query, 18)), ha="center", va="center", fontsize=9,
                      transform=head.transAxes, bbox={"boxstyle": "round", "facecolor": "#eeeeee"})
        for c, (image, label) in enumerate(zip(row.images, row.labels), start=1):
            ax = axes[r, c]
            ax.imshow(_as_array(image), interpolation="nearest")
            color = "black" if row.correct is None else ("green" if row.correct[c - 1] else "red")
            ax.set_title(label, fontsize=7, color=color)
    return save_figure(fig, path, title=title)


def _as_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return to_display(image)
    return np.asarray(image.convert("RGB"))


def save_text_grid(images: Sequence, texts: Sequence[str], path: str | Path, correct: Optional[Sequence[bool]] = None,
                   ncols: int = 4, width: int = 34, title: str = "") -> Path:
    """Images (PIL or (C, H, W) tensors) each above a wrapped text (question, prediction, reference);
    green / red text where ``correct`` is given."""
    n = len(images)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(_as_array(images[i]), interpolation="nearest")
        color = "black" if correct is None else ("green" if correct[i] else "red")
        wrapped = "\n".join(line for part in texts[i].split("\n") for line in textwrap.wrap(part, width) or [""])
        ax.set_title(wrapped, fontsize=7, color=color, loc="left")
    return save_figure(fig, path, title=title, dpi=100)
