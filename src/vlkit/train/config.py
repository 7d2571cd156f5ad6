"""The training loop's configuration: optimisation, schedule, precision, logging, checkpoints.

Checks that need the run (world size, dataset length) happen when :class:`vlkit.train.Trainer`
starts; everything that can be checked from the values alone is checked here and raises
:class:`vlkit.config.ConfigError` naming the field.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from vlkit.config import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
AMP_MODES = ("none", "bf16", "fp16")
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class ParamGroupConfig:
    """Learning-rate scale and weight decay for the parameters whose names match ``pattern``."""

    pattern: str  # name prefix (e.g. "patch_embed.backbone.") or regular expression searched in the name
    lr_scale: float = 1.0  # multiplies the scheduled lr; 0 FREEZES the matched parameters (requires_grad False)
    weight_decay: Optional[float] = None  # None = TrainConfig.weight_decay (never on biases, norms, 1-d tensors)

    def __post_init__(self):
        if not self.pattern:
            raise ConfigError("pattern", "must not be empty (it would match every parameter)")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError("pattern", f"{self.pattern!r} is not a valid regular expression: {e}") from None
        if not (self.lr_scale >= 0 and math.isfinite(self.lr_scale)):
            raise ConfigError("lr_scale", f"must be a finite number >= 0, got {self.lr_scale}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")

    def matches(self, name: str) -> bool:
        """True when parameter ``name`` starts with ``pattern`` or the regex is found in it."""
        return name.startswith(self.pattern) or re.search(self.pattern, name) is not None


@dataclass
class TrainConfig:
    """One training run (AdamW, warmup + cosine/linear/constant) of :class:`vlkit.train.Trainer`."""

    epochs: float = 10.0  # passes over the training data, fractions allowed (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 wins over epochs
    batch_size: int = 128  # GLOBAL batch per optimizer step: over all ranks and accumulation micro-steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (micro batch = batch_size / (world * accum))
    lr: float = 1e-3  # peak learning rate (after warmup), multiplied by each group's lr_scale
    min_lr_ratio: float = 0.01  # final lr = lr * min_lr_ratio (cosine and linear schedules)
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr over these optimizer steps
    warmup_fraction: float = 0.0  # alternative to warmup_steps: this fraction of the total steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    weight_decay: float = 0.05  # AdamW decoupled weight decay (never on biases, norms, model.no_weight_decay())
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    clip_grad_norm: float = 0.0  # max global L2 gradient norm; 0 = no clipping
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 = off (evaluated and exported if on)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype on CUDA (fp16 with a GradScaler); CPU: fp32
    compile: bool = False  # torch.compile the (DDP-wrapped or sharded) model
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicas (DDP) or sharded weights/grads/states (FSDP2)
    param_groups: list[ParamGroupConfig] = field(default_factory=list)  # first match wins; lr_scale 0 freezes
    repeated_aug: int = 1  # DeiT repeated augmentation: each image k times per epoch (epoch length unchanged)
    group_by_length: int = 0  # > 0: batches of similar-length samples, sorted within groups of this many batches
    num_workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    seed: int = 0  # seeds data order, augmentation, batch transforms, dropout: a run is a function of its seed
    log_every: int = 20  # optimizer steps between metrics.jsonl lines
    eval_every: int = 0  # optimizer steps between evaluations (0 = only at the end)
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept in run_dir/checkpoints
    max_nonfinite: int = 5  # abort after this many consecutive non-finite losses (each one's update is skipped)
    progress: bool = True  # tqdm progress bar on the main process (only when stderr is a terminal)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("batch_size", "grad_accum_steps", "repeated_aug", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "num_workers", "weight_decay", "clip_grad_norm",
                     "epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")
        self._check_optimizer()
        self._check_choices()
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError("batch_size", f"{self.batch_size} is not divisible by grad_accum_steps "
                                            f"{self.grad_accum_steps}")

    def _check_optimizer(self) -> None:
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if self.group_by_length < 0:
            raise ConfigError("group_by_length", f"must be >= 0, got {self.group_by_length}")
        if self.group_by_length and self.repeated_aug > 1:
            raise ConfigError("group_by_length", "length grouping and repeated augmentation do not combine")
        if self.warmup_fraction > 0 and self.warmup_steps > 0:
            raise ConfigError("warmup_fraction", "set warmup_steps or warmup_fraction, not both")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")

    def _check_choices(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError("amp", f"must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError("parallel", f"must be one of {list(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.ema_decay:
            raise ConfigError("ema_decay", "an EMA of sharded weights is not offered: use parallel=ddp or ema_decay=0")
        if self.parallel == "fsdp" and self.amp == "fp16":
            raise ConfigError("amp", "parallel=fsdp trains in bf16 or float32 (fp16's loss scaling is not sharded)")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps`` if set, else ``ceil(epochs * steps_per_epoch)``."""
        return self.max_steps or max(1, math.ceil(self.epochs * steps_per_epoch))

    def warmup(self, total_steps: int) -> int:
        """Warmup length in optimizer steps (``warmup_steps``, or ``warmup_fraction`` of ``total_steps``)."""
        return self.warmup_steps or round(self.warmup_fraction * total_steps)
