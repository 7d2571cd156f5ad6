"""FashionMNIST (real files), ImageFolder and manifests, with bad items skipped and counted."""
import gzip
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlkit.data.base import TransformedDataset, collate
from vlkit.data.datasets import (
    FashionMNIST,
    ImageFolder,
    ManifestDataset,
    ManifestError,
    read_idx,
)
from vlkit.data.transforms import Compose, Resize, ToTensor


def _image(path, colour, size=(9, 7)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _loader(dataset, batch_size=2):
    transform = Compose([Resize((8, 8)), ToTensor()])
    return DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, collate_fn=collate)


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_test():
    if not FashionMNIST.available():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return FashionMNIST(split="test")


def test_fashion_mnist_test_split(fmnist_test):
    ds = fmnist_test
    assert len(ds) == 10_000 and ds.images.shape == (10_000, 28, 28) and ds.images.dtype == np.uint8
    assert ds.targets.min() == 0 and ds.targets.max() == 9
    assert np.bincount(ds.targets).tolist() == [1000] * 10
    sample = ds[0]
    assert sample["image"].mode == "RGB" and sample["image"].size == (28, 28)
    assert sample["label"] == 9 and ds.classes[9] == "Ankle boot"  # first test item is a boot
    assert np.array_equal(np.asarray(sample["image"])[..., 0], ds.images[0])


def test_fashion_mnist_train_split():
    if not FashionMNIST.available():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    ds = FashionMNIST(split="train")
    assert len(ds) == 60_000 and len(ds.classes) == 10
    assert set(np.unique(ds.targets).tolist()) == set(range(10))


def test_fashion_mnist_missing_and_corrupt(tmp_path):
    assert not FashionMNIST.available(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path)
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tmp_path, split="val")
    bad = tmp_path / "labels.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") * 3 + bytes(5))
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad, ndim=1)
    with pytest.raises(ValueError, match="needs 24 bytes, file has 21"):
        read_idx(bad, ndim=3)
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    assert read_idx(bad, ndim=1).tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_counts_bad_images_through_loader(tmp_path, caplog):
    _image(tmp_path / "dog" / "a.png", (200, 0, 0))
    _image(tmp_path / "cat" / "sub" / "b.JPG", (0, 200, 0))
    _image(tmp_path / "cat" / "c.png", (0, 0, 200))
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored: wrong extension")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    assert [label for _, label in ds.samples] == [0, 0, 0, 1]
    with caplog.at_level(logging.DEBUG, logger="vlkit.data.datasets"):
        batches = list(_loader(ds)) + list(_loader(ds))
    assert sum(b["num_skipped"] for b in batches) == 2
    assert sum(len(b.get("label", [])) for b in batches) == 6
    assert batches[0]["image"].shape[1:] == (3, 8, 8)
    assert len([r for r in caplog.records if "broken.png" in r.getMessage()]) == 1  # logged once


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no files"):
        ImageFolder(tmp_path)


# ----------------------------------------------------------------------------- manifests


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")
    return path


def test_jsonl_manifest_names_relative_and_absolute_paths(tmp_path):
    _image(tmp_path / "img" / "a.png", (255, 0, 0))
    absolute = _image(tmp_path / "elsewhere" / "b.png", (0, 255, 0))
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [
        {"image": "img/a.png", "label": "zebra", "caption": "a red square"},
        {"image": str(absolute), "label": "ant", "caption": "a green square"},
        {"image": "img/a.png", "label": "zebra", "caption": "   "},  # blank caption: skipped
        "",  # blank lines are ignored
        {"image": "img/bad.png", "label": "ant", "caption": "corrupt file"},
        {"image": "img/missing.png", "label": "ant", "caption": "missing file", "extra": 1},
    ]
    ds = ManifestDataset(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert len(ds) == 5 and ds.classes == ["ant", "zebra"] and ds.num_empty_captions == 1
    assert ds[0]["label"] == 1 and ds[0]["caption"] == "a red square"
    assert ds[1]["label"] == 0 and np.asarray(ds[1]["image"])[0, 0].tolist() == [0, 255, 0]
    assert ds[2] is None and ds[3] is None and ds[4] is None
    batches = list(_loader(ds, batch_size=3))
    assert [b["num_skipped"] for b in batches] == [1, 2]
    assert batches[0]["caption"] == ["a red square", "a green square"]
    assert torch.equal(batches[0]["label"], torch.tensor([1, 0]))


def test_csv_manifest_with_index_labels(tmp_path):
    _image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "m.csv").write_text('image,label,caption\na.png,2,"one, with comma"\na.png,0,two\n')
    ds = ManifestDataset(tmp_path / "m.csv")
    assert ds.classes == ["0", "1", "2"]
    assert ds[0] == {"image": ds[0]["image"], "label": 2, "caption": "one, with comma"}
    assert ds[1]["label"] == 0


