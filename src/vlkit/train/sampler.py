"""Deterministic, resumable, sharded sample order (with DeiT's repeated augmentation).

The *global* order of epoch e is a function of (seed, e) only, never of the number of processes.
With global batch B and W ranks, global batch j is ``order[j*B:(j+1)*B]`` and every rank takes its
B / W share of it; a rank's DataLoader (``batch_size = B / W``) therefore yields, batch after batch,
this rank's share of global batch 0, 1, ... So W processes with global batch B consume exactly
the samples one process with batch B consumes, and a resume at step s restarts at global batch
``s mod batches_per_epoch`` of epoch ``s // batches_per_epoch`` (:meth:`ResumableSampler.set_start`).

- :class:`ResumableSampler`: rank r takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` of each
  global batch, so 2 ranks x B/2 see the same micro-batches as 1 rank x B with 2 accumulation steps.
  With ``batch_size=None`` (B = W) this is the familiar ``order[rank::W]`` sharding.
- :class:`LengthGroupedSampler`: global batches of samples of similar length (less padding for
  sequence models), in a random order: still a function of (seed, epoch).
- :class:`RepeatedAugSampler` (Hoffer et al. 2020, "Augment your batch"; DeiT's ``RASampler``): a
  permutation of ceil(n / k) images, each repeated k times in a row, truncated to n per epoch; rank r
  takes elements ``r::W`` of each global batch, so the copies of an image go to different ranks.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from vlkit.data.base import sample_seed

COPY_EPOCH_STRIDE = 1 << 20  # copy c of an image in epoch e is augmented as epoch e + c * stride


class ResumableSampler(Sampler[int]):
    """This rank's dataset indices for epoch ``set_epoch(e)``, from global batch ``set_start(j)`` on.

    ``length``: dataset size; ``batch_size``: the GLOBAL batch B (a multiple of ``num_replicas``;
    default ``num_replicas``). ``drop_last``: a final partial global batch is dropped; otherwise it is
    padded (wrapping around the order) to a multiple of ``num_replicas`` and shared out.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, batch_size: int | None = None):
        self.batch_size = batch_size or num_replicas
        if self.batch_size % num_replicas:
            raise ValueError(f"global batch {self.batch_size} is not divisible by the {num_replicas} processes")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch`` and restart it at global batch 0."""
        self.epoch, self.start = epoch, 0

    def set_start(self, batch_index: int) -> None:
        """Skip the first ``batch_index`` global batches of the epoch (already consumed before a resume)."""
        if not 0 <= batch_index <= self.batches_per_epoch():
            raise ValueError(f"start batch {batch_index} is not in [0, {self.batches_per_epoch()}]")
        self.start = batch_index

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed ^ 0x5EED, self.epoch, 0))

    def global_order(self) -> torch.Tensor:
        """Indices of the whole epoch over all ranks, ``(length,)`` int64: a function of (seed, epoch)."""
        if not self.shuffle:
            return torch.arange(self.length)
        return torch.randperm(self.length, generator=self.generator())

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.length, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def rank_share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of one global batch (its length is a multiple of ``num_replicas``)."""
        local = len(batch) // self.num_replicas
        return batch[self.rank * local:(self.rank + 1) * local]

    def _global_batches(self):
        order = self.global_order()
        for j in range(self.start, self.batches_per_epoch()):
            batch = order[j * self.batch_size:(j + 1) * self.batch_size]
            short = -len(batch) % self.num_replicas
            if short:  # partial last batch (drop_last False): pad by wrapping around the order
                batch = torch.cat([batch, order.repeat(short // len(order) + 1)[:short]])
            yield batch

    def __iter__(self):
        for batch in self._global_batches():
            yield from self.rank_share(batch).tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.length, self.batch_size)
        n = max(0, full - self.start) * (self.batch_size // self.num_replicas)
        if rest and not self.drop_last and self.start <= full:
            n += -(-rest // self.num_replicas)
        return n


class LengthGroupedSampler(ResumableSampler):
    """Length-grouped batching (as transformers' ``group_by_length``): the epoch's random permutation
    is cut into mega-batches of ``group`` global batches, each sorted by ``lengths`` (longest first)
    and cut into global batches, whose order is then shuffled. A batch holds samples of similar
    length, so little of it is padding, while which samples meet still changes every epoch."""

    def __init__(self, lengths, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, batch_size: int | None = None, group: int = 50):
        super().__init__(len(lengths), num_replicas, rank, seed, shuffle, drop_last, batch_size)
        if group < 1:
            raise ValueError(f"group must be >= 1 global batches, got {group}")
        self.lengths, self.group = torch.as_tensor(lengths, dtype=torch.long), group

    def global_order(self) -> torch.Tensor:
        order = super().global_order()
        mega = self.batch_size * self.group
        order = torch.cat([c[torch.sort(self.lengths[c], descending=True, stable=True).indices]
                           for c in order.split(mega)])
        full = len(order) // self.batch_size * self.batch_size
        batches = order[:full].view(-1, self.batch_size)
        g = torch.Generator().manual_seed(sample_seed(self.seed ^ 0x1E96, self.epoch, 0))
        shuffled = batches[torch.randperm(len(batches), generator=g)] if self.shuffle else batches
        return torch.cat([shuffled.flatten(), order[full:]])


class RepeatedAugSampler(ResumableSampler):
    """DeiT repeated augmentation: each image ``repeats`` times per epoch, the copies spread over ranks.

    An epoch still has ``length`` samples (``ceil(length / repeats)`` distinct images). With
    ``encode_copies`` the sampler yields ``copy * length + index`` instead of ``index``: wrap the
    dataset in :class:`RepeatedCopies` so that every copy gets its own augmentation (a
    :class:`vlkit.data.base.TransformedDataset` seeds by (seed, epoch, index) and would otherwise
    give the k copies identical pixels).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, batch_size: int | None = None, repeats: int = 3,
                 encode_copies: bool = False):
        super().__init__(length, num_replicas, rank, seed, shuffle, drop_last, batch_size)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats, self.encode_copies = repeats, encode_copies

    def global_order(self) -> torch.Tensor:
        images = -(-self.length // self.repeats)
        base = super().global_order()[:images]
        order = base.repeat_interleave(self.repeats)[:self.length]
        if self.encode_copies:
            copies = torch.arange(self.repeats).repeat(images)[:self.length]
            order = copies * self.length + order
        return order

    def rank_share(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank::self.num_replicas]


class RepeatedCopies(Dataset):
    """View of ``dataset`` for ``RepeatedAugSampler(encode_copies=True)``: item ``c * n + i`` is item
    ``i`` drawn as epoch ``epoch + c * COPY_EPOCH_STRIDE`` (copy 0 is exactly the plain sample)."""

    def __init__(self, dataset: Dataset, repeats: int):
        self.dataset, self.repeats, self.epoch = dataset, repeats, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, item: int):
        copy, index = divmod(item, len(self.dataset))
        if copy == 0 or not hasattr(self.dataset, "set_epoch"):
            return self.dataset[index]
        self.dataset.set_epoch(self.epoch + copy * COPY_EPOCH_STRIDE)
        try:
            return self.dataset[index]
        finally:
            self.dataset.set_epoch(self.epoch)
