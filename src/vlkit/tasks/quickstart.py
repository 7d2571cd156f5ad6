"""``vlkit quickstart``: the main job, written up in ``report.md`` next to the runs.

Stage 1 trains a small DeiT on Fashion-MNIST (the synthetic world when it is missing) with a
fine-tuned EfficientNet-Lite0 teacher. Stage 2 trains a CLIP on the synthetic world's captions
(zero-shot top-1, Recall@K) and searches its test images by text with ``vlkit search``. Stage 3
trains a small VLM from scratch on the world's captions and questions (CIDEr, VQA accuracy,
sample answers). ``--all`` adds DETR detection and Segmenter segmentation on the world. Overrides
prefixed ``clip.`` / ``vlm.`` / ``detr.`` / ``segmenter.`` go to those stages
(``configs/quickstart_<stage>.yaml``), others to stage 1.
"""
from __future__ import annotations

import contextlib
import logging
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from vlkit.tasks import classification, contrastive, vlm
from vlkit.data.images import load_image
from vlkit.data.vl import WorldCaptions, WorldVQA
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
TINY_VLM_OVERRIDES = [
    "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=3", "train.warmup_steps=1",
    "data.world.train_length=32", "data.eval_limit=4", "data.qa_per_scene=2", "decoder.vocab_size=600",
    "vision.vit.depth=1", "vision.vit.embed_dim=32", "vision.vit.num_heads=2", "decoder.config.hidden_size=32",
    "decoder.config.num_layers=1", "decoder.config.num_heads=2", "decoder.config.num_kv_heads=1",
    "generation.max_new_tokens=4",
]
TINY_DENSE_OVERRIDES = [
    "train.max_steps=3", "train.batch_size=4", "train.eval_every=3", "train.checkpoint_every=3",
    "train.warmup_steps=1", "world.train_length=16", "eval_limit=4", "vit.depth=1", "vit.embed_dim=32",
    "vit.num_heads=2",
]
TINY_DETR_OVERRIDES = [*TINY_DENSE_OVERRIDES, "detr.d_model=32", "detr.num_heads=4", "detr.enc_layers=1",
                       "detr.dec_layers=2", "detr.ffn_dim=64"]
TINY_SEG_OVERRIDES = [*TINY_DENSE_OVERRIDES, "decoder_dim=32", "decoder_heads=2", "decoder_depth=1"]
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


