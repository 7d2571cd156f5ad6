"""``vlkit quickstart``: the main job, written up in ``report.md`` next to the runs.

Stage 1 trains a small DeiT on Fashion-MNIST (the synthetic world when it is missing) with a
fine-tuned EfficientNet-Lite0 teacher. Stage 2 trains a CLIP on the synthetic world's captions
(zero-shot top-1, Recall@K) and searches its test images by text with ``vlkit search``.
Overrides prefixed ``clip.`` go to stage 2 (``configs/quickstart_clip.yaml``), others to stage 1.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from vlkit.tasks import classification, contrastive
from vlkit.data.images import load_image
from vlkit.data.world import WorldDataset
from vlkit.search import Embedder, build_index
from vlkit.tasks.data import build_splits, eval_dataset
from vlkit.tasks.report import markdown_table, metrics_table, per_class_table, prediction_figures, section, \
    training_table
from vlkit.viz.grid import RetrievalRow, save_retrieval_grid

log = logging.getLogger(__name__)

# A seconds-long version of the same job, for smoke tests (`vlkit quickstart --tiny`).
TINY_OVERRIDES = [
    "train.max_steps=6", "train.batch_size=16", "train.eval_every=3", "train.checkpoint_every=3",
    "train.warmup_steps=2", "data.train_limit=256", "data.val_size=64", "data.eval_limit=64",
    "teacher.finetune_steps=3", "teacher.finetune.batch_size=16", "teacher.finetune.warmup_steps=1",
    "model.vit.depth=2", "model.vit.embed_dim=48", "model.vit.num_heads=2",
]
TINY_CLIP_OVERRIDES = [
    "train.max_steps=4", "train.batch_size=16", "train.eval_every=2", "train.checkpoint_every=2",
    "train.warmup_steps=1", "world.train_length=64", "eval_limit=32", "tokenizer_captions=64",
    "text.vocab_size=600", "vision.depth=1", "vision.embed_dim=32", "vision.num_heads=2", "text.depth=1",
    "text.width=32", "text.num_heads=2", "embed_dim=16",
]
RETRIEVAL_KEYS = ("zero_shot_top1", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                  "i2t_mean_rank", "t2i_mean_rank")


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


def clip_stage(cfg: contrastive.ContrastiveConfig, run_dir: Path, rel: str, queries: int = 3) -> str:
    """Train + evaluate a CLIP, index its test images with vlkit search and query them by caption."""
    result = contrastive.train(cfg, run_dir)
    rows = [[split] + [f"{m[k]:.1f}" for k in RETRIEVAL_KEYS] for split, m in result["eval"].items()]
    folder, captions = _write_test_images(cfg, run_dir / "search_images")
    embedder = Embedder.load(run_dir)
    index, stats = build_index(embedder, folder, run_dir / "search_index", progress=False)
    picks = [len(captions) * i // queries for i in range(queries)]
    hits = index.search(embedder.texts([captions[i][1] for i in picks]), k=5)
    figure = save_retrieval_grid([RetrievalRow(captions[i][1], [load_image(p) for p, _ in h],
                                               [f"{s:.2f} {Path(p).stem}" for p, s in h],
                                               [Path(p).name == captions[i][0] for p, _ in h])
                                  for i, h in zip(picks, hits)], run_dir / "retrieval.png",
                                 title="text -> image search over the test images (green: the captioned image)")
    v, t = cfg.vision, cfg.text
    parts = [
        f"Recipe: `{cfg.name}`: ViT d={v.embed_dim} depth={v.depth} at {v.image_size}px + causal text "
        f"transformer d={t.width} depth={t.depth} on a BPE of {embedder.tokenizer.vocab_size} "
        f"tokens trained on the captions, {cfg.loss} loss, {cfg.train.batch_size} pairs per batch. "
        f"Run folder: `{rel}/`. Zero-shot: the {len(cfg.world.shapes)} shape names through "
        f"{len(cfg.templates)} prompt templates (chance {100 / len(cfg.world.shapes):.1f}%); Recall@K among "
        f"{cfg.eval_limit} scenes per split; `compositional` holds colour-shape pairs never seen in training.",
        markdown_table(["split", *RETRIEVAL_KEYS], rows),
        training_table(result["summary"]),
        f"Training curves:\n\n![curves]({rel}/curves.png)",
        f"`vlkit search index {rel} {rel}/search_images`: {stats['files']} test images in {stats['seconds']:.1f} s; "
        f"queried with three of their captions (top 5 shown):\n\n![retrieval]({rel}/{figure.name})",
    ]
    return section("Contrastive image-text: CLIP on the synthetic world", *parts)


def _write_test_images(cfg: contrastive.ContrastiveConfig, folder: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The first ``eval_limit`` test scenes as PNG files; [(file name, caption)]."""
    folder.mkdir(parents=True, exist_ok=True)
    world = WorldDataset(cfg.world, "test", length=min(cfg.eval_limit, cfg.world.test_length), task="retrieval")
    captions = []
    for i in range(len(world)):
        sample = world[i]
        name = f"test{i:04d}.png"
        sample["image"].save(folder / name)
        captions.append((name, sample["caption"]))
    return folder, captions


def run_quickstart(out: Path, tiny: bool = False, overrides: list[str] = ()) -> Path:
    """Run every stage into ``out`` and write ``out/report.md``; returns its path."""
    from vlkit.cli import load_recipe

    start = time.time()
    clip_overrides = [o[len("clip."):] for o in overrides if o.startswith("clip.")]
    cfg, _ = load_recipe("quickstart", [*(TINY_OVERRIDES if tiny else []),
                                        *(o for o in overrides if not o.startswith("clip."))])
    clip_cfg, _ = load_recipe("quickstart_clip", [*(TINY_CLIP_OVERRIDES if tiny else []), *clip_overrides])
    out.mkdir(parents=True, exist_ok=True)
    sections = [classification_stage(cfg, out / "deit", "deit"), clip_stage(clip_cfg, out / "clip", "clip")]
    header = (f"# vlkit quickstart report\n\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'tiny smoke-test sizes, ' if tiny else ''}total {time.time() - start:.0f} s.\n")
    report = out / "report.md"
    report.write_text("\n".join([header, *sections]))
    return report
