"""``vlkit quickstart``: the main job. Stage 1 trains a small DeiT on Fashion-MNIST (the synthetic
world when it is missing) with a fine-tuned EfficientNet-Lite0 teacher, evaluates it and writes
``report.md`` next to the run. Later issues add stages (CLIP, VLM, detection) as more sections.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from vlkit.tasks import classification
from vlkit.tasks.data import build_splits, eval_dataset
from vlkit.tasks.report import metrics_table, per_class_table, prediction_figures, section, training_table

log = logging.getLogger(__name__)

# A seconds-long version of the same job, for smoke tests (`vlkit quickstart --tiny`).
TINY_OVERRIDES = [
    "train.max_steps=6", "train.batch_size=16", "train.eval_every=3", "train.checkpoint_every=3",
    "train.warmup_steps=2", "data.train_limit=256", "data.val_size=64", "data.eval_limit=64",
    "teacher.finetune_steps=3", "teacher.finetune.batch_size=16", "teacher.finetune.warmup_steps=1",
    "model.vit.depth=2", "model.vit.embed_dim=48", "model.vit.num_heads=2",
]


def classification_stage(cfg: classification.ClassificationConfig, run_dir: Path, rel: str) -> str:
    """Train + evaluate + figures; returns the report section (image paths relative to the report)."""
    result = classification.train(cfg, run_dir)
    evals = result["eval"]
    teacher = evals.pop("teacher", None)
    splits = build_splits(cfg.data)
    model = classification.load(run_dir)
    figures = prediction_figures(model, eval_dataset(splits.test or splits.val, cfg.data), splits.classes, run_dir)
    figures = [line.replace("](", f"]({rel}/") for line in figures]
    test = evals.get("test") or evals["val"]
    parts = [
        f"Recipe: `{cfg.name}` ({_describe(cfg)}), data: **{splits.source}** "
        f"({len(splits.train)} train / {len(splits.val)} val images). Run folder: `{rel}/`.",
        metrics_table(evals),
        f"Teacher (EfficientNet-Lite0, fine-tuned): test top-1 {teacher['top1']:.2f}%" if teacher else "",
        training_table(result["summary"]),
        f"Training curves:\n\n![curves]({rel}/curves.png)",
        "Test images, predicted (score) and true labels:\n\n" + figures[0],
        *figures[1:],
        "Per-class test accuracy:\n\n" + per_class_table(splits.classes, test),
    ]
    return section("Image classification: DeiT", *parts)


def _describe(cfg: classification.ClassificationConfig) -> str:
    v = cfg.model.vit
    kind = "DeiT" if v.num_dist_tokens else ("CaiT" if v.class_attn_depth else "ViT")
    teacher = f", {cfg.teacher.distillation} distillation from {cfg.teacher.kind}" if cfg.teacher.kind != "none" else ""
    return (f"{kind} d={v.embed_dim} depth={v.depth} heads={v.num_heads} patch={v.patch_size} "
            f"at {cfg.data.transform.image_size}px{teacher}")


def run_quickstart(out: Path, tiny: bool = False, overrides: list[str] = ()) -> Path:
    """Run every stage into ``out`` and write ``out/report.md``; returns its path."""
    from vlkit.cli import load_recipe

    start = time.time()
    cfg, _ = load_recipe("quickstart", [*(TINY_OVERRIDES if tiny else []), *overrides])
    out.mkdir(parents=True, exist_ok=True)
    sections = [classification_stage(cfg, out / "deit", "deit")]
    header = (f"# vlkit quickstart report\n\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'tiny smoke-test sizes, ' if tiny else ''}total {time.time() - start:.0f} s.\n")
    report = out / "report.md"
    report.write_text("\n".join([header, *sections]))
    return report
