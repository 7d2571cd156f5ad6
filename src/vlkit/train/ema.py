"""Exponential moving average of a model's weights (Polyak averaging; DeiT/timm's ModelEmaV2)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = d * ema + (1 - d) * model`` after each optimizer step, with the warmup
    ``d = min(decay, (1 + n) / (10 + n))`` at update n. Buffers (e.g. BatchNorm statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = self.updates.item()
        d = min(self.decay, (1 + n) / (10 + n))
        ema_sd, live = self.module.state_dict(), model.state_dict()
        for name, value in ema_sd.items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(live[name].detach(), alpha=1 - d)
            else:
                value.copy_(live[name])
