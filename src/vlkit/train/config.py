"""The training loop's configuration: optimisation, schedule, precision, logging, checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vlkit.config import ConfigError


@dataclass
class ParamGroupConfig:
    """Learning-rate scale and weight decay for the parameters whose names match ``pattern``."""

    pattern: str  # regular expression searched in parameter names (e.g. "^patch_embed\\.backbone\\.")
    lr_scale: float = 1.0  # multiplies the scheduled lr; 0 freezes the matched parameters
    weight_decay: Optional[float] = None  # None = the loop's weight_decay (never on biases and norms)

    def __post_init__(self):
        if self.lr_scale < 0:
            raise ConfigError("lr_scale", f"must be >= 0, got {self.lr_scale}")


@dataclass
class TrainConfig:
    """One training run (AdamW, warmup + cosine) of :class:`vlkit.train.Trainer`."""

    epochs: float = 10.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 wins over epochs
    batch_size: int = 128  # GLOBAL batch per optimizer step: over all ranks and accumulation micro-steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.01  # final lr = lr * min_lr_ratio (cosine/linear)
    warmup_steps: int = 0  # linear warmup from 0 to lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases, norms, tokens)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    clip_grad_norm: float = 0.0  # max global gradient norm; 0 = no clipping
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 = off (evaluated and exported if on)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype on CUDA; CPU always runs fp32
    compile: bool = False  # torch.compile the model
    param_groups: list[ParamGroupConfig] = field(default_factory=list)  # first match wins; lr_scale 0 freezes
    repeated_aug: int = 1  # DeiT repeated augmentation: each image k times per epoch (epoch length unchanged)
    num_workers: int = 0  # DataLoader worker processes
    seed: int = 0  # seeds the data order, augmentation, dropout: a run is a function of its seed
    log_every: int = 20  # steps between metrics.jsonl lines
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    max_nonfinite: int = 5  # abort after this many consecutive non-finite losses
    progress: bool = True  # tqdm progress bar on the main process

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "repeated_aug", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "num_workers", "weight_decay", "clip_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError("batch_size", f"{self.batch_size} is not divisible by grad_accum_steps "
                                            f"{self.grad_accum_steps}")
