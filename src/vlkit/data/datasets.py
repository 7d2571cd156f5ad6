"""Real-image datasets: Fashion-MNIST (offline, from the Debian package), ImageFolder trees,
JSONL/CSV manifests and webdataset-layout tar shards.

Every dataset returns sample dicts (see ``vlkit.data.base``) with ``"image"`` a PIL RGB image.
An unusable item (corrupt / missing image, empty caption) makes ``dataset[i]`` return ``None``;
it is logged once at debug level and counted by ``collate`` as ``batch["num_skipped"]``.

Fashion-MNIST: Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms" (idx format of LeCun et al.'s MNIST).
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlkit.data.images import BadImageError, load_image

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes with ``ndim`` dimensions.

    Header: 2 zero bytes, type code 0x08 (uint8), ``ndim``, then ``ndim`` big-endian uint32
    sizes (16 bytes of header for images, 8 for labels). Magic and sizes are validated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = 0x0800 | ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise ValueError(f"{path}: bad idx magic number {found!r}, expected {magic:#010x} (uint8, {ndim}-d)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: idx header truncated ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path}: idx shape {shape} needs {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey images of 10 clothing classes.

    Sample: ``{"image": PIL RGB 28x28 (grey replicated to 3 channels), "label": int in 0..9}``.
    ``images``: ``np.ndarray (N, 28, 28) uint8`` and ``targets``: ``np.ndarray (N,) int64``
    stay in memory for fast paths (e.g. whole-dataset tensors).
    """

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "train"):
        if split not in self.files:
            raise ValueError(f"split must be one of {list(self.files)}, got {split!r}")
        self.root, self.split = Path(root), split
        if not self.available(root):
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {self.root} (need {', '.join(sum(self.files.values(), ()))}); "
                "install it with `apt-get install dataset-fashion-mnist`")
        image_file, label_file = self.files[split]
        self.images = read_idx(self.root / image_file, ndim=3)
        self.targets = read_idx(self.root / label_file, ndim=1).astype(np.int64)
        if self.images.shape[1:] != (28, 28) or len(self.images) != len(self.targets):
            raise ValueError(f"{self.root}: images {self.images.shape} do not match labels {self.targets.shape}")
        if self.targets.size and not 0 <= self.targets.min() <= self.targets.max() < len(self.classes):
            raise ValueError(f"{self.root / label_file}: labels outside 0..{len(self.classes) - 1}")

    @staticmethod
    def available(root: str | Path = FASHION_MNIST_ROOT) -> bool:
        """Whether all four idx files are present under ``root``."""
        return all((Path(root) / name).is_file() for pair in FashionMNIST.files.values() for name in pair)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return {"image": image, "label": int(self.targets[index])}


# ----------------------------------------------------------------------------- files on disk


class _ImageFileDataset(Dataset):
    """Shared by datasets whose images are files: load, or ``None`` (logged once) if unusable."""

    def __init__(self) -> None:
        self._reported: set[int] = set()

    def _skip(self, index: int, reason: str) -> None:
        if index not in self._reported:  # per process: each DataLoader worker logs its own
            self._reported.add(index)
            log.debug("skipping %s item %d: %s", type(self).__name__, index, reason)

    def _load(self, index: int, path: Path | str, read: Optional[Callable[[], bytes]] = None
              ) -> Optional[Image.Image]:
        """The image at ``path`` (or the bytes ``read()`` returns, ``path`` naming them), ``None`` if unusable."""
        try:
            return load_image(path, data=None if read is None else read())
        except BadImageError as e:
            self._skip(index, str(e))
            return None

    def _record_sample(self, index: int, record: dict, path: Path | str,
                       read: Optional[Callable[[], bytes]] = None) -> Optional[dict]:
        """A record with an optional ``label`` / ``caption`` as a sample: ``None`` for a blank caption
        (the image not even read) or an unusable image."""
        if "caption" in record and not record["caption"].strip():
            self._skip(index, "empty caption")
            return None
        image = self._load(index, path, read)
        if image is None:
            return None
        return {"image": image, **{k: record[k] for k in ("label", "caption") if k in record}}


