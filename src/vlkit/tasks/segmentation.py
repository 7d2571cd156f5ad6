"""Semantic segmentation with Segmenter on the synthetic world: ``vlkit train segmenter_world``
(mask transformer) and ``segmenter_world_linear`` (the linear-decoder baseline). Classes are the
background and the world's shapes; metrics are mIoU and pixel accuracy on val/test/compositional.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vlkit.config import ConfigError
from vlkit.data.base import TransformedDataset, collate
from vlkit.data.transforms import TransformConfig
from vlkit.data.world import WorldConfig
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.eval.segmentation import ConfusionMatrix
from vlkit.models.segmenter import LinearDecoder, MaskTransformer, Segmenter
from vlkit.tasks.data import rescore_scenes, scene_eval_splits, scene_split, start_scene_run
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import is_main


@dataclass
class SegmentationConfig:
    """A Segmenter recipe (``task: segmentation``)."""

    task: str = "segmentation"
    name: str = "segmenter_world"
    output_dir: str = "runs"
    vit: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=64, patch_size=4, num_classes=0,
                                                             embed_dim=128, depth=4, num_heads=4))
    backbone_init: str = ""  # a ViT classifier / CLIP / Segmenter run whose ViT starts the encoder
    decoder: Literal["mask", "linear"] = "mask"
    decoder_depth: int = 2  # mask transformer layers
    decoder_dim: int = 128
    decoder_heads: int = 4
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=64))
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(
        image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=1.0,
        rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0, randaugment_num_ops=0))
    data: Literal["world", "coco"] = "world"  # coco: COCO-format JSON (polygons / RLE) + images
    coco_train: str = ""
    coco_val: str = ""
    image_root: str = ""
    coco_classes: int = 0  # data=coco: number of categories (checked against the JSON)
    eval_limit: int = 200
    eval_batch_size: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=32, epochs=3,
                                                                   warmup_steps=100, weight_decay=0.01))

    def __post_init__(self):
        if not self.vit.image_size == self.transform.image_size == self.world.image_size:
            raise ConfigError("vit.image_size", "vit, transform and world image sizes must be equal")
        if self.data == "coco" and not (self.coco_train and self.image_root and self.coco_classes):
            raise ConfigError("coco_train", "data=coco needs coco_train, image_root and coco_classes")

    @property
    def class_names(self) -> list[str]:
        if self.data == "coco":
            return ["background", *(str(i) for i in range(self.coco_classes))]
        return ["background", *self.world.shapes]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)  # background + shapes (or COCO categories)


def build_segmenter(cfg: SegmentationConfig) -> Segmenter:
    encoder = VisionTransformer(cfg.vit)
    decoder = LinearDecoder(cfg.vit.embed_dim, cfg.num_classes) if cfg.decoder == "linear" else \
        MaskTransformer(cfg.vit.embed_dim, cfg.num_classes, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
    return Segmenter(encoder, decoder)


def objective(model: nn.Module, batch: dict) -> dict:
    logits = model(batch["image"])
    target = batch["semantic_mask"].to(logits.device)
    loss = F.cross_entropy(logits, target)
    return {"loss": loss, "pixel_acc": (logits.argmax(1) == target).float().mean().detach()}


@torch.no_grad()
def evaluate(model: Segmenter, dataset, cfg: SegmentationConfig) -> dict:
    model.eval()
    device = next(model.parameters()).device
    cm = ConfusionMatrix(cfg.num_classes)
    for batch in DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate):
        if "image" in batch:
            cm.update(model(batch["image"].to(device)).argmax(1), batch["semantic_mask"])
    out = cm.compute()
    names = cfg.class_names
    return {"mIoU": out["mIoU"], "pixel_acc": out["pixel_acc"],
            **{f"iou_{n}": v for n, v in zip(names, out["iou"]) if v is not None}}


def evaluate_run(run: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """``vlkit eval`` of a segmentation run (``eval_limit=...``, ``world.*``, ``coco_val=...`` may change)."""
    return rescore_scenes(run, overrides, SegmentationConfig, _split, evaluate)


def _split(cfg: SegmentationConfig, name: str, train: bool) -> TransformedDataset:
    ds = scene_split(cfg, name, train, task="segmentation", masks=True)
    if cfg.data == "coco" and len(ds.classes) != cfg.coco_classes:
        raise ConfigError("coco_classes", f"{cfg.coco_classes} != the {len(ds.classes)} categories of the JSON")
    return ds


def train(cfg: SegmentationConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    cfg, run_dir, model = start_scene_run(cfg, run_dir, resume, build_segmenter, lambda m: m.encoder)
    val = _split(cfg, "val", train=False) if scene_eval_splits(cfg) else None
    eval_fn = (lambda m: {k: v for k, v in evaluate(m, val, cfg).items() if not k.startswith("iou_")}) \
        if val is not None else None
    trainer = Trainer(model, objective, _split(cfg, "train", train=True), cfg.train, run_dir,
                      eval_fn=eval_fn)
    summary = trainer.fit(resume=resume)
    model = trainer.final_model()
    result = {"run_dir": str(run_dir), "summary": summary}
    if is_main():
        from vlkit.checkpoints.hub import save_model

        save_model(model, run_dir / "model", "segmenter", cfg, meta={"classes": cfg.class_names})
        result["eval"] = {s: evaluate(model, _split(cfg, s, False), cfg) for s in scene_eval_splits(cfg)}
        (run_dir / "eval.json").write_text(json.dumps({"train": summary, "eval": result["eval"]}, indent=2))
    return result
