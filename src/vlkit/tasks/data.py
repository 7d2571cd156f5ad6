"""Image-classification data: one config picks the dataset; :func:`build_splits` gives train/val/test.

Datasets: Fashion-MNIST (Debian files), the synthetic world (always there, the fallback when
Fashion-MNIST is missing), an ImageFolder tree, JSONL/CSV manifests, webdataset tar shards. Transforms come from
:class:`vlkit.data.transforms.TransformConfig`; each split is wrapped in a
:class:`vlkit.data.base.TransformedDataset` so augmentation is seeded per (seed, epoch, index).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset

from vlkit.config import ConfigError
from vlkit.data.base import TransformedDataset
from vlkit.data.datasets import FASHION_MNIST_ROOT, FashionMNIST, ImageFolder, ManifestDataset, WebDatasetShards
from vlkit.data.transforms import TransformConfig, build_transform
from vlkit.data.world import WorldConfig, WorldDataset

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the images and labels come from, and how they are split and transformed."""

    dataset: Literal["fashion_mnist", "world", "imagefolder", "manifest", "webdataset"] = "fashion_mnist"  # source
    root: str = FASHION_MNIST_ROOT  # fashion_mnist: folder of the idx files
    train: str = ""  # imagefolder: tree root; manifest: JSONL/CSV file; webdataset: a .tar, a folder of them,
    # a glob or a {000..009} range; of the training split
    val: str = ""  # same for validation; empty = hold out `val_size` training samples
    test: str = ""  # same for the test split; empty = no test split (imagefolder/manifest)
    val_size: int = 5000  # training samples held out for validation when there is no val split
    train_limit: int = 0  # use only the first N (shuffled) training samples; 0 = all
    eval_limit: int = 0  # cap on validation/test samples; 0 = all
    fallback: Literal["world", "error"] = "world"  # fashion_mnist missing: use the synthetic world, or fail
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic world (dataset=world)
    transform: TransformConfig = field(default_factory=TransformConfig)  # preprocessing and augmentation
    seed: int = 0  # seeds the train/val split and the augmentation

    def __post_init__(self):
        for name in ("val_size", "train_limit", "eval_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.dataset in ("imagefolder", "manifest", "webdataset") and not self.train:
            raise ConfigError("train", f"dataset={self.dataset} needs the path of the training split")


class Subset(Dataset):
    """``base`` restricted to ``indices``; keeps ``classes`` (when the base has them)."""

    def __init__(self, base: Dataset, indices):
        self.base, self.indices = base, [int(i) for i in indices]
        self.classes = list(getattr(base, "classes", []))

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # a transformed base re-seeds its augmentation per epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


@dataclass
class Splits:
    """Raw (untransformed) datasets of one source; ``extra`` holds additional eval splits."""

    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    classes: list[str]
    source: str  # the dataset actually used (after any fallback)
    extra: dict[str, Dataset] = field(default_factory=dict)


def limit_dataset(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` samples of ``ds`` (all of them when ``n`` is 0 or not smaller)."""
    return Subset(ds, torch.arange(n)) if 0 < n < len(ds) else ds


def _hold_out(train: Dataset, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """A deterministic (seeded) split of ``train`` into (train, val of ``cfg.val_size``)."""
    if cfg.val_size >= len(train):
        raise ConfigError("data.val_size", f"{cfg.val_size} >= the {len(train)} training samples")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    return Subset(train, perm[cfg.val_size:]), Subset(train, perm[:cfg.val_size])


def _world_splits(cfg: DataConfig) -> Splits:
    ds = {s: WorldDataset(cfg.world, s, task="classification") for s in ("train", "val", "test", "compositional")}
    classes = list(ds["train"].classes)
    return Splits(ds["train"], ds["val"], ds["test"], classes, "world", extra={"compositional": ds["compositional"]})


def _file_splits(cfg: DataConfig) -> Splits:
    kind = {"imagefolder": ImageFolder, "manifest": ManifestDataset, "webdataset": WebDatasetShards}[cfg.dataset]
    train = kind(cfg.train)
    classes = list(train.classes)
    loaded = {}
    for name in ("val", "test"):
        path = getattr(cfg, name)
        if path:
            loaded[name] = kind(path)
            if list(loaded[name].classes) != classes:
                raise ConfigError(f"data.{name}", f"classes {list(loaded[name].classes)} differ from "
                                                  f"the training split's {classes}")
    if "val" not in loaded:
        train, loaded["val"] = _hold_out(train, cfg)
    return Splits(train, loaded["val"], loaded.get("test"), classes, cfg.dataset)


def build_splits(cfg: DataConfig) -> Splits:
    """The raw splits of ``cfg.dataset`` with the limits applied (logged)."""
    if cfg.dataset == "fashion_mnist" and not FashionMNIST.available(cfg.root):
        if cfg.fallback == "error":
            raise FileNotFoundError(f"Fashion-MNIST not found in {cfg.root}: apt-get install dataset-fashion-mnist")
        log.warning("Fashion-MNIST not found in %s: using the synthetic world instead", cfg.root)
        splits = _world_splits(cfg)
    elif cfg.dataset == "fashion_mnist":
        full = FashionMNIST(cfg.root, "train")
        train, val = _hold_out(full, cfg)
        splits = Splits(train, val, FashionMNIST(cfg.root, "test"), list(FashionMNIST.classes), "fashion_mnist")
    elif cfg.dataset == "world":
        splits = _world_splits(cfg)
    else:
        splits = _file_splits(cfg)
    if cfg.train_limit:
        splits.train = Subset(splits.train, torch.randperm(len(splits.train), generator=torch.Generator()
                                                             .manual_seed(cfg.seed + 1))[:cfg.train_limit])
    splits.val = limit_dataset(splits.val, cfg.eval_limit)
    splits.test = limit_dataset(splits.test, cfg.eval_limit) if splits.test is not None else None
    splits.extra = {k: limit_dataset(v, cfg.eval_limit) for k, v in splits.extra.items()}
    log.info("data %s: %d train, %d val, %s test, %d classes", splits.source, len(splits.train), len(splits.val),
             len(splits.test) if splits.test is not None else "no", len(splits.classes))
    return splits


def train_dataset(splits: Splits, cfg: DataConfig) -> TransformedDataset:
    return TransformedDataset(splits.train, build_transform(cfg.transform, train=True), seed=cfg.seed)


def eval_dataset(ds: Dataset, cfg: DataConfig) -> TransformedDataset:
    return TransformedDataset(ds, build_transform(cfg.transform, train=False), seed=cfg.seed)



SCENE_SPLITS = ("val", "test", "compositional")


def scene_split(cfg, name: str, train: bool, task: str, masks: bool = False) -> TransformedDataset:
    """A split of a scene recipe (contrastive, detection, segmentation): the synthetic world's
    ``name`` split (evaluation splits cut to ``cfg.eval_limit`` scenes), or with ``cfg.data == "coco"``
    a COCO-format JSON (``coco_train`` / ``coco_val`` + ``image_root``, images resized to the world's
    side); transformed with ``cfg.transform``, seeded with ``cfg.train.seed``."""
    if getattr(cfg, "data", "world") == "coco":
        from vlkit.data.coco import CocoDetection

        base = CocoDetection(cfg.coco_train if train else cfg.coco_val, cfg.image_root, cfg.world.image_size, masks)
    else:
        length = None if train else min(cfg.eval_limit, getattr(cfg.world, f"{name}_length"))
        base = WorldDataset(cfg.world, name, length=length, task=task)
    return TransformedDataset(base, build_transform(cfg.transform, train=train), seed=cfg.train.seed)


def scene_eval_splits(cfg) -> tuple[str, ...]:
    """The evaluation splits of a scene recipe: the world's three, or the COCO validation JSON if given."""
    if getattr(cfg, "data", "world") == "coco":
        return ("val",) if cfg.coco_val else ()
    return SCENE_SPLITS


SCENE_EVAL_OVERRIDABLE = ("eval_limit", "eval_batch_size", "world.", "coco_val", "image_root")


def eval_config(cls: type, run, overrides, allowed: tuple[str, ...]):
    """The recipe a run was trained with (``run/config.yaml``), for ``vlkit eval``: the model is the saved
    one, so only the data and evaluation keys starting with ``allowed`` may be overridden."""
    from vlkit.config import load_config

    check_eval_overrides(overrides, allowed, cls.__name__)
    return load_config(cls, Path(run) / "config.yaml", list(overrides))


def check_eval_overrides(overrides, allowed: tuple[str, ...], what: str) -> None:
    bad = [o for o in overrides if not o.startswith(allowed)]
    if bad:
        raise ConfigError(bad[0].split("=")[0], f"vlkit eval of a {what} run changes only {', '.join(allowed)} "
                                                "(the model is the saved one)")


def rescore_scenes(run, overrides, cls: type, split, evaluate) -> dict:
    """``vlkit eval`` of a scene run (detection, segmentation): its saved model scored again on every
    evaluation split, the data optionally changed -> {"eval": {split: metrics}}."""
    from vlkit.checkpoints.hub import load

    cfg = eval_config(cls, run, overrides, SCENE_EVAL_OVERRIDABLE)
    model = load(run)
    return {"eval": {s: evaluate(model, split(cfg, s, False), cfg) for s in scene_eval_splits(cfg)}}


def start_scene_run(cfg, run_dir: str | Path | None, resume: bool, build, encoder_of):
    """The start of a DETR / Segmenter run -> (recipe, run folder, model): the folder made, the recipe
    (its ViT from ``backbone_init``, :func:`pretrained_vit`) saved there as config.yaml, the model
    ``build(cfg)`` from the seed, and the pretrained weights loaded into ``encoder_of(model)``."""
    import yaml

    from vlkit.checkpoints.io import load_state_dict_strict
    from vlkit.config import to_dict
    from vlkit.train.distributed import is_main

    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, state = pretrained_vit(cfg, run_dir if resume else None)
    if is_main():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(cfg.train.seed)
    model = build(cfg)
    if state is not None:
        load_state_dict_strict(encoder_of(model), state, source=cfg.backbone_init)
    return cfg, run_dir, model


def pretrained_vit(cfg, resume_dir: str | Path | None = None):
    """(recipe, weights) for a scene recipe whose ViT starts from ``cfg.backbone_init`` (a vlkit ViT
    classifier run, a CLIP run's image tower or a Segmenter run's encoder): ``cfg.vit`` becomes that
    ViT's configuration without a head (``vit.*`` overrides are replaced, its regularisation kept), so
    the saved detector or segmenter rebuilds without the pretrained run; the weights are for its
    encoder (``load_state_dict_strict``). Without ``backbone_init``: (cfg, None). ``resume_dir``: a run
    being resumed from a checkpoint of the same ``backbone_init`` takes the ViT of its config.yaml and
    no weights (the checkpoint holds them): the pretrained run need not be there any more."""
    if not cfg.backbone_init:
        return cfg, None
    from dataclasses import replace

    from vlkit.checkpoints.hub import load
    from vlkit.config import from_dict, read_yaml
    from vlkit.encoders.vit import VisionTransformer, ViTConfig
    from vlkit.train.checkpoint import find_latest

    saved = Path(resume_dir) / "config.yaml" if resume_dir is not None else None
    if saved is not None and saved.is_file() and find_latest(resume_dir) is not None:
        data = read_yaml(saved)
        if data.get("backbone_init") == cfg.backbone_init:
            log.info("resuming: the backbone's ViT from %s, its weights from the checkpoint", saved)
            return replace(cfg, vit=from_dict(ViTConfig, data["vit"], "vit")), None
    model = load(cfg.backbone_init)
    encoder = getattr(model, "visual", getattr(model, "encoder", model))  # CLIP's tower, Segmenter's encoder
    if not isinstance(encoder, VisionTransformer) or encoder.cfg.embed != "patch":
        raise ConfigError("backbone_init", f"{cfg.backbone_init} is not a ViT classifier, a CLIP model with a ViT "
                                           f"image tower or a Segmenter (it holds a {type(model).__name__})")
    vit = replace(encoder.cfg, num_classes=0)
    if vit.image_size != cfg.world.image_size:
        raise ConfigError("backbone_init", f"its ViT reads {vit.image_size} px images, the recipe "
                                           f"{cfg.world.image_size} px")
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    log.info("backbone from %s: ViT d %d x %d, patch %d", cfg.backbone_init, vit.embed_dim, vit.depth, vit.patch_size)
    return replace(cfg, vit=vit), state
