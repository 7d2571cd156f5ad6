"""Segmenter's mask transformer against its linear-decoder baseline on the synthetic world, same encoder,
same steps, same data order.

    .venv/bin/python experiments/segmenter_decoders.py --steps 1800 --threads 1 --out runs/segmenter_long

Each row is ``vlkit train segmenter_world[_linear] train.epochs=0 train.max_steps=N`` into
``<out>/mask`` and ``<out>/linear`` (side by side, ``--threads`` each; a row whose ``eval.json`` exists is
read back). Writes ``results.md`` (test / compositional mIoU, pixel accuracy, per-class IoU, time) and
``curves.png`` (val mIoU against steps) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlkit.tasks.report import markdown_table  # noqa: E402
from vlkit.viz.curves import read_metrics  # noqa: E402
from vlkit.viz.grid import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"mask": "segmenter_world", "linear": "segmenter_world_linear"}


def train_rows(args) -> None:
    procs = []
    for row, recipe in ROWS.items():
        out = Path(args.out) / row
        if (out / "eval.json").is_file():
            continue
        cmd = [sys.executable, "-m", "vlkit.cli", "train", recipe, "train.epochs=0", f"train.max_steps={args.steps}",
               "--run-dir", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        with open(Path(args.out) / f"{row}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"a run failed: {proc.args}")


def summarise(out: Path) -> None:
    rows, fig = [], plt.figure(figsize=(6, 4))
    for row in ROWS:
        doc = json.loads((out / row / "eval.json").read_text())
        ev, classes = doc["eval"], [k for k in doc["eval"]["test"] if k.startswith("iou_")]
        rows.append({"decoder": row, "test mIoU %": round(ev["test"]["mIoU"], 2),
                     "pixel acc %": round(ev["test"]["pixel_acc"], 2),
                     "compositional mIoU %": round(ev["compositional"]["mIoU"], 2),
                     **{k[4:]: round(ev["test"][k], 1) for k in classes},
                     "train s": round(doc["train"]["seconds"])})
        val = [m for m in read_metrics(out / row / "metrics.jsonl") if m.get("split") == "val"]
        plt.plot([m["step"] for m in val], [m["mIoU"] for m in val], marker="o", label=row)
    plt.xlabel("step (batch 32)"), plt.ylabel("val mIoU %"), plt.legend(), plt.grid(alpha=0.3)
    save_figure(fig, out / "curves.png", "Segmenter on the synthetic world: mask transformer vs linear decoder")
    table = markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    (out / "results.md").write_text(table + "\n")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/segmenter_long")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train_rows(args)
    summarise(Path(args.out))


if __name__ == "__main__":
    main()
