"""Image classification end to end: a recipe -> a trained, evaluated, exported run folder.

Recipe (:class:`ClassificationConfig`, YAML in ``configs/``): model, data, train, mixup, teacher.
``train(cfg, run_dir)`` writes into ``run_dir``::

    config.yaml          the full recipe, as run
    metrics.jsonl        training and validation metrics; curves.png their plot
    checkpoints/         resumable training state (safetensors + JSON)
    teacher/             the fine-tuned DeiT teacher (vlkit model folder), if any
    model/               the final model (vlkit model folder: config.json + model.safetensors)
    eval.json            validation / test (/ extra split) metrics of the final model

DeiT (Touvron et al. 2021): a student with a distillation token learns from the labels and from
a teacher classifier (hard or soft distillation, :mod:`vlkit.losses.distillation`); the teacher is
the pretrained EfficientNet-Lite0, first fine-tuned on the same data for ``teacher.finetune_steps``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vlkit.checkpoints.hub import load, save_model
from vlkit.config import ConfigError, replace, to_dict
from vlkit.data.mixup import MixupConfig, SoftTargetCrossEntropy, build_mixup
from vlkit.eval.classification import classification_metrics, predict
from vlkit.losses.distillation import DistillationLoss
from vlkit.models.classifier import ClassifierConfig, build_classifier
from vlkit.tasks.data import DataConfig, Splits, build_splits, eval_dataset, train_dataset
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import is_main

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """DeiT's teacher: which classifier, how it is prepared, how it teaches."""

    kind: Literal["none", "efficientnet_lite0", "run"] = "none"  # none = no distillation
    path: str = ""  # kind=run: a vlkit run/model folder of a trained classifier on the same classes
    image_size: int = 64  # side the convnet teacher sees (the student's images are resized)
    finetune_steps: int = 300  # kind=efficientnet_lite0: steps of fine-tuning on the training data first
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=64, warmup_steps=20,
                                                                      weight_decay=1e-5))
    distillation: Literal["hard", "soft"] = "hard"  # DeiT eq. 3 (hard) or eq. 2 (soft)
    alpha: float = 0.5  # weight of the distillation term
    tau: float = 1.0  # soft distillation temperature

    def __post_init__(self):
        if self.kind == "run" and not self.path:
            raise ConfigError("path", "teacher kind=run needs the path of a trained classifier")
        if self.image_size < 32:
            raise ConfigError("image_size", f"the convnet reduces by 32: need >= 32, got {self.image_size}")
        if self.finetune.parallel == "fsdp":
            raise ConfigError("finetune.parallel", "the teacher is used whole on every rank: fine-tune it with ddp")
        if self.finetune_steps < 0:
            raise ConfigError("finetune_steps", f"must be >= 0, got {self.finetune_steps}")


@dataclass
class ClassificationConfig:
    """A classification recipe: everything `vlkit train` needs."""

    task: Literal["classification"] = "classification"  # which task this recipe runs
    name: str = "classification"  # run name: the run folder is output_dir/name
    output_dir: str = "runs"  # parent of run folders
    model: ClassifierConfig = field(default_factory=ClassifierConfig)  # num_classes is filled from the data
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    label_smoothing: float = 0.1  # cross-entropy label smoothing (copied into Mixup's soft targets)
    eval_batch_size: int = 256  # batch size of evaluation

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        vit = self.model.vit
        if self.model.arch == "vit" and vit.embed == "patch" and self.data.transform.image_size % vit.patch_size:
            raise ConfigError("data.transform.image_size", f"{self.data.transform.image_size} is not a multiple "
                                                           f"of model.vit.patch_size {vit.patch_size}")
        if self.teacher.kind != "none" and self.model.arch == "vit" and not vit.num_dist_tokens:
            log.info("teacher without a distillation token: the class head learns from both (DeiT §5.2 ablation)")


def prepare(cfg: ClassificationConfig, splits: Splits) -> ClassificationConfig:
    """The recipe with what the data decides filled in: classes and the input normalisation."""
    t = cfg.data.transform
    model = replace(cfg.model, num_classes=len(splits.classes), input_mean=t.mean, input_std=t.std)
    return replace(cfg, model=model, mixup=replace(cfg.mixup, label_smoothing=cfg.label_smoothing))


def classification_objective(criterion: nn.Module):
    """``objective(model, batch) -> loss dict``: Mixup's soft ``target`` when present, else ``label``."""
    def objective(model: nn.Module, batch: dict) -> dict:
        images = batch["image"]
        return criterion(images, model(images), batch.get("target", batch["label"]))
    return objective


def make_eval_fn(dataset, batch_size: int):
    """``eval_fn(model) -> {"top1", "top5", "loss"}`` on ``dataset`` (the loop's validation)."""
    def eval_fn(model: nn.Module) -> dict:
        preds = predict(model, dataset, batch_size=batch_size, device=next(model.parameters()).device)
        m = classification_metrics(preds.logits, preds.labels)
        return {k: m[k] for k in ("top1", "top5", "loss")}
    return eval_fn


