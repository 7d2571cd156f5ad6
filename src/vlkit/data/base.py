"""Sample and batch conventions shared by every dataset, transform and loop.

Data flows one way: dataset -> transform -> collate -> model/objective -> loss dict -> loop.

*Sample*: ``dataset[i]`` returns a dict, or ``None`` when item ``i`` is unusable (corrupt file,
empty caption...): it is skipped and counted, never fatal. Common keys:

- ``"image"``: ``PIL.Image.Image`` in mode RGB before the transform, ``Tensor (C, H, W)`` float after;
- ``"label"``: ``int`` class index;
- ``"caption"``: ``str``; ``"questions"``/``"answers"``: ``list[str]``;
- ``"boxes"``: ``Tensor (N, 4)`` (cx, cy, w, h) normalised to [0, 1]; ``"box_labels"``: ``Tensor (N,)``;
- ``"index"``: ``int`` the dataset index (set by :class:`TransformedDataset`).

*Image transform*: a callable ``t(image: PIL.Image, generator: torch.Generator) -> Tensor``.
All randomness comes from ``generator``, which :class:`TransformedDataset` seeds from
``(seed, epoch, index)``: a sample is the same whatever the worker count, the order it is
drawn in, or a resume in the middle of an epoch.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

ImageTransform = Callable[[Any, torch.Generator], torch.Tensor]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (splitmix-style mixing, no Python hash())."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


class TransformedDataset(Dataset):
    """Applies an image transform with a per-(seed, epoch, index) generator.

    The training loop calls :meth:`set_epoch` at each epoch start (also after a resume).
    Samples for which the base dataset returns ``None`` stay ``None`` (the collate counts them).
    """

    def __init__(self, base: Dataset, transform: Optional[ImageTransform], seed: int = 0):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Optional[dict]:
        sample = self.base[index]
        if sample is None:
            return None
        sample = dict(sample)
        sample["index"] = index
        if self.transform is not None and ("image" in sample or "images" in sample):
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            if "image" in sample:
                sample["image"] = self.transform(sample["image"], g)
            else:  # several images (a document, a multi-image conversation): one generator, in order
                sample["images"] = [self.transform(im, g) for im in sample["images"]]
        return sample

    def __getattr__(self, name: str):  # expose e.g. .classes of the base dataset
        if name in ("base", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.base, name)


class ClassCaptions(Dataset):
    """Captions for a labelled dataset: each sample gains ``"caption"``, a template filled with its
    class name, the template drawn per (seed, epoch, index) like augmentation (LiT-style training
    of an image tower against "a photo of a {class}" texts). ``set_epoch`` passes through."""

    def __init__(self, base: Dataset, names: Sequence[str], templates: Sequence[str], seed: int = 0):
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"each caption template needs a '{{}}' for the class name, got {list(templates)}")
        self.base, self.names, self.templates, self.seed = base, list(names), list(templates), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Optional[dict]:
        sample = self.base[index]
        if sample is None:
            return None
        pick = sample_seed(self.seed + 7919, self.epoch, index) % len(self.templates)
        return {**sample, "caption": self.templates[pick].format(self.names[int(sample["label"])])}


def collate(samples: list[Optional[dict]]) -> dict:
    """Stack a list of samples into a batch; ``None`` samples are dropped and counted.

    Tensors of equal shape are stacked, ints/floats become tensors, anything else
    (strings, variable-size tensors, lists) stays a list. ``batch["num_skipped"]`` is the
    number of dropped samples (an int), which the loop adds up and reports.
    """
    kept = [s for s in samples if s is not None]
    batch: dict[str, Any] = {"num_skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    for key in kept[0]:
        values = [s.get(key) for s in kept]
        first = values[0]
        if isinstance(first, torch.Tensor) and all(
            isinstance(v, torch.Tensor) and v.shape == first.shape for v in values
        ):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch
