"""Object detection with DETR on the synthetic world: ``vlkit train detr_world``.

The world's scenes carry boxes (cx, cy, w, h in [0, 1]) and shape labels for every object; DETR is
trained with the Hungarian set criterion and evaluated with COCO AP / AP50 / AP75
(``pycocotools``) on the validation, test and compositional splits. ``data: coco`` reads a
COCO-format JSON + image folder instead (:class:`vlkit.data.coco.CocoDetection`). The training curves
(loss, and AP at each evaluation) are written next to the run, showing DETR's slow convergence.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlkit.config import ConfigError
from vlkit.data.base import TransformedDataset, collate
from vlkit.data.transforms import TransformConfig
from vlkit.data.world import WorldConfig
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.eval.detection import coco_map
from vlkit.losses.set_criterion import HungarianMatcher, SetCriterion
from vlkit.models.detr import DETR, DETRConfig, FeatureMap, postprocess
from vlkit.tasks.data import rescore_scenes, scene_eval_splits, scene_split, start_scene_run
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import is_main

log = logging.getLogger(__name__)


@dataclass
class DetectionConfig:
    """A DETR recipe (``task: detection``)."""

    task: str = "detection"
    name: str = "detr_world"
    output_dir: str = "runs"
    backbone: Literal["vit", "efficientnet_lite0"] = "vit"  # scratch ViT, or the ImageNet convnet
    backbone_init: str = ""  # a ViT classifier / CLIP / Segmenter run whose ViT starts the ViT backbone
    vit: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=64, patch_size=8, num_classes=0,
                                                             embed_dim=128, depth=4, num_heads=4))
    detr: DETRConfig = field(default_factory=DETRConfig)
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=64))
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(
        image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=1.0,
        rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0, randaugment_num_ops=0))
    data: Literal["world", "coco"] = "world"  # coco: COCO-format JSON + images (coco_train / coco_val / image_root)
    coco_train: str = ""
    coco_val: str = ""
    image_root: str = ""
    eos_coef: float = 0.1  # weight of the "no object" class
    cost_class: float = 1.0  # matching cost and loss weight of the classes (Deformable DETR: 2 with focal)
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    eval_limit: int = 200  # scenes of each evaluated split
    eval_batch_size: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, batch_size=32, epochs=4,
                                                                   warmup_steps=100, weight_decay=1e-4,
                                                                   clip_grad_norm=0.1))

    def __post_init__(self):
        if self.data == "world" and self.detr.num_classes != len(self.world.shapes):
            self.detr = replace(self.detr, num_classes=len(self.world.shapes))
        if self.data == "coco" and not (self.coco_train and self.image_root):
            raise ConfigError("coco_train", "data=coco needs coco_train (JSON) and image_root")
        if self.transform.image_size != self.world.image_size:
            raise ConfigError("transform.image_size", f"{self.transform.image_size} != world.image_size "
                                                      f"{self.world.image_size}")
        if self.backbone_init and self.backbone != "vit":
            raise ConfigError("backbone_init", "starts a ViT backbone: needs backbone=vit")
        if self.backbone == "vit" and self.vit.image_size != self.world.image_size:
            raise ConfigError("vit.image_size", f"{self.vit.image_size} != world.image_size {self.world.image_size}")
        if self.detr.num_queries < self.world.max_objects:
            raise ConfigError("detr.num_queries", f"{self.detr.num_queries} < world.max_objects "
                                                  f"{self.world.max_objects}: some objects could never be found")


def build_detr(cfg: DetectionConfig) -> DETR:
    if cfg.backbone == "vit":
        encoder = VisionTransformer(cfg.vit)
    else:
        from vlkit.models.classifier import ClassifierConfig, build_classifier

        t = cfg.transform
        encoder = build_classifier(ClassifierConfig(arch="efficientnet_lite0", num_classes=1, pretrained=True,
                                                    input_mean=t.mean, input_std=t.std))
    backbone = FeatureMap(encoder)
    return DETR(backbone, backbone.dim, cfg.detr)


def build_criterion(cfg: DetectionConfig) -> SetCriterion:
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, focal=cfg.detr.focal)
    return SetCriterion(cfg.detr.num_classes, matcher, cfg.eos_coef, cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)


def _targets(batch: dict, device) -> list[dict]:
    return [{"labels": lab.to(device), "boxes": box.to(device)} for lab, box in zip(batch["box_labels"], batch["boxes"])]


def objective_fn(criterion: SetCriterion):
    def objective(model: nn.Module, batch: dict) -> dict:
        targets = _targets(batch, batch["image"].device)
        return criterion(model(batch["image"], targets=targets), targets)
    return objective


@torch.no_grad()
def evaluate(model: DETR, dataset, cfg: DetectionConfig) -> dict:
    """COCO AP metrics (%) of ``model`` on ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    preds, targets, sizes = [], [], []
    for batch in DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate):
        if "image" not in batch:
            continue
        images = batch["image"].to(device)
        hw = torch.tensor([images.shape[-2:]] * len(images))
        preds += [{k: v.cpu() for k, v in p.items()} for p in postprocess(model(images), hw, focal=model.cfg.focal)]
        targets += _targets(batch, "cpu")
        sizes += [tuple(images.shape[-2:])] * len(images)
    return coco_map(preds, targets, sizes, cfg.detr.num_classes)


def evaluate_run(run: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """``vlkit eval`` of a detection run (``eval_limit=...``, ``world.*``, ``coco_val=...`` may change)."""
    return rescore_scenes(run, overrides, DetectionConfig, _split, evaluate)


def _split(cfg: DetectionConfig, name: str, train: bool) -> TransformedDataset:
    return scene_split(cfg, name, train, task="detection")


def train(cfg: DetectionConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train and evaluate; returns ``{"run_dir", "summary", "eval"}`` (eval on the main process)."""
    cfg, run_dir, model = start_scene_run(cfg, run_dir, resume, build_detr, lambda m: m.backbone.encoder)
    val = _split(cfg, "val", train=False) if scene_eval_splits(cfg) else None
    train_data = _split(cfg, "train", train=True)
    trainer = Trainer(model, objective_fn(build_criterion(cfg)), train_data, cfg.train,
                      run_dir, eval_fn=(lambda m: evaluate(m, val, cfg)) if val is not None else None)
    summary = trainer.fit(resume=resume)
    model = trainer.final_model()
    result = {"run_dir": str(run_dir), "summary": summary}
    if is_main():
        from vlkit.checkpoints.hub import save_model

        classes = list(cfg.world.shapes) if cfg.data == "world" else train_data.classes
        save_model(model, run_dir / "model", "detr", cfg, meta={"classes": classes})
        result["eval"] = {s: evaluate(model, _split(cfg, s, False), cfg) for s in scene_eval_splits(cfg)}
        (run_dir / "eval.json").write_text(json.dumps({"train": summary, "eval": result["eval"]}, indent=2))
    return result
