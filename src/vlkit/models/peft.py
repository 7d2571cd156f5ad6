"""How much of a model trains: per component ``frozen``, ``full``, ``bias_norm`` (BitFit, Ben Zaken
et al. 2022, with the norms' scales too) or ``lora`` (only LoRA's A and B); prompt tuning (Lester
et al. 2021) is :class:`~vlkit.models.vlm.VLM`'s ``prompt_tokens``. Per-component learning rates
are ``train.param_groups`` (a pattern and an lr_scale, 0 freezing).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from torch import nn

from vlkit.config import ConfigError
from vlkit.nn.lora import LoRALinear, apply_lora

log = logging.getLogger(__name__)

Mode = Literal["frozen", "full", "bias_norm", "lora"]
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


@dataclass
class TuningConfig:
    """Which parameters of each component train."""

    vision: Mode = "frozen"
    connector: Mode = "full"
    decoder: Mode = "frozen"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = r"attn\.(qkv|proj)$"  # Linear layers wrapped (names inside each component)

    def __post_init__(self):
        if self.connector == "lora":
            raise ConfigError("connector", "LoRA on the connector is not offered: train it fully or freeze it")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS) or type(module).__name__ == "RMSNorm"


def set_tuning(component: nn.Module, mode: Mode, cfg: TuningConfig) -> int:
    """Apply ``mode`` to ``component`` (wrapping LoRA layers in place); returns its trainable count."""
    if mode == "lora" and not any(isinstance(m, LoRALinear) for m in component.modules()):
        apply_lora(component, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    component.requires_grad_(mode == "full")
    for name, module in component.named_modules():
        if mode == "lora" and isinstance(module, LoRALinear):
            module.lora_a.requires_grad_(True)
            module.lora_b.requires_grad_(True)
        if mode == "bias_norm":
            if _is_norm(module):
                module.requires_grad_(True)
            for pname, p in module.named_parameters(recurse=False):
                if pname == "bias":
                    p.requires_grad_(True)
    return sum(p.numel() for p in component.parameters() if p.requires_grad)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts per top-level child, and overall."""
    rows = {}
    for name, child in model.named_children():
        rows[name] = (sum(p.numel() for p in child.parameters() if p.requires_grad),
                      sum(p.numel() for p in child.parameters()))
    own = [p for n, p in model.named_parameters(recurse=False)]
    if own:
        rows["(own)"] = (sum(p.numel() for p in own if p.requires_grad), sum(p.numel() for p in own))
    rows["total"] = (sum(t for t, _ in rows.values()), sum(a for _, a in rows.values()))
    return {k: v[0] for k, v in rows.items()} | {f"{k}_all": v[1] for k, v in rows.items()}
