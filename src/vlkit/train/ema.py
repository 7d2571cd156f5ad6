"""Exponential moving average of a model's weights (Polyak averaging; timm's ``ModelEmaV2``, as in DeiT)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """A shadow copy of ``model`` (parameters AND buffers) updated after every optimizer step.

    Update n (1-based): ``ema = d * ema + (1 - d) * model`` with the warmup
    ``d = min(decay, (1 + n) / (10 + n))``, so early averages are not dominated by the random init.
    Non-float buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied. ``state_dict()`` keys:
    ``updates`` (int64 scalar) and ``module.<name>`` for every entry of the model's state dict.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def decay_at(self, n: int) -> float:
        """The decay used by update ``n`` (1-based)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights toward ``model``'s (the unwrapped module, same architecture)."""
        self.updates += 1
        d = self.decay_at(int(self.updates.item()))
        live = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(live[name].detach().to(value.dtype), alpha=1 - d)
            else:
                value.copy_(live[name])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