class ImageFolder(_ImageFileDataset):
    """A ``root/<class name>/**/<image>`` tree; classes are the sorted subfolder names.

    ``classes``: ``list[str]``; ``class_to_idx``: ``dict[str, int]``; ``samples``:
    ``list[(Path, int)]`` sorted by path, files filtered by ``extensions`` (case-insensitive).
    Sample: ``{"image": PIL RGB, "label": int}``, or ``None`` for an unreadable image.
    """

    def __init__(self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(f"ImageFolder root {self.root} has no class subfolders")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples = [
            (path, self.class_to_idx[name])
            for name in self.classes
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in exts and path.is_file()
        ]
        if not self.samples:
            raise ValueError(f"ImageFolder root {self.root}: no files with extensions {exts}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[dict]:
        path, label = self.samples[index]
        image = self._load(index, path)
        return None if image is None else {"image": image, "label": label}


# ----------------------------------------------------------------------------- manifests


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and the (1-based) line."""

    def __init__(self, path: str | Path, line: int, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path} line {line}: {message}")


def _read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL or CSV (with header) manifest."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for record in reader:
                yield reader.line_num, {k: v for k, v in record.items() if k is not None}
        return
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ManifestError(path, number, f"invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ManifestError(path, number, f"expected a JSON object, got {type(record).__name__}")
            yield number, record


def _parse_label(raw: Any, from_csv: bool) -> int | str:
    """An int class index or a class name; CSV cells of digits are indices."""
    if from_csv and isinstance(raw, str) and raw.strip().isdigit():
        return int(raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or raw == "":
        raise ValueError(f"'label' must be an int >= 0 or a class name, got {raw!r}")
    if isinstance(raw, int) and raw < 0:
        raise ValueError(f"'label' must be >= 0, got {raw}")
    return raw


def index_labels(records: list[dict], path: str | Path) -> tuple[list[str], dict[str, int]]:
    """Classes and name -> index of ``records`` (dicts with an optional ``"label"``, int or class name,
    and ``"line"`` naming the record in errors); converts name labels to indices in place."""
    labelled = [r for r in records if "label" in r]
    if not labelled:
        return [], {}
    names = [r for r in labelled if isinstance(r["label"], str)]
    if names and len(names) != len(labelled):
        odd = next(r for r in labelled if not isinstance(r["label"], str))
        raise ManifestError(path, odd["line"], "labels mix class indices and class names")
    if not names:
        classes = [str(i) for i in range(max(r["label"] for r in labelled) + 1)]
        return classes, {name: i for i, name in enumerate(classes)}
    classes = sorted({r["label"] for r in labelled})
    class_to_idx = {name: i for i, name in enumerate(classes)}
    for r in labelled:
        r["label"] = class_to_idx[r["label"]]
    return classes, class_to_idx


class ManifestDataset(_ImageFileDataset):
    """Image (+ label, + caption) dataset read from a JSONL or CSV manifest.

    Each line (JSONL object, or CSV row under a header) has ``"image"``: a path, absolute or
    relative to the manifest's folder, and optionally ``"label"`` (int index or class name) and
    ``"caption"`` (str); other keys are ignored. Every line must carry the same optional keys,
    and labels must be all indices or all names. All lines are checked on construction and the
    first problem raises :class:`ManifestError` naming the line.

    ``classes``: sorted class names when labels are names, ``["0", ..., str(max)]`` when they
    are indices, ``[]`` without labels. Sample: ``{"image": PIL RGB, "label"?: int,
    "caption"?: str}``; ``None`` when the image is unusable or the caption is empty/blank.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} not found")
        self.records: list[dict] = []
        self._keys: Optional[frozenset] = None
        for number, record in _read_records(self.path):
            self.records.append(self._check(number, record))
        if not self.records:
            raise ManifestError(self.path, 0, "manifest has no entries")
        self.classes, self.class_to_idx = index_labels(self.records, self.path)
        self.num_empty_captions = sum(1 for r in self.records if "caption" in r and not r["caption"].strip())
        if self.num_empty_captions:
            log.info("%s: %d entries with empty captions will be skipped", self.path, self.num_empty_captions)

    def _check(self, number: int, record: dict) -> dict:
        """Validate one line -> ``{"image": Path, "line": int, "label"?: int | str, "caption"?: str}``."""
        image = record.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ManifestError(self.path, number, f"'image' must be a non-empty path string, got {image!r}")
        keys = frozenset(k for k in ("label", "caption") if k in record)
        if self._keys is not None and keys != self._keys:
            raise ManifestError(self.path, number, f"has fields {sorted(keys)}, earlier lines {sorted(self._keys)}")
        self._keys = keys
        entry: dict[str, Any] = {"image": self.path.parent / image, "line": number}  # absolute wins
        if "caption" in record:
            if not isinstance(record["caption"], str):
                raise ManifestError(self.path, number, f"'caption' must be a string, got {record['caption']!r}")
            entry["caption"] = record["caption"]
        if "label" in record:
            try:
                entry["label"] = _parse_label(record["label"], self.path.suffix.lower() == ".csv")
            except ValueError as e:
                raise ManifestError(self.path, number, str(e)) from None
        return entry

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Optional[dict]:
        record = self.records[index]
        return self._record_sample(index, record, record["image"])


# ----------------------------------------------------------------------------- webdataset shards

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "gif", "tif", "tiff")