def vlm_stage(cfg: vlm.VLMConfig, run_dir: Path, rel: str, shown: int = 8) -> str:
    """Train + evaluate a small VLM on captions and questions; tables and sample answers."""
    result = vlm.train(cfg, run_dir)
    evals = result["eval"]
    caption_rows = [[k.removesuffix("_caption")] + [f"{m[x]:.1f}" for x in ("CIDEr", "BLEU-4", "ROUGE-L")]
                    for k, m in evals.items() if k.endswith("_caption")]
    vqa_keys = sorted({x for k, m in evals.items() if k.endswith("_vqa") for x in m})
    vqa_rows = [[k.removesuffix("_vqa")] + [f"{m.get(x, float('nan')):.1f}" for x in vqa_keys]
                for k, m in evals.items() if k.endswith("_vqa")]
    figure = _vlm_samples(cfg, run_dir, shown)
    relevance = _vlm_relevance(cfg, run_dir, shown // 2)
    c, d = cfg.vision.vit, cfg.decoder.config
    parts = [
        f"Recipe: `{cfg.name}`: ViT d={c.embed_dim} depth={c.depth} at {c.image_size}px -> {cfg.connector.kind} "
        f"connector -> a {d.num_layers}-layer Llama-style decoder d={d.hidden_size} (GQA {d.num_heads}/"
        f"{d.num_kv_heads} heads) on a BPE trained on the texts, visual tokens spliced at `<image>`; trained "
        f"from scratch on captions and questions alternately. Run folder: `{rel}/`. Decoding: "
        f"{result['protocol'].get('decoding', 'greedy')}, at most {cfg.generation.max_new_tokens} tokens.",
        "Captioning (pycocoevalcap):\n\n" + markdown_table(["split", "CIDEr", "BLEU-4", "ROUGE-L"], caption_rows),
        "VQA (accuracy %, per question type):\n\n" + markdown_table(["split", *vqa_keys], vqa_rows),
        training_table(result["summary"]),
        f"Test samples (green: the answer matches):\n\n![samples]({rel}/{figure.name})",
    ]
    if relevance is not None:
        parts.append("Where the answers to test questions come from (occlusion: how much the answer's likelihood "
                     "drops when each cell of an 8 x 8 grid is painted over; `vlkit predict RUN IMAGE --prompt "
                     f"... --attention`):\n\n![relevance]({rel}/{relevance.name})")
    return section("Vision-language model: captioning and VQA on the synthetic world", *parts)


def _vlm_relevance(cfg: vlm.VLMConfig, run_dir: Path, shown: int) -> Optional[Path]:
    """Occlusion maps of the trained model's answers to the first test questions (None without any)."""
    from vlkit.tasks.answer import explain_answer
    from vlkit.viz.attention import save_attention_grid

    model, cfg, encoder = vlm.load_vlm(run_dir)
    transform = vlm.build_transform(cfg.transform, train=False)
    qas = WorldVQA(cfg.data.world, "test", cfg.data.world.test_length, cfg.data.qa_per_scene)
    images, maps, titles = [], [], []
    for i in range(min(len(qas), 4 * shown)):
        sample = qas[i]
        question = sample["messages"][0]["content"].replace("<image>", "").strip()
        pixels = transform(sample["image"], torch.Generator())
        ids = torch.tensor([encoder.prompt([{"role": "user", "content": sample["messages"][0]["content"]}])])
        new = model.generate(ids, None, pixels[None], cfg.generation)[0].tolist()
        explained = explain_answer(model, cfg.generation, ids, pixels, new)
        if explained is not None:
            images.append(pixels)
            maps.append(explained[0])
            titles.append(f"{question}\n-> {vlm._decode(encoder.tok, new)}")
        if len(images) == shown:
            break
    if not images:
        return None
    return save_attention_grid(torch.stack(images), [torch.stack([m.flatten() for m in maps])], tuple(maps[0].shape),
                               run_dir / "relevance.png", ["answer relevance"], titles)


def _vlm_samples(cfg: vlm.VLMConfig, run_dir: Path, shown: int) -> Path:
    import json

    from vlkit.eval.vl_metrics import normalize_answer
    from vlkit.viz.grid import save_text_grid

    samples = json.loads((run_dir / "samples.json").read_text())
    picked = samples.get("test_caption", [])[:shown // 2] + samples.get("test_vqa", [])[:shown - shown // 2]
    images, texts, correct = [], [], []
    caps = WorldCaptions(cfg.data.world, "test", cfg.data.world.test_length)
    qas = WorldVQA(cfg.data.world, "test", cfg.data.world.test_length, cfg.data.qa_per_scene)
    for s in picked:
        split, scene, *k = s["id"].split("/")
        sample = qas[int(scene) * cfg.data.qa_per_scene + int(k[0])] if k else caps[int(scene)]
        question = sample["messages"][0]["content"].replace("<image>", "").strip()
        images.append(sample["image"])
        texts.append(f"{question}\npred: {s['prediction']}\ntrue: {s['references'][0]}")
        correct.append(normalize_answer(s["prediction"]) == normalize_answer(s["references"][0]))
    return save_text_grid(images, texts, run_dir / "samples.png", correct)


def dense_stage(kind: str, cfg, run_dir: Path, rel: str, shown: int = 8) -> str:
    """Detection (DETR) or segmentation (Segmenter) on the world: metrics, curves, drawn test predictions."""
    from vlkit.tasks import detection, segmentation
    from vlkit.tasks.dense_predict import predict_dense
    from vlkit.viz.grid import save_text_grid

    module = detection if kind == "detr" else segmentation
    result = module.train(cfg, run_dir)
    keys = list(next(iter(result["eval"].values())))[:6]
    rows = [[split] + [f"{m[k]:.1f}" for k in keys] for split, m in result["eval"].items()]
    folder = run_dir / "test_images"
    folder.mkdir(exist_ok=True)
    world = WorldDataset(cfg.world, "test", length=shown, task="detection")
    paths = []
    for i in range(shown):
        paths.append(folder / f"test{i}.png")
        world[i]["image"].save(paths[-1])
    drawn = predict_dense(run_dir, paths, run_dir / "predictions", threshold=0.5, attention=kind == "detr",
                          min_boxes=1)
    from PIL import Image

    truth = [", ".join(o["shape"] for o in world[i]["objects"]) for i in range(shown)]
    grid = save_text_grid([Image.open(d["picture"]) for d in drawn], [f"true: {t}" for t in truth],
                          run_dir / "samples.png", width=40)
    title = "Detection: DETR" if kind == "detr" else "Semantic segmentation: Segmenter"
    what = ("boxes scored above 0.5 (at least the best-scored box of each image, whatever its score)"
            if kind == "detr" else "predicted class masks")
    looks = [d for d in drawn if d.get("detections")][:2]
    attention = ["Where each detection's object query looks (last decoder layer's cross-attention, one panel "
                 "per box):\n\n" + "\n\n".join(f"![attention]({rel}/{Path(d['attention_picture']).relative_to(run_dir)})"
                                                for d in looks)] if looks else []
    return section(f"{title} on the synthetic world", f"Recipe: `{cfg.name}`. Run folder: `{rel}/`.",
                   markdown_table(["split", *keys], rows), training_table(result["summary"]),
                   f"Training curves (the loss, and the metrics at each evaluation):\n\n![curves]({rel}/curves.png)",
                   f"Test images with the {what}:\n\n![samples]({rel}/{grid.name})", *attention)


def _cpu() -> str:
    """'x86_64 (AMD EPYC, AVX2)': the times of the report depend on it (AVX-512 CPUs run it ~2.5x faster)."""
    name = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return f"{platform.machine()} ({', '.join(filter(None, [name, torch.backends.cpu.get_cpu_capability()]))})"


def run_quickstart(out: Path, tiny: bool = False, overrides: list[str] = (), everything: bool = False) -> Path:
    """Run every stage into ``out`` and write ``out/report.md``; returns its path."""
    from vlkit.cli import load_recipe

    start = time.time()
    prefixes = ("clip.", "vlm.", "detr.", "segmenter.")
    staged = {p: [o[len(p):] for o in overrides if o.startswith(p)] for p in prefixes}
    cfg, _ = load_recipe("quickstart", [*(TINY_OVERRIDES if tiny else []),
                                        *(o for o in overrides if not o.startswith(prefixes))])
    clip_cfg, _ = load_recipe("quickstart_clip", [*(TINY_CLIP_OVERRIDES if tiny else []), *staged["clip."]])
    vlm_cfg, _ = load_recipe("quickstart_vlm", [*(TINY_VLM_OVERRIDES if tiny else []), *staged["vlm."]])
    out.mkdir(parents=True, exist_ok=True)
    sections = [classification_stage(cfg, out / "deit", "deit"), clip_stage(clip_cfg, out / "clip", "clip"),
                vlm_stage(vlm_cfg, out / "vlm", "vlm")]
    if everything:  # --all: the dense-prediction stages
        for kind, recipe, tiny_over in (("detr", "quickstart_detr", TINY_DETR_OVERRIDES),
                                        ("segmenter", "quickstart_segmenter", TINY_SEG_OVERRIDES)):
            dense_cfg, _ = load_recipe(recipe, [*(tiny_over if tiny else []), *staged.get(f"{kind}.", [])])
            sections.append(dense_stage(kind, dense_cfg, out / kind, kind))
    header = (f"# vlkit quickstart report\n\n{time.strftime('%Y-%m-%d %H:%M')}, {_cpu()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'tiny smoke-test sizes, ' if tiny else ''}total {time.time() - start:.0f} s.\n")
    report = out / "report.md"
    report.write_text("\n".join([header, *sections]))
    return report
