"""AdamW with per-group learning rates and weight decay; warmup + cosine/linear/constant schedule.

The schedule is a pure function :func:`lr_at` of the step, set on the optimizer before every step
(:func:`set_lr`): nothing about it needs saving, and a resumed run gets the same values.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import nn

from vlkit.train.config import ParamGroupConfig, TrainConfig

log = logging.getLogger(__name__)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters never decayed: biases, norm weights and every other tensor of ndim <= 1, and the names
    (or name prefixes) ``model.no_weight_decay()`` lists (e.g. ``{"cls_token", "pos_embed"}``)."""
    listed = tuple(getattr(model, "no_weight_decay", lambda: ())())
    out = set()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or any(name == x or name.startswith(x) for x in listed):
            out.add(name)
    return out


def _group_of(name: str, specs: list[ParamGroupConfig]) -> Optional[ParamGroupConfig]:
    return next((g for g in specs if g.matches(name)), None)


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: (matched :class:`ParamGroupConfig` or default) x (decay, no decay).

    Each group is ``{"params": [...], "names": [...], "lr_scale": float, "weight_decay": float}``.
    Parameters of a group with ``lr_scale == 0`` are frozen (``requires_grad = False``) and left out,
    like parameters that were already frozen.
    """
    no_decay = no_weight_decay_names(model)
    groups: dict[tuple[float, float], dict] = {}
    frozen = 0
    for name, p in model.named_parameters():
        spec = _group_of(name, cfg.param_groups)
        scale = 1.0 if spec is None else spec.lr_scale
        if scale == 0:
            p.requires_grad_(False)
        if not p.requires_grad:
            frozen += p.numel()
            continue
        wd = cfg.weight_decay if spec is None or spec.weight_decay is None else spec.weight_decay
        wd = 0.0 if name in no_decay else wd
        group = groups.setdefault((scale, wd), {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    trainable = sum(p.numel() for g in groups.values() for p in g["params"])
    log.info("parameters: %s trainable, %s frozen, %d optimizer groups", f"{trainable:,}", f"{frozen:,}", len(groups))
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` (fused when every parameter is on CUDA)."""
    groups = build_param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameter: every parameter is frozen")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda for p in params)
    for g in groups:
        g.pop("names")
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True if fused else None)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup ``w`` steps: ``lr * (step + 1) / w`` (step w-1 reaches ``lr``). Then, with
    ``p = (step - w) / (total_steps - w)`` clipped to [0, 1]:
    cosine ``min + (lr - min) * (1 + cos(pi p)) / 2``, linear ``min + (lr - min) * (1 - p)``,
    constant ``lr``; ``min = lr * min_lr_ratio``.
    """
    warmup = cfg.warmup(total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    factor = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group["lr_scale"]``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
