"""Training curves from ``metrics.jsonl``: one panel per metric, train and validation together."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SKIP = {"step", "epoch", "split", "elapsed_s", "batch_size", "nonfinite_steps", "samples_per_s"}


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of ``path`` (blank or truncated trailing lines ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(path: str | Path, out: str | Path) -> Path:
    """Write ``out`` (PNG): for every numeric metric, its value against the step, per split."""
    records = read_metrics(path)
    series: dict[str, dict[str, list]] = {}
    for r in records:
        split = r.get("split", "train")
        for key, value in r.items():
            if key in SKIP or not isinstance(value, (int, float)) or "step" not in r:
                continue
            xs, ys = series.setdefault(key, {}).setdefault(split, ([], []))
            xs.append(r["step"])
            ys.append(value)
    names = sorted(series, key=lambda k: (k != "loss", k))
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (xs, ys) in series[name].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name == "lr" or name.startswith("loss") and min(min(v[1]) for v in series[name].values()) > 0:
            ax.set_yscale("log" if name == "lr" else "linear")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
