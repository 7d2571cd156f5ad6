"""Deterministic, resumable, sharded batch order (with DeiT's repeated augmentation).

The global order of epoch e is a permutation seeded by (seed, e), independent of the number of
processes; global batch j is ``order[j*B:(j+1)*B]`` and rank r of W takes its r-th slice of
B / W samples. So W processes with global batch B see exactly the samples one process with
batch B sees, and a resume at step s restarts at global batch s mod steps_per_epoch.
"""
from __future__ import annotations

import torch

from vlkit.data.base import sample_seed


def epoch_order(length: int, seed: int, epoch: int, repeats: int = 1) -> torch.Tensor:
    """Indices of one epoch (``length`` of them). ``repeats`` > 1: DeiT repeated augmentation, a
    permutation of ceil(length / repeats) images, each repeated ``repeats`` times in a row (each
    copy gets its own augmentation because its position, hence its seed, differs)."""
    g = torch.Generator().manual_seed(sample_seed(seed ^ 0x5EED, epoch, 0))
    if repeats == 1:
        return torch.randperm(length, generator=g)
    base = torch.randperm(length, generator=g)[: -(-length // repeats)]
    return base.repeat_interleave(repeats)[:length]


class RankBatchSampler:
    """This rank's index lists for global batches ``start, start+1, ...`` of one epoch.

    Yields lists of B / W dataset indices (drop_last: a partial global batch is never used)."""

    def __init__(self, length: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, repeats: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by the {world_size} processes")
        self.order = epoch_order(length, seed, epoch, repeats)
        self.batch_size, self.start, self.rank, self.world = batch_size, start, rank, world_size

    def __len__(self) -> int:
        return max(0, len(self.order) // self.batch_size - self.start)

    def __iter__(self):
        local = self.batch_size // self.world
        for j in range(self.start, len(self.order) // self.batch_size):
            batch = self.order[j * self.batch_size:(j + 1) * self.batch_size]
            yield batch[self.rank * local:(self.rank + 1) * local].tolist()
