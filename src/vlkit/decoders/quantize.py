"""Int8 weights for CPU decoding.

Decoding one token reads every weight once: SmolLM2-135M in float32 streams 540 MB per token, so
on a CPU tokens/s is set by memory bandwidth, not by arithmetic. :func:`quantize_int8` swaps every
linear layer (the tied output head included) for :class:`Int8Linear`: weight-only quantization,
int8 weights with one symmetric scale per output channel, multiplied with bfloat16 activations by
PyTorch's int8 weight-pack kernel (the one gpt-fast and torchao use): 4x fewer weight bytes.
Activations are NOT quantized: LLM activations have outlier channels (Dettmers et al. 2022), and
per-tensor dynamic activation quantization changes SmolLM2's next token at half of the positions,
while weight-only int8 keeps ~98% of them. Embeddings, norms and the KV cache stay float32;
checkpoints are unaffected (quantize after loading, for inference only).
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """An ``nn.Linear`` computed with int8 weights (per-output-channel scales) and bfloat16
    activations, accumulated in float; inference only. ``forward(x (..., in))`` -> ``(..., out)`` in
    x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.weight,
                                      self.scale).reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`Int8Linear`; returns ``model``
    in eval mode. Meant for CPU decoding (on a GPU, bfloat16 weights are the usual choice)."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Linear(linear))
    return model.eval()
