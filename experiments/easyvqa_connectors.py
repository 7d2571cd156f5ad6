"""The easy-VQA design-space table: frozen EfficientNet-Lite0 + frozen SmolLM2-135M-Instruct, only the
connector (or Flamingo's cross-attention blocks) trained, one row per recipe, the same budget for all.

    .venv/bin/python experiments/easyvqa_connectors.py --rows resampler8,mlp --steps 400
    .venv/bin/python experiments/easyvqa_connectors.py --collect        # only tabulate finished runs

Each row is ``vlkit train vlm_easyvqa[_<row>]`` into ``<root>/<row>`` with ``system=''`` (SmolLM2's
default system prompt would add 16 tokens to every sample), ``train.max_steps``, an evaluation on
``--eval-limit`` test questions every 200 steps and at the end; finished rows are not re-run. The
table (markdown, also written to ``<root>/table.md``): test VQA accuracy, visual tokens the language
model reads per image, trainable parameters, training throughput, final loss, wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALL_ROWS = ["linear", "mlp", "avgpool4", "clipcap", "clipcap_stages", "resampler8", "resampler64", "qformer", "cabstractor", "flamingo",
            "epalm", "idefics2", "adapter"]


def recipe(row: str) -> str:
    return "vlm_easyvqa" if row == "mlp" else f"vlm_easyvqa_{row}"


def run_row(row: str, args) -> None:
    out = Path(args.root) / row
    if (out / "eval.json").is_file():
        return
    cmd = [sys.executable, "-m", "vlkit.cli", "train", recipe(row), "system=", f"train.max_steps={args.steps}",
           f"train.batch_size={args.batch}", "train.eval_every=200", "train.log_every=10",
           f"data.eval_limit={args.eval_limit}", "--run-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    print("running:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def model_facts(run: Path) -> dict:
    """Trainable parameters and visual tokens per image: from eval.json, else rebuilt from the run's
    model (or, for a stopped run, from its config)."""
    path = run / "eval.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if "model" in doc:
        return doc["model"]
    from vlkit.config import from_dict
    from vlkit.models.peft import trainable_summary
    from vlkit.tasks.vlm import VLMConfig, build_vlm, load_vlm

    if (run / "model").is_dir():
        model = load_vlm(run)[0]  # built with the run's tuning: requires_grad marks what trained
    else:
        model = build_vlm(from_dict(VLMConfig, yaml.safe_load((run / "config.yaml").read_text())))
    return {"trainable_parameters": {"total": trainable_summary(model)["total"]},
            "visual_tokens_per_image": model.num_visual_tokens}


ANSWER_TYPES = ("colour", "shape", "yes/no")


def _rescored(run: Path) -> dict:
    """The saved model scored again by ``vlkit eval RUN data.eval_limit=...`` (eval-cli.json), if done:
    per answer type for runs trained before easy-VQA samples carried their type, and a check of the
    saved model (runs before the frozen-parts-in-eval-mode fix trained with drifting BatchNorm statistics
    of the frozen convnet, which were not saved)."""
    path = run / "eval-cli.json"
    return json.loads(path.read_text())["eval"]["test"] if path.is_file() else {}


def _stopped_run(run: Path) -> dict | None:
    """A run stopped before its end (no eval.json): its last evaluation on the same test questions,
    from metrics.jsonl, in eval.json's shape; steps marked as stopped."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "vqa_accuracy" in r]
    if not evals:
        return None
    last, trains = evals[-1], [r for r in rows if r.get("split") == "train" and r["step"] <= evals[-1]["step"]]
    seconds = last.get("elapsed_s", 0.0)
    summary = {"steps": f"{last['step']} (stopped)", "seconds": seconds,
               "samples_per_s": last["step"] * _batch(run) / seconds if seconds else 0.0,
               "last_train": {"loss": trains[-1]["loss"]} if trains else {}}
    return {"eval": {"test": {k: v for k, v in last.items() if k == "vqa_accuracy" or k.startswith("acc_")}},
            "train": summary}


def _batch(run: Path) -> int:
    return yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"]


def table_row(row: str, root: Path) -> list | None:
    path = root / row / "eval.json"
    doc = json.loads(path.read_text()) if path.is_file() else _stopped_run(root / row)
    if doc is None:
        return None
    cfg = yaml.safe_load((root / row / "config.yaml").read_text())
    style, vision = cfg["injection"]["style"], cfg["vision"]["kind"]
    vision = Path(cfg["vision"]["path"]).name + " ViT" if vision == "run" else vision
    features = cfg["injection"].get("features", "last")
    if features != "last":
        vision += f" ({features}, n={cfg['injection'].get('num_layers', 1)})"
    facts = model_facts(root / row)
    trainable = facts.get("trainable_parameters", {}).get("total")
    test, train = doc["eval"]["test"], doc["train"]
    again = _rescored(root / row)
    by_type = test if "acc_colour" in test else again
    types = [f"{by_type[f'acc_{t}']:.1f}" if f"acc_{t}" in by_type else "?" for t in ANSWER_TYPES]
    return [row, vision, style, facts.get("visual_tokens_per_image", "?"),
            f"{trainable / 1e6:.2f}M" if trainable else "?", f"{test['vqa_accuracy']:.1f}",
            f"{again['vqa_accuracy']:.1f}" if again else "-", *types,
            f"{train['samples_per_s']:.1f}", f"{train['last_train'].get('loss', float('nan')):.3f}",
            train["steps"], f"{train['seconds'] / 60:.0f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ALL_ROWS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-limit", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    p.add_argument("--root", default="runs/easyvqa")
    p.add_argument("--collect", action="store_true", help="only tabulate the finished runs")
    args = p.parse_args()
    rows = args.rows.split(",")
    if not args.collect:
        for row in rows:
            run_row(row, args)
    header = ["row", "frozen vision", "injection", "visual tokens", "trainable", "test VQA acc %", "saved model re-scored %", "colour %", "shape %",
              "yes/no %", "train samples/s", "final loss", "steps", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in (table_row(x, Path(args.root)) for x in rows) if r]
    text = "\n".join(lines)
    print(text)
    (Path(args.root) / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
