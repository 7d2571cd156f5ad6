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

:func:`quantize_int4` goes further, for drafts (speculative decoding) more than for answers: 4-bit
weights in groups of 32 input channels, each group with its own scale and offset (asymmetric, the
layout of llama.cpp's Q4_1 and of gpt-fast/torchao's int4 weight-only), through PyTorch's CPU int4
kernel: 8x fewer weight bytes than float32, 2x fewer than int8. The output head keeps int8 (with an
int4 head SmolLM2's int4 draft agrees with the float model on 66% of the tokens, with an int8 head
93%), as do layers whose input width is not a multiple of the group size (or whose output width is
not a multiple of 16).
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


class Int4Linear(nn.Module):
    """An ``nn.Linear`` computed with 4-bit weights in groups of ``group_size`` input channels:
    w = q * scale + minimum for q in 0..15 (scale = (max - min) / 15 per group), bfloat16 activations,
    PyTorch's CPU int4 kernel; inference only. ``forward(x (..., in))`` -> ``(..., out)`` in x's dtype."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        if not int4_fits(linear, group_size):
            raise ValueError(f"int4 weights need in_features ({self.in_features}) a multiple of group_size "
                             f"({group_size}) and out_features ({self.out_features}) a multiple of 16")
        groups = w.view(self.out_features, -1, group_size)  # (out, in / g, g)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16).float()  # as the kernel will read it
        q = ((groups - low) / scale).round().clamp(0, 15)
        # the kernel computes (q - 8) * scale + zero: zero = min + 8 scale, both bfloat16 (in / g, out, 2)
        zero = (low + 8 * scale)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(self.out_features, self.in_features).to(torch.int32), 1))
        self.register_buffer("scale_zero", torch.stack([scale, zero], -1).squeeze(2).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(),
                                                       self.weight, self.group_size, self.scale_zero)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights, " \
               f"group_size={self.group_size}"


def int4_fits(linear: nn.Linear, group_size: int = 32) -> bool:
    """Whether the int4 kernel takes this layer's shape (whole groups; output rows in tiles of 16)."""
    return linear.in_features % group_size == 0 and linear.out_features % 16 == 0


def _replace_linears(model: nn.Module, make) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` -> ``make(name, linear)``, in place; eval mode."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(name, linear))
    return model.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`Int8Linear`; returns ``model``
    in eval mode. Meant for CPU decoding (on a GPU, bfloat16 weights are the usual choice)."""
    return _replace_linears(model, lambda name, m: Int8Linear(m))


def quantize_int4(model: nn.Module, group_size: int = 32, int8_names: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`Int4Linear`, except those named
    in ``int8_names`` (by default the output head, whose errors flip the next token directly; llama.cpp
    keeps it wider too) or whose shape does not fit (:func:`int4_fits`): :class:`Int8Linear`. Returns
    ``model`` in eval mode. CPU only."""
    def make(name: str, m: nn.Linear) -> nn.Module:
        if name.rpartition(".")[2] in int8_names or not int4_fits(m, group_size):
            return Int8Linear(m)
        return Int4Linear(m, group_size)
    return _replace_linears(model, make)
