"""DETR's slow convergence and its remedies at an equal CPU budget on the synthetic world:
DETR as published, DAB-DETR's anchor-box queries, DN-DETR's denoising groups, and a backbone
pretrained on the world's classification task (as DETR starts from an ImageNet ResNet).

    .venv/bin/python experiments/detr_convergence.py --steps 1500 --out runs/detr
    .venv/bin/python experiments/detr_convergence.py --steps 1500 --rows dn,pre_dn --out runs/detr   # some rows

Every row trains ``configs/detr_world.yaml`` for ``--steps`` optimizer steps of 32 scenes (same seed,
same data order), evaluating val AP every ``--eval-every`` steps, then the test and compositional
splits. Rows: ``vanilla`` (learned queries), ``anchor`` (DAB-DETR), ``dn`` (anchor + 5 denoising
groups), ``dn_focal`` (+ sigmoid classes and the focal loss, class cost and weight 2), and
``pre_<row>``: the same with the ViT backbone first trained on the world's classification (``vlkit
train vit_world`` at the detector's backbone size, ``--pretrain-epochs``, trained once into
``<out>/vit_world_d4`` and reused), fine-tuned at a tenth of the lr as in DETR.
Writes ``results.md`` (table) and ``convergence.png`` (val AP50 against steps) into ``--out``; a row
whose ``eval.json`` exists is read back, so rows can run in separate processes and be summed up after;
``--also RUN=LABEL`` adds finished runs trained otherwise (e.g. another lr, more steps).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlkit.cli import load_recipe  # noqa: E402
from vlkit.tasks import classification, detection  # noqa: E402
from vlkit.tasks.report import markdown_table  # noqa: E402
from vlkit.viz.curves import read_metrics  # noqa: E402
from vlkit.viz.grid import save_figure  # noqa: E402

ROWS = {
    "vanilla": [],
    "anchor": ["detr.queries=anchor"],
    "dn": ["detr.queries=anchor", "detr.dn_groups=5"],
    "dn_focal": ["detr.queries=anchor", "detr.dn_groups=5", "detr.focal=true", "cost_class=2"],
}
FINETUNE = "train.param_groups=[{pattern: '^backbone\\.', lr_scale: 0.1}]"
LABELS = {"vanilla": "DETR (learned queries)", "anchor": "DAB-DETR anchor queries",
          "dn": "anchor + DN denoising (5 groups)", "dn_focal": "anchor + DN + focal loss"}


def pretrained_backbone(args) -> Path:
    run = Path(args.out) / "vit_world_d4"
    if not (run / "eval.json").is_file():
        cfg, _ = load_recipe("vit_world", ["model.vit.depth=4", f"train.epochs={args.pretrain_epochs}",
                                           "train.warmup_steps=100"])
        classification.train(cfg, run)
    return run


def row_overrides(name: str, args) -> list[str]:
    base = name.removeprefix("pre_")
    if base not in ROWS:
        raise SystemExit(f"unknown row {name!r}: {', '.join(ROWS)}, or pre_<row>")
    pre = [f"backbone_init={pretrained_backbone(args)}", FINETUNE] if name.startswith("pre_") else []
    return [*ROWS[base], *pre]


def run_row(name: str, args) -> dict:
    run_dir = Path(args.out) / name
    done = run_dir / "eval.json"
    if not done.is_file():
        overrides = [*row_overrides(name, args), "train.epochs=0", f"train.max_steps={args.steps}",
                     f"train.eval_every={args.eval_every}", *args.overrides]
        cfg, _ = load_recipe("detr_world", overrides)
        detection.train(cfg, run_dir)
    return {**json.loads(done.read_text()), "curve": val_curve(run_dir)}


def val_curve(run_dir: Path) -> tuple[list, list]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "val" and "AP50" in r]
    return [r["step"] for r in rows], [r["AP50"] for r in rows]


def label(name: str) -> str:
    if name.removeprefix("pre_") not in LABELS:
        return name  # a finished run added with --also
    base = LABELS[name.removeprefix("pre_")]
    return f"{base}, pretrained backbone" if name.startswith("pre_") else base


def plot(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        steps, ap50 = r["curve"]
        ax.plot(steps, ap50, "s--" if name == "vanilla" else "o-", label=label(name))
    ax.set_xlabel("optimizer step (32 scenes each)")
    ax.set_ylabel("val AP50 (%)")
    ax.set_title("DETR on the synthetic world: convergence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        test, comp = r["eval"]["test"], r["eval"]["compositional"]
        rows.append([name, label(name), f"{test['AP']:.2f}", f"{test['AP50']:.2f}", f"{test['AP75']:.2f}",
                     f"{comp['AP']:.2f}", f"{comp['AP50']:.2f}", f"{r['train']['seconds']:.0f}"])
    return markdown_table(["row", "model", "test AP", "AP50", "AP75", "compositional AP", "AP50", "train s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per row (batch 32)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of vit_world for the pre_ rows")
    p.add_argument("--rows", default="vanilla,anchor,dn,pre_vanilla,pre_dn")
    p.add_argument("--out", default="runs/detr")
    p.add_argument("--also", action="append", default=[], metavar="RUN=LABEL",
                   help="a finished detection run to show too (e.g. one trained with other overrides)")
    p.add_argument("overrides", nargs="*", help="overrides of configs/detr_world.yaml for every row")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run_row(name, args) for name in args.rows.split(",") if name}
    for entry in args.also:
        run, _, name = entry.partition("=")
        results[name or run] = {**json.loads((Path(run) / "eval.json").read_text()), "curve": val_curve(Path(run))}
    (out / "results.md").write_text(table(results) + "\n")
    plot(results, out / "convergence.png")
    print(table(results))


if __name__ == "__main__":
    main()
