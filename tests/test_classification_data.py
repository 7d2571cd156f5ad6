"""Classification data: Fashion-MNIST split, fallback to the world, manifests with bad files."""
import json

import pytest
from PIL import Image

from vlkit.config import ConfigError
from vlkit.eval.classification import predict
from vlkit.tasks.data import DataConfig, build_splits, eval_dataset, train_dataset
from vlkit.data.transforms import TransformConfig
from vlkit.data.world import WorldConfig

SMALL_WORLD = WorldConfig(image_size=32, train_length=40, val_length=10, test_length=10, compositional_length=10)


def test_missing_fashion_mnist_falls_back_to_the_world_or_fails(tmp_path):
    cfg = DataConfig(root=str(tmp_path), world=SMALL_WORLD)
    splits = build_splits(cfg)
    assert splits.source == "world" and len(splits.train) == 40 and "compositional" in splits.extra
    with pytest.raises(FileNotFoundError, match="apt-get"):
        build_splits(DataConfig(root=str(tmp_path), fallback="error"))


def test_fashion_mnist_held_out_validation_is_deterministic_and_disjoint():
    from vlkit.data.datasets import FashionMNIST

    if not FashionMNIST.available():
        pytest.skip("Fashion-MNIST is not installed")
    a, b = build_splits(DataConfig(val_size=100, train_limit=200)), build_splits(DataConfig(val_size=100))
    assert a.val.indices == b.val.indices and len(a.train) == 200
    assert not set(a.val.indices) & set(b.train.indices)


def test_manifest_with_unreadable_images_is_counted_not_fatal(tmp_path):
    rows = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 20), (20 * i, 0, 0)).save(path)
        rows.append({"image": path.name, "label": ["red", "blue"][i % 2]})
    (tmp_path / "3.png").write_bytes(b"")  # empty file
    (tmp_path / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(dataset="manifest", train=str(tmp_path / "m.jsonl"), val_size=4,
                     transform=TransformConfig(image_size=16, crop_padding=2, randaugment_num_ops=0))
    splits = build_splits(cfg)
    assert splits.classes == ["blue", "red"] and len(splits.train) == 8
    ds = train_dataset(splits, cfg)
    samples = [ds[i] for i in range(len(ds))]
    assert all(s is None or s["image"].shape == (3, 16, 16) for s in samples)

    class Const(__import__("torch").nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :2]

    full = eval_dataset(splits.train.base, cfg)
    preds = predict(Const(), full, batch_size=5)
    assert preds.num_skipped == 2 and len(preds.labels) == 10


def test_data_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="train"):
        DataConfig(dataset="manifest")
    with pytest.raises(ConfigError, match="val_size"):
        DataConfig(val_size=-1)


def test_webdataset_shards_are_a_classification_source(tmp_path):
    import io
    import tarfile

    for shard in range(2):
        with tarfile.open(tmp_path / f"train-{shard}.tar", "w") as tar:
            for i in range(6):
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(dataset="webdataset", train=str(tmp_path / "train-{0..1}.tar"), val_size=3,
                     transform=TransformConfig(image_size=16, randaugment_num_ops=0))
    splits = build_splits(cfg)
    assert splits.classes == ["0", "1", "2"] and len(splits.train) == 9 and len(splits.val) == 3
    sample = train_dataset(splits, cfg)[0]
    assert sample["image"].shape == (3, 16, 16) and sample["label"] in (0, 1, 2)
    with pytest.raises(ConfigError, match="train"):
        DataConfig(dataset="webdataset")