def shard_paths(spec: str | Path) -> list[Path]:
    """The tar shards ``spec`` names: one ``.tar``, a folder (its ``*.tar``), a glob (``train-*.tar``) or
    webdataset's brace range (``train-{000..009}.tar``), in sorted order."""
    spec = str(spec)
    brace = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if brace:
        lo, hi, width = int(brace.group(1)), int(brace.group(2)), len(brace.group(1))
        paths = [Path(spec[:brace.start()] + f"{i:0{width}d}" + spec[brace.end():]) for i in range(lo, hi + 1)]
    elif any(c in spec for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(spec))]
    elif Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = [Path(spec)]
    if not paths:
        raise FileNotFoundError(f"no tar shards match {spec}")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} not found")
        if p.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            raise ValueError(f"{p}: compressed shards cannot be read at random; decompress them to .tar")
    return paths


def _member_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return tar.extractfile(member).read().decode("utf-8").strip()


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, rec: dict, shard: int) -> None:
    """Fill the sample ``rec`` from one member: the image's place, or its label / caption."""
    if ext in SHARD_IMAGE_EXTS:
        rec["image"] = (shard, member.offset_data, member.size, member.name)
    elif ext == "cls":
        rec["label"] = _parse_label(_member_text(tar, member), from_csv=True)
    elif ext == "txt":
        rec["caption"] = _member_text(tar, member)
    elif ext == "json":
        doc = json.loads(tar.extractfile(member).read())
        if isinstance(doc.get("caption"), str):
            rec.setdefault("caption", doc["caption"])
        if "label" in doc:
            rec.setdefault("label", _parse_label(doc["label"], from_csv=False))


class WebDatasetShards(_ImageFileDataset):
    """Samples of webdataset-layout tar shards (:func:`shard_paths`), read at random (map-style: any
    sampler, shuffling, distributed sharding and exact resume work as for files).

    A sample is the files of one key (the member name up to the first dot of its base name):
    an image (``.jpg``, ``.png``, ...), optionally ``.cls`` (class index, or class name), ``.txt``
    (caption) and ``.json`` (its ``"label"`` and ``"caption"`` fill what the others did not). The
    shards' headers are scanned once at construction (captions and labels read then; images stay in
    the shards, read by offset). Keys without an image (``num_incomplete``) or with an unreadable label,
    caption or json (``num_bad``) are counted and left out;
    every kept sample must carry the same optional fields. Samples as :class:`ManifestDataset`'s:
    ``{"image", "label"?, "caption"?}``, ``None`` for an unusable image or an empty caption."""

    def __init__(self, spec: str | Path):
        super().__init__()
        self.spec, self.shards = str(spec), shard_paths(spec)
        self.records: list[dict] = []
        self.num_incomplete = self.num_bad = 0
        for i, shard in enumerate(self.shards):
            self._scan(i, shard)
        if not self.records:
            raise ValueError(f"{self.spec}: no samples with an image in {len(self.shards)} shard(s)")
        fields = lambda r: sorted(k for k in ("label", "caption") if k in r)  # noqa: E731
        odd = next((r for r in self.records if fields(r) != fields(self.records[0])), None)
        if odd is not None:
            raise ValueError(f"{self.spec}: sample {odd['line']} has fields {fields(odd)}, sample "
                             f"{self.records[0]['line']} {fields(self.records[0])}: every sample needs the same")
        self.classes, self.class_to_idx = index_labels(self.records, self.spec)
        if self.num_incomplete or self.num_bad:
            log.warning("%s: left out %d keys without an image and %d with an unreadable label / caption / json",
                        self.spec, self.num_incomplete, self.num_bad)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _scan(self, index: int, shard: Path) -> None:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition(".")
                    rec = samples.setdefault(os.path.join(folder, stem), {"line": f"{shard.name}:{folder}/{stem}"})
                    try:
                        _read_member(tar, member, ext.lower(), rec, index)
                    except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as e:
                        rec["bad"] = f"{member.name}: {type(e).__name__}: {e}"
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"shard {shard}: {type(e).__name__}: {e}") from e
        for rec in samples.values():
            if "bad" in rec:
                self.num_bad += 1
                log.debug("leaving out %s", rec["bad"])
            elif "image" in rec:
                self.records.append(rec)
            else:
                self.num_incomplete += 1

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: its own file handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = open(self.shards[shard], "rb")
        f = self._handles[shard]
        f.seek(offset)
        return f.read(size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Optional[dict]:
        record = self.records[index]
        shard, offset, size, name = record["image"]
        return self._record_sample(index, record, f"{self.shards[shard]}:{name}",
                                   lambda: self._read(shard, offset, size))
