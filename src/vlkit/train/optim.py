"""AdamW with per-group learning rates and weight decay; warmup + cosine/linear schedule."""
from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn

from vlkit.train.config import TrainConfig

log = logging.getLogger(__name__)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases, norm weights (any 1-d tensor) and what ``model.no_weight_decay()`` lists."""
    listed = set(getattr(model, "no_weight_decay", lambda: set())())
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n in listed}


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: (config group or default) x (decay, no decay).

    Each group dict carries ``lr_scale``; parameters of a group with ``lr_scale == 0`` are frozen
    (``requires_grad = False``) and left out. Parameters already frozen are left out too.
    """
    patterns = [(re.compile(g.pattern), g) for g in cfg.param_groups]
    no_decay = _no_decay_names(model)
    groups: dict[tuple, dict] = {}
    frozen = 0
    for name, p in model.named_parameters():
        spec = next((g for rx, g in patterns if rx.search(name)), None)
        scale = spec.lr_scale if spec is not None else 1.0
        if scale == 0:
            p.requires_grad_(False)
        if not p.requires_grad:
            frozen += p.numel()
            continue
        wd = cfg.weight_decay if spec is None or spec.weight_decay is None else spec.weight_decay
        wd = 0.0 if name in no_decay else wd
        key = (scale, wd)
        groups.setdefault(key, {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    trainable = sum(p.numel() for g in groups.values() for p in g["params"])
    log.info("parameters: %s trainable, %s frozen, %d optimizer groups", f"{trainable:,}", f"{frozen:,}", len(groups))
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = build_param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameter: every parameter is frozen")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda for p in params)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule to min lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    factor = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
