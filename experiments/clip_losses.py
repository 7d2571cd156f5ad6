"""CLIP on the synthetic world at equal budget: InfoNCE vs SigLIP vs triplet (VSE++ hardest negatives),
and InfoNCE's sensitivity to a FIXED temperature (the SimCLR observation, Chen et al. 2020, table 5).

    .venv/bin/python experiments/clip_losses.py --steps 400 --out runs/clip_losses
    .venv/bin/python experiments/clip_losses.py --steps 40 --rows infonce,T0.1 --out /tmp/smoke   # quick look

Every row trains ``configs/clip_world.yaml`` for ``--steps`` optimizer steps of the same batch size
(same pairs seen, same seed and data order), then evaluates the test and compositional splits.
Rows: ``infonce`` (learned temperature from 0.07), ``siglip`` (learned, from T = 0.1 and bias -10 as
in SigLIP), ``triplet`` (margin 0.2), and ``T<t>`` (e.g. ``T0.1``) = InfoNCE with the temperature fixed at T.
Writes ``results.json``, ``results.md`` (tables) and ``temperature.png`` into ``--out``; a row whose
``eval.json`` already exists is read back, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlkit.cli import load_recipe  # noqa: E402
from vlkit.tasks import contrastive  # noqa: E402
from vlkit.tasks.report import markdown_table  # noqa: E402
from vlkit.viz.grid import save_figure  # noqa: E402

TEMPERATURES = (0.01, 0.03, 0.07, 0.1, 0.2, 0.5, 1.0)
LOSS_ROWS = {
    "infonce": ["loss=infonce", "init_temperature=0.07"],
    "siglip": ["loss=siglip", "init_temperature=0.1", "init_logit_bias=-10"],
    "triplet": ["loss=triplet", "triplet_margin=0.2"],
}
KEYS = ("zero_shot_top1", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_mean_rank", "t2i_mean_rank")


def row_overrides(name: str) -> list[str]:
    if name in LOSS_ROWS:
        return LOSS_ROWS[name]
    if name.startswith("T"):
        return ["loss=infonce", f"init_temperature={float(name[1:])}", "learn_temperature=false"]
    raise SystemExit(f"unknown row {name!r}: {', '.join(LOSS_ROWS)} or T<temperature>")


def run_row(name: str, args) -> dict:
    run_dir = Path(args.out) / name
    done = run_dir / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [*row_overrides(name), f"train.max_steps={args.steps}", "train.epochs=0", "train.eval_every=0",
                 f"train.checkpoint_every={args.steps}", f"train.warmup_steps={min(100, args.steps // 5)}",
                 f"world.train_length={max(args.steps * 128, 128)}", *args.overrides]
    cfg, _ = load_recipe("clip_world", overrides)
    t0 = time.time()
    contrastive.train(cfg, run_dir)
    print(f"{name}: {time.time() - t0:.0f} s")
    return json.loads(done.read_text())


def temperature_plot(results: dict, path: Path) -> None:
    temps = sorted((float(k[1:]), v) for k, v in results.items() if k.startswith("T"))
    if not temps:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("zero_shot_top1", "zero-shot top-1"), ("i2t_R@1", "image->text R@1"),
                       ("t2i_R@1", "text->image R@1")):
        ax.plot([t for t, _ in temps], [v["eval"]["test"][key] for _, v in temps], "o-", label=label)
    for key, style in (("infonce", ":"), ("siglip", "--")):
        if key in results:
            ax.axhline(results[key]["eval"]["test"]["i2t_R@1"], color="grey", linestyle=style,
                       label=f"{key} (learned T), i2t R@1")
    ax.set_xscale("log")
    ax.set_xlabel("fixed temperature T (InfoNCE)")
    ax.set_ylabel("% on the test split")
    ax.set_title("CLIP on the synthetic world: temperature sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def tables(results: dict, steps: int) -> str:
    lines = []
    for split in ("test", "compositional"):
        rows = [[name, *(f"{r['eval'][split][k]:.1f}" for k in KEYS), f"{r['train']['seconds']:.0f}"]
                for name, r in results.items()]
        lines += [f"### {split} split ({steps} steps)\n", markdown_table(["row", *KEYS, "train s"], rows), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per row (batch 128)")
    p.add_argument("--rows", default=",".join([*LOSS_ROWS, *(f"T{t}" for t in TEMPERATURES)]))
    p.add_argument("--out", default="runs/clip_losses")
    p.add_argument("overrides", nargs="*", help="overrides of configs/clip_world.yaml for every row")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run_row(name, args) for name in args.rows.split(",")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(tables(results, args.steps))
    temperature_plot(results, out / "temperature.png")
    print(tables(results, args.steps))


if __name__ == "__main__":
    main()