def _fit(model: nn.Module, criterion: nn.Module, cfg: ClassificationConfig, splits: Splits, run_dir: Path,
         train_cfg: TrainConfig, resume: bool) -> dict:
    mixup = build_mixup(cfg.mixup, len(splits.classes))
    trainer = Trainer(model, classification_objective(criterion), train_dataset(splits, cfg.data), train_cfg, run_dir,
                      eval_fn=make_eval_fn(eval_dataset(splits.val, cfg.data), cfg.eval_batch_size),
                      batch_transform=mixup)
    summary = trainer.fit(resume=resume)
    summary["model"] = trainer.final_model()
    return summary


def _base_criterion(cfg: ClassificationConfig):
    if build_mixup(cfg.mixup, 2) is not None:
        return SoftTargetCrossEntropy()
    return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)


def build_teacher(cfg: ClassificationConfig, splits: Splits, run_dir: Path, resume: bool) -> Optional[nn.Module]:
    """The DeiT teacher: a trained run, or EfficientNet-Lite0 fine-tuned here (kept in run_dir/teacher,
    reused when the run is resumed)."""
    t = cfg.teacher
    if t.kind == "none":
        return None
    if t.kind == "run":
        return load(t.path)
    folder = run_dir / "teacher"
    if resume and (folder / "model" / "config.json").exists():
        log.info("teacher: reusing the fine-tuned EfficientNet-Lite0 in %s", folder)
        return load(folder)
    mcfg = replace(cfg.model, arch="efficientnet_lite0", backbone="none", convnet_size=t.image_size)
    teacher = build_classifier(mcfg)
    if t.finetune_steps:
        log.info("teacher: fine-tuning EfficientNet-Lite0 for %d steps at %dpx", t.finetune_steps, t.image_size)
        tcfg = replace(cfg, mixup=MixupConfig(), teacher=TeacherConfig())
        criterion = DistillationLoss(_base_criterion(tcfg))
        train_cfg = replace(t.finetune, max_steps=t.finetune_steps, seed=cfg.train.seed)
        teacher = _fit(teacher, criterion, tcfg, splits, folder, train_cfg, resume)["model"]
    if is_main():
        save_model(teacher, folder / "model", "classifier", mcfg, meta={"classes": splits.classes})
    return teacher.eval()


def evaluate_model(model: nn.Module, splits: Splits, cfg: DataConfig, batch_size: int = 256) -> dict:
    """Top-1/top-5/loss/per-class metrics on val, test and the extra splits."""
    out = {}
    named = {"val": splits.val, "test": splits.test, **splits.extra}
    for name, ds in named.items():
        if ds is None:
            continue
        preds = predict(model, eval_dataset(ds, cfg), batch_size=batch_size)
        out[name] = {**classification_metrics(preds.logits, preds.labels), "num_skipped": preds.num_skipped}
    return out


def evaluate_run(run: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """``vlkit eval`` of a classification run: its saved model scored again on its splits, the data
    optionally changed by ``overrides`` (``data.eval_limit=...``) -> {"eval": {split: metrics}}."""
    from vlkit.tasks.data import eval_config

    cfg = eval_config(ClassificationConfig, run, overrides, ("data.", "eval_batch_size"))
    return {"eval": evaluate_model(load(run), build_splits(cfg.data), cfg.data, cfg.eval_batch_size)}


def train(cfg: ClassificationConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train, export and evaluate the recipe ``cfg``. Returns ``{"run_dir", "summary", "eval"}``."""
    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
    splits = build_splits(cfg.data)
    cfg = prepare(cfg, splits)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(cfg.train.seed)  # initialisations are a function of the seed too
    teacher = build_teacher(cfg, splits, run_dir, resume)
    torch.manual_seed(cfg.train.seed + 1)  # the student's: the same with or without a teacher
    model = build_classifier(cfg.model)
    criterion = DistillationLoss(_base_criterion(cfg), teacher, "none" if teacher is None else cfg.teacher.distillation,
                                 alpha=cfg.teacher.alpha, tau=cfg.teacher.tau)
    summary = _fit(model, criterion, cfg, splits, run_dir, cfg.train, resume)
    model = summary.pop("model")
    result = {"run_dir": str(run_dir), "summary": summary}
    if is_main():
        meta = {"classes": splits.classes, "transform": to_dict(cfg.data.transform), "dataset": splits.source}
        save_model(model, run_dir / "model", "classifier", cfg.model, meta=meta)
        result["eval"] = evaluate_model(model, splits, cfg.data, cfg.eval_batch_size)
        if teacher is not None:
            result["eval"]["teacher"] = evaluate_model(teacher, _test_only(splits), cfg.data,
                                                       cfg.eval_batch_size).get("test")
        (run_dir / "eval.json").write_text(json.dumps(_summary_json(result), indent=2))
    return result


def _test_only(splits: Splits) -> Splits:
    """Only the test split (or val when there is none): what the teacher is reported on."""
    return Splits(splits.train, splits.val if splits.test is None else None, splits.test, splits.classes,
                  splits.source)


def _summary_json(result: dict) -> dict:
    """eval.json: metrics without the bulky per-class lists (kept for val/test)."""
    return {"run_dir": result["run_dir"], "train": result["summary"], "eval": result["eval"]}
