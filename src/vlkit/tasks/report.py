"""The run report: ``report.md`` with a metrics table, curves, sample predictions and attention maps.

Later stages (CLIP, VLM, detection) append their own sections with :func:`section`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from vlkit.data.base import collate
from vlkit.viz.attention import save_attention_grid
from vlkit.viz.grid import save_prediction_grid


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats are shown with 2 decimals."""
    cell = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, *parts: str) -> str:
    return "\n\n".join([f"## {title}", *[p for p in parts if p]]) + "\n"


def first_batch(dataset, n: int) -> dict:
    """The first ``n`` usable samples of ``dataset`` as a batch (unusable ones skipped)."""
    samples = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample is not None:
            samples.append(sample)
        if len(samples) == n:
            break
    return collate(samples)


@torch.no_grad()
def prediction_figures(model: nn.Module, dataset, classes: Sequence[str], out_dir: Path, n: int = 32) -> list[str]:
    """``predictions.png`` (n images, predicted vs true) and, for ViTs, ``attention.png``.

    Returns the markdown image lines."""
    model.eval()
    batch = first_batch(dataset, n)
    probs = model(batch["image"]).softmax(-1)
    score, pred = probs.max(-1)
    true = [classes[i] for i in batch["label"].tolist()]
    save_prediction_grid(batch["image"], true, [classes[i] for i in pred.tolist()], out_dir / "predictions.png",
                         scores=score.tolist(), title="predicted score (true)")
    lines = ["![predictions](predictions.png)"]
    if hasattr(model, "attention_maps"):
        k = min(6, len(true))
        maps = model.attention_maps(batch["image"][:k])
        layers = _pick_layers(maps["layers"])
        layer_maps = [maps["attn"][:, i].mean(1) for i in layers]  # per layer (k, N), heads averaged
        save_attention_grid(batch["image"][:k], layer_maps, maps["grid"], out_dir / "attention.png",
                            [maps["layers"][i] for i in layers], titles=true[:k])
        lines.append("Class-token attention (heads averaged), per layer:\n\n![attention](attention.png)")
    return lines


def _pick_layers(names: Sequence[str], most: int = 6) -> list[int]:
    """Up to ``most`` evenly spaced layer indices, always including the last."""
    n = len(names)
    if n <= most:
        return list(range(n))
    step = (n - 1) / (most - 1)
    return sorted({round(i * step) for i in range(most)})


def metrics_table(evals: dict) -> str:
    rows = []
    for split, m in evals.items():
        if m:
            rows.append([split, m["top1"], m["top5"], m["mean_class_acc"], m["loss"], m["num_samples"],
                         m.get("num_skipped", 0)])
    return markdown_table(["split", "top-1 %", "top-5 %", "mean class acc %", "loss", "samples", "skipped"], rows)


def per_class_table(classes: Sequence[str], m: dict) -> str:
    rows = [[c, acc] for c, acc in zip(classes, m["per_class_acc"])]
    return markdown_table(["class", "test top-1 %"], rows)


def training_table(summary: dict) -> str:
    keys = [k for k in ("steps", "epochs", "seconds", "samples_per_s", "skipped_samples", "nonfinite_steps")
            if k in summary]
    return markdown_table(keys, [[summary[k] for k in keys]])
