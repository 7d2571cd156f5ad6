"""A static key/value cache for causal decoding: preallocated (layers, B, H_kv, max_len, D) tensors
written in place, so a decoding step costs no allocation and shapes stay fixed (CUDA graphs /
torch.compile friendly). ``key_mask`` marks real (non-padding) key positions for left-padded batches.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` positions.

    A forward of T new tokens calls :meth:`update` once per layer (writing positions
    ``length .. length+T-1`` and returning all keys/values so far), then :meth:`advance` (T)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.padded = False  # some position so far is padding (known without reading key_mask back)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H_kv, T, D) of the new tokens -> all keys and values (B, H_kv, length + T, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-shape update: k, v (B, H_kv, 1, D) written at cache index ``slot`` ((1,) long tensor, so
        the position is data, not a Python int a compiled graph would specialise on) -> the whole
        cache of this layer (B, H_kv, max_len, D); unwritten positions are masked by ``key_mask``."""
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]

    def add_keys(self, mask: torch.Tensor, all_real: bool = False) -> torch.Tensor:
        """Record which of the next T positions are real tokens (mask (B, T) bool; ``all_real``: the
        caller knows it is all True); returns the key mask over every position so far (B, length + T)."""
        end = self.length + mask.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.key_mask[:, self.length:end] = mask
        self.padded = self.padded or not (all_real or bool(mask.all()))
        return self.key_mask[:, :end]

    def reset(self) -> None:
        """Empty again, keeping the same tensors (a cache reused across calls of a compiled step)."""
        self.k.zero_()
        self.v.zero_()
        self.key_mask.zero_()
        self.length, self.padded = 0, False

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search: each beam continues from its parent's cache)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.key_mask = self.key_mask.index_select(0, index)


class SharedPrefix:
    """The keys and values of a prefix that every row of a batch shares, computed once for one row
    ((layers, 1, H_kv, P, D) tensors; a frozen language model's system prompt and chat header): the
    :class:`KVCache` interface for a training forward of the rest of the sequence. Concatenated, not
    written in place, so gradients flow through the new positions; never extended (``advance`` keeps
    it at the prefix), so one object serves any number of forwards."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.length = k.shape[3]
        self.padded = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H_kv, T, D) of the new tokens -> the prefix's and theirs (B, H_kv, P + T, D)."""
        B = k.shape[0]
        return (torch.cat([self.k[layer].to(k.dtype).expand(B, -1, -1, -1), k], 2),
                torch.cat([self.v[layer].to(v.dtype).expand(B, -1, -1, -1), v], 2))

    def add_keys(self, mask: torch.Tensor, all_real: bool = False) -> torch.Tensor:
        """The prefix is all real tokens; ``mask`` (B, T) marks the new ones -> (B, P + T)."""
        self.padded = self.padded or not (all_real or bool(mask.all()))
        return torch.cat([mask.new_ones(mask.shape[0], self.length), mask], 1)

    def advance(self, n: int) -> None:
        """A training forward does not extend the shared prefix."""