@pytest.mark.parametrize(
    "rows, line, message",
    [
        ([{"image": "a.png", "label": 1}, {"label": 2}], 2, "'image'"),
        ([{"image": "a.png", "label": 1}, "{not json"], 2, "invalid JSON"),
        ([{"image": "a.png", "label": 1}, "[1, 2]"], 2, "JSON object"),
        ([{"image": "a.png"}, {"image": "a.png"}, {"image": "a.png", "label": 0}], 3, "fields"),
        ([{"image": "a.png", "label": -1}], 1, ">= 0"),
        ([{"image": "a.png", "label": 1.5}], 1, "'label'"),
        ([{"image": "a.png", "label": "cat"}, {"image": "b.png", "label": 3}], 2, "mix"),
        ([{"image": "a.png", "caption": 7}], 1, "'caption'"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, rows, line, message):
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError, match=message) as info:
        ManifestDataset(path)
    assert info.value.line == line and f"line {line}:" in str(info.value)


def test_csv_manifest_error_names_the_line(tmp_path):
    (tmp_path / "m.csv").write_text("image,label\na.png,cat\nb.png,\n")
    with pytest.raises(ManifestError, match="line 3: 'label'"):
        ManifestDataset(tmp_path / "m.csv")


def _write_shard(path, samples):
    """A webdataset tar: samples = [(key, {ext: bytes})], members in key order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(colour) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards_read_at_random_with_labels_captions_and_bad_samples(tmp_path):
    import pickle

    from vlkit.data.datasets import WebDatasetShards, shard_paths

    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "train-000.tar", [
        ("a/s0", {"png": _png((255, 0, 0)), "cls": b"cat", "txt": b"a red cat"}),
        ("a/s1", {"jpg": b"not an image", "cls": b"dog", "txt": b"a broken dog"}),
        ("a/s2", {"cls": b"dog", "txt": b"no image here"}),  # incomplete: left out, counted
        ("a/s3", {"png": _png((9, 9, 9)), "cls": b"dog", "txt": b"\xff\xfe not utf-8"}),  # bad caption: left out
        ("a/s4", {"png": _png((9, 9, 9)), "json": b"[1, 2]"})])  # a json that is not an object: left out
    _write_shard(tmp_path / "shards" / "train-001.tar", [
        ("b/s0", {"png": _png((0, 0, 255)), "json": json.dumps({"label": "dog", "caption": "a blue dog"}).encode()}),
        ("b/s1", {"png": _png((0, 255, 0)), "cls": b"cat", "txt": b"  "})])  # empty caption: skipped
    spec = str(tmp_path / "shards" / "train-{000..001}.tar")
    assert shard_paths(spec) == shard_paths(tmp_path / "shards") == shard_paths(str(tmp_path / "shards" / "*.tar"))
    ds = WebDatasetShards(spec)
    assert len(ds) == 4 and ds.num_incomplete == 1 and ds.num_bad == 2 and ds.classes == ["cat", "dog"]
    first = ds[0]
    assert first["image"].size == (12, 10) and first["image"].getpixel((0, 0)) == (255, 0, 0)
    assert (first["label"], first["caption"]) == (0, "a red cat")
    assert ds[1] is None and ds[3] is None  # corrupt image, blank caption
    ds = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a copy without open files
    assert ds[2]["caption"] == "a blue dog" and ds[2]["label"] == 1 and ds[2]["image"].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(FileNotFoundError):
        shard_paths(str(tmp_path / "shards" / "train-{000..002}.tar"))
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="decompress"):
        shard_paths(tmp_path / "x.tar.gz")
    _write_shard(tmp_path / "odd.tar", [("k0", {"png": _png((1, 1, 1)), "txt": b"x"}), ("k1", {"png": _png((1, 1, 1))})])
    with pytest.raises(ValueError, match="same"):
        WebDatasetShards(tmp_path / "odd.tar")
