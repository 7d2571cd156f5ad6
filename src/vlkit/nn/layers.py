"""Small layers: a fast Linear and the residual-branch helpers.

- :class:`Linear`: ``nn.Linear`` (same parameters, same state dict) whose fp32 CPU matmuls run
  through oneDNN, forward and backward. On AVX-512 CPUs where MKL's sgemm does not use its best
  kernels (e.g. AMD EPYC) this is about 1.5-2x faster per GEMM; elsewhere it is on par. On
  AVX2-only CPUs the weight gradient stays with MKL (:data:`ONEDNN_WEIGHT_GRAD`): there oneDNN's is
  1.3-1.5x slower, its forward 1.1-1.2x faster (ViT-Ti train step: 1.01x HF instead of 0.95x). It
  packs the weight on every call, which only pays off for many rows: below
  :data:`ONEDNN_MIN_ROWS` it computes ``(W @ x^T)^T`` instead: for a few rows (decoding, batched
  decoding, speculative verification) that product streams the weight once where ``F.linear``'s
  ``x @ W^T`` is up to 2-4x slower on these CPUs (2 to 8 rows, weights from memory). One row is
  computed as two (the row repeated): the one-row kernel (gemv) reads the weight about 1.5x slower
  (SmolLM2's 113 MB output head: 10.4 vs 15.4 ms). The result is made contiguous (attention kernels
  need a unit last stride).
  ``VLKIT_ONEDNN_LINEAR=0`` turns both off (plain ``F.linear``).
- :class:`LayerScale`: per-channel scaling of a residual branch, initialised small
  (Touvron et al. 2021, "Going deeper with Image Transformers" (CaiT), §2.1, eq. 4).
- :class:`DropPath`: stochastic depth, dropping a whole residual branch per sample
  (Huang et al. 2016, "Deep Networks with Stochastic Depth").
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

ONEDNN_LINEAR = (os.environ.get("VLKIT_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# oneDNN's weight-gradient GEMM (x^T dy) beats MKL's on AVX-512 CPUs only: on an AVX2-only EPYC (Zen 3) MKL's
# takes 0.6-0.7x its time (ViT-Ti's 6304 x 192 -> 768: 18 vs 26 ms), while oneDNN stays ahead for the forward
# (``VLKIT_ONEDNN_WEIGHT_GRAD=1`` / ``0`` chooses either on any CPU)
ONEDNN_WEIGHT_GRAD = {"1": True, "0": False}.get(os.environ.get("VLKIT_ONEDNN_WEIGHT_GRAD", "auto"),
                                                 torch.backends.cpu.get_cpu_capability() == "AVX512")

ONEDNN_MIN_ROWS = 64  # fewer rows (x.numel() / in_features) than this: (W @ x^T)^T


def _onednn_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias -> (..., out) with oneDNN (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b; backward: dx = dy W, dW = (x^T dy)^T, db = sum(dy), all GEMMs through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # autograd may hand a broadcast gradient (stride 0, e.g. from ``y.sum()``) or a transposed one:
        # as the weight operand of dW's GEMM oneDNN takes ~1000x longer on a stride-0 one (6.4 s vs 7 ms
        # for 5400 x 384 on an EPYC), and ~2x on a transposed one; one copy is cheap next to either
        grad = grad.contiguous()
        grad_2d = grad.view(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(grad, weight.t(), None)  # (..., in)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
            if ONEDNN_WEIGHT_GRAD:
                grad_w = _onednn_mm(x_2d.t(), grad_2d.t(), None).t().contiguous()  # (out, in)
            else:
                grad_w = grad_2d.t() @ x_2d
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; fp32 CPU: many rows through oneDNN, 1-63 rows as ``(W @ x^T)^T`` (see module docstring)."""
    fast = (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
    if fast and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]:
        return _OneDNNLinear.apply(x, weight, bias)
    if fast and x.numel() > 0:  # 1 to ONEDNN_MIN_ROWS - 1 rows
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n == 1:  # a two-row product streams the weight faster than the one-row one (gemv)
            rows = rows.expand(2, -1).contiguous()
        y = (weight @ rows.t())[:, :n].t().contiguous().view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`: same parameters, init and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """x (..., dim) -> x * gamma, with gamma a learned (dim,) vector initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero the whole of ``x[b]`` for each sample b with probability ``drop_prob``, scaling the
    kept samples by 1 / (1 - drop_prob) so the expectation is unchanged. Identity at eval."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, ..., 1): one draw per sample
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch, per sample; identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, in float32
    (float64 for float64 x) then cast back (as Llama does), no centring and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
