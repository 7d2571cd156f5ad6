"""Training curves from ``metrics.jsonl``: one panel per metric, train and validation together."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SKIP = {"step", "epoch", "split", "elapsed_s", "batch_size", "nonfinite_steps", "samples_per_s", "skipped_samples"}


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of the lines of ``path`` (blank, truncated or non-object lines ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def metric_series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{metric: {split: (steps, values)}}`` of the numeric metrics (records without a step skipped)."""
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in records:
        if not isinstance(r.get("step"), (int, float)):
            continue
        split = str(r.get("split", "train"))
        for key, value in r.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            xs, ys = series.setdefault(key, {}).setdefault(split, ([], []))
            xs.append(r["step"])
            ys.append(value)
    return series


def plotted_metrics(series: dict[str, dict[str, tuple[list, list]]]) -> list[str]:
    """The metrics worth a panel, loss first: a term that stayed exactly 0 in every split (a loss
    switched off, e.g. ``loss_dist`` without a teacher) carries nothing and is left out."""
    names = [k for k, splits in series.items() if any(y != 0 for _, ys in splits.values() for y in ys)]
    return sorted(names, key=lambda k: (k != "loss", k))


def plot_metrics(path: str | Path, out: str | Path) -> Path:
    """Write ``out`` (PNG) from ``metrics.jsonl`` lines ``{"step", "split" ("train" | "val"), metric: number}``:
    one panel per metric (loss first, lr on a log scale), its value against the step, one line per split.
    Missing keys, a single point or no metric at all still give a valid image."""
    series = metric_series(read_metrics(path))
    names = plotted_metrics(series)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (xs, ys) in series[name].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name == "lr" and all(y > 0 for _, ys in series[name].values() for y in ys):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if not names:
        axes.flat[0].text(0.5, 0.5, "no metrics yet", ha="center", va="center")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
