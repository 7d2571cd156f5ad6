"""Contrastive image-text training (CLIP / SigLIP / VSE++ losses) on the synthetic world's captions.

``vlkit train clip_world``: a BPE is trained on the training captions (saved in the run folder),
a ViT image tower and a CLIP text tower are trained from scratch with the chosen loss; validation
reports image<->text Recall@K and zero-shot top-1 (class names through prompt templates); the
final evaluation adds the test and compositional (held-out colour/shape pairs) splits.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from vlkit.config import ConfigError, to_dict
from vlkit.data.base import TransformedDataset, collate
from vlkit.data.tokenizers import TextTokenizer, train_bpe
from vlkit.data.transforms import TransformConfig, build_transform
from vlkit.data.world import WorldConfig, WorldDataset
from vlkit.encoders.text import CLIPTextConfig, CLIPTextTransformer
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.eval.retrieval import retrieval_metrics, zero_shot_classifier, zero_shot_logits
from vlkit.losses.contrastive import ClipLoss, SigLipLoss, TripletLoss
from vlkit.models.clip import CLIP
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import is_main

log = logging.getLogger(__name__)


@dataclass
class ContrastiveConfig:
    """A CLIP-style run on the synthetic world (``task: contrastive`` in a recipe)."""

    task: str = "contrastive"
    name: str = "clip_world"
    output_dir: str = "runs"
    vision: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=32, patch_size=4, num_classes=0,
                                                               embed_dim=128, depth=4, num_heads=4))
    text: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(vocab_size=1024, width=128, depth=3,
                                                                        num_heads=4, context_length=40, embed_dim=0))
    embed_dim: int = 128  # shared embedding space
    loss: Literal["infonce", "siglip", "triplet"] = "infonce"
    init_temperature: float = 0.07  # CLIP: 0.07; SigLIP starts at 0.1 with bias -10
    init_logit_bias: float = 0.0
    triplet_margin: float = 0.2
    tokenizer_captions: int = 5000  # training captions the BPE is learned from
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=32))
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(
        image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=1.0,
        rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0, randaugment_num_ops=0))
    templates: tuple[str, ...] = ("a large {}", "a large {} with a small object", "a {}")
    eval_limit: int = 500  # scenes of each evaluated split
    eval_batch_size: int = 256
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=128, epochs=3,
                                                                   warmup_steps=100, weight_decay=0.1))

    def __post_init__(self):
        if self.vision.num_classes:
            raise ConfigError("vision.num_classes", "must be 0: the image tower returns pooled features")
        if self.transform.image_size != self.vision.image_size or self.world.image_size != self.vision.image_size:
            raise ConfigError("vision.image_size", "world, transform and vision image sizes must be equal")
        if self.text.embed_dim:
            raise ConfigError("text.embed_dim", "must be 0: the CLIP model owns the projections")


def build_clip(cfg: ContrastiveConfig) -> CLIP:
    return CLIP(VisionTransformer(cfg.vision), CLIPTextTransformer(cfg.text), cfg.embed_dim,
                init_temperature=cfg.init_temperature, init_logit_bias=cfg.init_logit_bias)


def build_loss(cfg: ContrastiveConfig) -> nn.Module:
    return {"infonce": ClipLoss, "siglip": SigLipLoss,
            "triplet": lambda: TripletLoss(cfg.triplet_margin)}[cfg.loss]()


def objective_fn(loss: nn.Module, tokenizer: TextTokenizer, context: int):
    """``objective(model, batch) -> loss dict`` on a batch of images and captions."""
    def objective(model: CLIP, batch: dict) -> dict:
        text = tokenizer(batch["caption"], context)
        device = batch["image"].device
        out = model(batch["image"], text["input_ids"].to(device))
        if isinstance(loss, TripletLoss):
            return loss(out["image_embeds"], out["text_embeds"])
        if isinstance(loss, SigLipLoss):
            return loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"])
        return loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    return objective


@torch.no_grad()
def embed_split(model: CLIP, dataset, tokenizer: TextTokenizer, context: int, batch_size: int) -> dict:
    """{"image", "text" (N, D) unnormalised, "label" (N,)} over ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    images, texts, labels = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if "image" not in batch:
            continue
        images.append(model.encode_image(batch["image"].to(device)).cpu())
        texts.append(model.encode_text(tokenizer(batch["caption"], context)["input_ids"].to(device)).cpu())
        labels.append(batch["label"])
    return {"image": torch.cat(images), "text": torch.cat(texts), "label": torch.cat(labels)}


def evaluate_split(model: CLIP, dataset, tokenizer: TextTokenizer, cfg: ContrastiveConfig) -> dict:
    """Recall@1/5/10 both ways, mean ranks and zero-shot top-1 (%) on ``dataset``."""
    emb = embed_split(model, dataset, tokenizer, cfg.text.context_length, cfg.eval_batch_size)
    metrics = retrieval_metrics(emb["image"], emb["text"])
    device = next(model.parameters()).device

    def encode(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts, cfg.text.context_length)["input_ids"].to(device)).cpu()

    classifier = zero_shot_classifier(encode, list(cfg.world.shapes), cfg.templates)
    preds = zero_shot_logits(emb["image"], classifier).argmax(1)
    metrics["zero_shot_top1"] = 100.0 * (preds == emb["label"]).float().mean().item()
    return metrics


def _split(cfg: ContrastiveConfig, name: str, train: bool) -> TransformedDataset:
    length = None if train else min(cfg.eval_limit, getattr(cfg.world, f"{name}_length"))
    base = WorldDataset(cfg.world, name, length=length, task="retrieval")
    return TransformedDataset(base, build_transform(cfg.transform, train=train), seed=cfg.train.seed)


def load_tokenizer(run_dir: Path, cfg: ContrastiveConfig) -> TextTokenizer:
    """The run's BPE: read back when the run folder has one (resume), else trained and saved."""
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer.from_file(folder)
    world = WorldDataset(cfg.world, "train", length=min(cfg.tokenizer_captions, cfg.world.train_length),
                         task="retrieval")
    tok = train_bpe((world[i]["caption"] for i in range(len(world))), vocab_size=cfg.text.vocab_size)
    if is_main():
        tok.save(folder)
    return tok


def train(cfg: ContrastiveConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train and evaluate the recipe; returns ``{"run_dir", "summary", "eval"}`` (eval on the main process)."""
    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(run_dir, cfg)
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
    if is_main():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(cfg.train.seed)
    model = build_clip(cfg)
    val = _split(cfg, "val", train=False)
    eval_fn = lambda m: evaluate_split(m, val, tokenizer, cfg)  # noqa: E731
    trainer = Trainer(model, objective_fn(build_loss(cfg), tokenizer, cfg.text.context_length),
                      _split(cfg, "train", train=True), cfg.train, run_dir, eval_fn=eval_fn)
    summary = trainer.fit(resume=resume)
    model = trainer.final_model()
    result = {"run_dir": str(run_dir), "summary": summary}
    if is_main():
        from vlkit.checkpoints.hub import save_model

        save_model(model, run_dir / "model", "clip", cfg, meta={"classes": list(cfg.world.shapes)})
        result["eval"] = {name: evaluate_split(model, _split(cfg, name, train=False), tokenizer, cfg)
                          for name in ("val", "test", "compositional")}
        (run_dir / "eval.json").write_text(json.dumps({"train": summary, "eval": result["eval"]}, indent=2))
    return result
