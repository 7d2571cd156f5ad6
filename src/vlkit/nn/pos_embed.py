"""Absolute position embeddings for a 2D patch grid.

- :func:`sincos_2d_pos_embed`: fixed 2D sine-cosine embedding as in MAE (He et al. 2022,
  "Masked Autoencoders Are Scalable Vision Learners"), built from the 1D form of Vaswani et al. 2017 §3.5.
- :func:`resample_pos_embed`: bicubic interpolation of the patch part of a learned embedding to
  another grid, prefix tokens (class/distillation) kept as they are (Dosovitskiy et al. 2021,
  §3.2 "Fine-tuning and higher resolution"; same arithmetic as HF ``interpolate_pos_encoding``).
- :func:`bucket_pos_embed`: NaViT-style fractional positions (Dehghani et al. 2023, used by Idefics2):
  patch (i, j) of any grid takes the learned position of the cell that (i / gh, j / gw) falls in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """positions (M,) -> (M, embed_dim): [sin(p * w_i) | cos(p * w_i)], w_i = temperature^(-2i / embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim {embed_dim} must be even")
    omega = 1.0 / temperature ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    out = positions.double()[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d_pos_embed(embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0,
                        temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos embedding -> (1, num_prefix_tokens + gh * gw, embed_dim), row-major grid.

    The first half of the channels encodes the column (x), the second half the row (y), as in MAE;
    prefix tokens get zeros. ``embed_dim`` must be a multiple of 4.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be a multiple of 4 for a 2D sin-cos embedding")
    gh, gw = grid_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (gh, gw) each
    emb = torch.cat([sincos_1d(embed_dim // 2, xs.flatten(), temperature),
                     sincos_1d(embed_dim // 2, ys.flatten(), temperature)], dim=1)  # (gh * gw, D)
    emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim), emb], dim=0)
    return emb[None]


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, P + gh * gw, D) -> (1, P + new_gh * new_gw, D) by bicubic interpolation of the patch grid.

    The P prefix rows are kept. ``old_grid=None`` assumes a square grid. Returns ``pos_embed``
    itself when the grid does not change.
    """
    old_grid = old_grid or (math.isqrt(pos_embed.shape[1] - num_prefix_tokens),) * 2
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} grid rows, not {old_grid[0]}x{old_grid[1]}")
    D = pos_embed.shape[-1]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D)  # (1, new_gh * new_gw, D)
    return torch.cat([prefix, grid], dim=1)


def _buckets(n: int, cells: int, device) -> torch.Tensor:
    """(n,) cell of each of n evenly spaced coordinates in [0, 1) among ``cells`` equal cells (float32
    arithmetic as transformers' Idefics2 vision embeddings, so the same cells on the boundaries)."""
    step = 1.0 / torch.tensor(n, dtype=torch.float32, device=device)
    coords = (torch.arange(n, dtype=torch.float32, device=device) * step).clamp(max=1.0 - 1e-6)
    return torch.bucketize(coords, torch.arange(1 / cells, 1.0, 1 / cells, device=device), right=True)


def bucket_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                     num_prefix_tokens: int = 0) -> torch.Tensor:
    """(1, P + gh * gw, D) -> (1, P + new_gh * new_gw, D): each new patch takes the learned row of the
    old-grid cell its fractional coordinates fall in (no interpolation: a smaller image reads a subset of
    the rows, spread over the whole grid). The P prefix rows are kept."""
    old_grid = old_grid or (math.isqrt(pos_embed.shape[1] - num_prefix_tokens),) * 2
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    rows = _buckets(new_grid[0], old_grid[0], pos_embed.device)
    cols = _buckets(new_grid[1], old_grid[1], pos_embed.device)
    return torch.cat([prefix, grid[:, (rows[:, None] * old_grid[1] + cols[None, :]).flatten()]], dim=1)
