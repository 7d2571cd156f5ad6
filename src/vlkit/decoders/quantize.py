"""Int8, int4 and prepacked float32 weights for CPU decoding.

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

:func:`prepack_fp32` keeps float32 arithmetic (equal up to summation order): every linear layer keeps
its float32 weight, stored once in oneDNN's blocked layout (:class:`PackedLinear`) instead of being packed again on every call or
multiplied by the few-row path of :func:`vlkit.nn.layers.linear`; batched decoding steps get about
25% faster on the 2-core EPYC this was measured on (SmolLM2-135M, 8 rows).
"""
from __future__ import annotations

import torch
from torch import nn


class _WeightOnlyLinear(nn.Module):
    """What the quantized linear layers share: ``forward(x (..., in))`` -> ``(..., out)`` in x's dtype,
    the rows multiplied in bfloat16 by the subclass's ``_mm(x (N, in) bf16)``, then the float bias."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous())
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} weights"


class Int8Linear(_WeightOnlyLinear):
    """An ``nn.Linear`` computed with int8 weights (per-output-channel scales) and bfloat16
    activations, accumulated in float; inference only. ``forward(x (..., in))`` -> ``(..., out)`` in
    x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, "int8")
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight, self.scale)


class Int4Linear(_WeightOnlyLinear):
    """An ``nn.Linear`` computed with 4-bit weights in groups of ``group_size`` input channels:
    w = q * scale + minimum for q in 0..15 (scale = (max - min) / 15 per group), bfloat16 activations,
    PyTorch's CPU int4 kernel; inference only. ``forward(x (..., in))`` -> ``(..., out)`` in x's dtype."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__(linear, f"int4 (groups of {group_size})")
        w = linear.weight.detach().float()
        self.group_size = group_size
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {group_size}")
        if not int4_fits(linear, group_size):
            raise ValueError(f"int4 weights need in_features ({self.in_features}) a multiple of group_size "
                             f"({group_size}) and out_features ({self.out_features}) a multiple of 16")
        groups = w.view(self.out_features, -1, group_size)  # (out, in / g, g)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        # the kernel computes (q - 8) * scale + zero with scale and zero in bfloat16 (in / g, out, 2):
        # zero = min + 8 scale, and q counted from the minimum the rounded values give back
        scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        q = ((groups - (zero - 8 * scale)) / scale).round().clamp(0, 15)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(self.out_features, self.in_features).to(torch.int32), 1))
        self.register_buffer("scale_zero", torch.stack([scale, zero], -1).squeeze(2).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scale_zero)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose float32 weight lives in oneDNN's blocked layout, packed once for products
    of about ``rows`` rows; float32 arithmetic throughout (equal to ``F.linear`` up to summation order).
    Inference only, CPU only; ``weight`` unpacks a (dense) copy, e.g. for quantizing a draft."""

    def __init__(self, linear: nn.Module, rows: int = 8):
        super().__init__()
        if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
            raise RuntimeError("prepacked weights need PyTorch built with oneDNN (mkldnn)")
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        w = linear.weight.detach().to(torch.float32).contiguous()
        if w.device.type != "cpu":
            raise ValueError(f"prepacked weights are for CPU decoding; this weight is on {w.device}")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)  # opaque: not a buffer, not saved
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"a prepacked linear layer takes float32 CPU inputs, got {x.dtype} on {x.device}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a prepacked linear layer is for inference: it has no gradients (use torch.no_grad)")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo) -> "PackedLinear":  # (an opaque oneDNN tensor has no storage to copy)
        memo[id(self)] = copy = PackedLinear(self, self.rows).train(self.training)
        return copy

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float32 packed for {self.rows} rows"


def int4_fits(linear: nn.Linear, group_size: int = 32) -> bool:
    """Whether the int4 kernel (PyTorch >= 2.6) exists and takes this layer's shape (whole groups;
    output rows in tiles of 16)."""
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and linear.in_features % group_size == 0
            and linear.out_features % 16 == 0)


def _replace_linears(model: nn.Module, make) -> nn.Module:
    """Every ``nn.Linear`` (or :class:`PackedLinear`) of ``model`` -> ``make(name, linear)``, in place; eval mode."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))]
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
    in ``int8_names`` (any component of the module's name; by default the output head, whose errors flip
    the next token directly; llama.cpp keeps it wider too) or whose shape does not fit (:func:`int4_fits`): :class:`Int8Linear`. Returns
    ``model`` in eval mode. CPU only."""
    def make(name: str, m: nn.Linear) -> nn.Module:
        if set(name.split(".")) & set(int8_names) or not int4_fits(m, group_size):  # (lm_head.base too)
            return Int8Linear(m)
        return Int4Linear(m, group_size)
    return _replace_linears(model, make)


def prepack_fp32(model: nn.Module, rows: int = 8) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`PackedLinear` (same float32
    weights, oneDNN layout packed for ``rows``-row products: the batch size of decoding steps); returns
    ``model`` in eval mode. CPU inference only: the packed weights are not parameters (no training, no
    ``.to(device)``, not in the state dict). A tied output head gets its own packed copy. Packing for 8
    rows costs nothing at one row, while packing for 1 row slows 8-row products (a batch-8 SmolLM2 step
    133-156 ms against 100-113) and hence speculative checks: keep the default."""
    return _replace_linears(model, lambda name, m: PackedLinear(m, rows))
