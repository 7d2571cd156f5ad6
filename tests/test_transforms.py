"""Transforms (determinism per generator, variety across seeds, shapes/ranges), RandAugment
ops, the config builder, and Mixup / CutMix / soft-target cross-entropy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.config import ConfigError, from_dict
from vlkit.data.mixup import Mixup, MixupConfig, SoftTargetCrossEntropy, build_mixup, one_hot_smooth
from vlkit.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandAugment,
    RandomCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
    TransformConfig,
    build_transform,
)


def _photo(width=37, height=23, seed=0):
    """A structured RGB image (gradients + noise) so every op has something to change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _as_array(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


RANDOM_TRANSFORMS = {
    "rrc": lambda: RandomResizedCrop(16),
    "flip": lambda: RandomHorizontalFlip(0.5),
    "crop": lambda: RandomCrop(20, padding=4, padding_mode="reflect"),
    "randaugment": lambda: RandAugment(2, 9, magnitude_std=0.5, prob=0.8),
    "erasing": lambda: Compose([ToTensor(), RandomErasing(1.0)]),
    "train": lambda: build_transform(TransformConfig(image_size=16, random_erasing=0.5), train=True),
}


@pytest.mark.parametrize("name", RANDOM_TRANSFORMS)
def test_random_transforms_are_deterministic_and_vary(name):
    t = RANDOM_TRANSFORMS[name]()
    image = _photo()
    first = _as_array(t(image, _gen(7)))
    assert np.array_equal(first, _as_array(t(image, _gen(7))))
    outputs = {_as_array(t(image, _gen(seed))).tobytes() for seed in range(12)}
    assert len(outputs) > 1
    assert np.array_equal(np.asarray(image), np.asarray(_photo()))  # input untouched


def test_resize_and_center_crop_shapes():
    image = _photo(40, 20)
    assert Resize(10)(image, _gen(0)).size == (20, 10)  # shorter side
    assert Resize((12, 30))(image, _gen(0)).size == (30, 12)  # (H, W)
    assert CenterCrop(10)(image, _gen(0)).size == (10, 10)
    padded = np.asarray(CenterCrop((30, 8))(image, _gen(0)))
    assert padded.shape == (30, 8, 3) and (padded[:5] == 0).all()  # taller than image: black pad


def test_random_resized_crop_box_respects_scale_and_ratio():
    rrc = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    g = _gen(0)
    for _ in range(200):
        left, top, w, h = rrc.box(100, 60, g)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 60
        assert 0.2 <= w * h / 6000 <= 0.55 and 0.45 <= w / h <= 2.2
    assert rrc(_photo(), g).size == (8, 8)


def test_random_crop_padding_and_flip():
    plain = Image.new("RGB", (10, 10), (50, 60, 70))
    crops = [np.asarray(RandomCrop(10, padding=3)(plain, _gen(s))) for s in range(20)]
    assert all(c.shape == (10, 10, 3) for c in crops)
    assert any((c == 0).all(axis=-1).any() for c in crops)  # some crops show the zero padding
    image = _photo(10, 10)
    flips = [RandomHorizontalFlip(0.5)(image, _gen(s)) for s in range(20)]
    mirrored = [np.array_equal(np.asarray(f), np.asarray(image)[:, ::-1]) for f in flips]
    assert 0 < sum(mirrored) < 20
    assert RandomHorizontalFlip(0.0)(image, _gen(0)) is image


def test_to_tensor_and_normalize():
    x = ToTensor()(_photo(5, 3), _gen(0))
    assert x.shape == (3, 3, 5) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert ToTensor()(Image.new("L", (4, 2), 255), _gen(0)).shape == (1, 2, 4)
    y = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x, _gen(0))
    assert torch.allclose(y, (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="channels"):
        Normalize((0.5,), (0.5,))(x, _gen(0))


def test_random_erasing_box():
    x = torch.ones(3, 20, 30)
    out = RandomErasing(1.0, value=0.0)(x, _gen(3))
    erased = (out == 0).all(0)
    rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0 < erased.sum() == box and x.eq(1).all()  # one rectangle; input not modified
    assert RandomErasing(0.0)(x, _gen(0)) is x


@pytest.mark.parametrize("size", [(1, 1), (3, 17), (31, 8)])
@pytest.mark.parametrize("magnitude", [0, 10])
def test_every_randaugment_op_runs(size, magnitude):
    ra = RandAugment()
    for mode in ("RGB", "L"):
        image = _photo(*size).convert(mode)
        for name in ra.ops:
            for negate in (False, True):
                out = ra.apply_op(image, name, magnitude, negate)
                assert out.mode == mode and out.size == image.size, name


def test_randaugment_magnitude_zero_is_identity_for_graded_ops():
    ra, image = RandAugment(), _photo()
    graded = set(ra.ops) - {"AutoContrast", "Equalize"}
    for name in graded:
        assert np.array_equal(np.asarray(ra.apply_op(image, name, 0)), np.asarray(image)), name
    for name in graded - {"Identity"}:  # and magnitude 10 changes the image
        assert not np.array_equal(np.asarray(ra.apply_op(image, name, 10)), np.asarray(image)), name


def test_randaugment_rejects_unknown_ops():
    with pytest.raises(ValueError, match="Blur"):
        RandAugment(ops=["Rotate", "Blur"])


def test_build_transform_shapes_and_config_errors():
    image = _photo(50, 30)
    cfg = from_dict(TransformConfig, {"image_size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    for train in (True, False):
        x = build_transform(cfg, train)(image, _gen(0))
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    small = TransformConfig(image_size=32, crop_padding=4, randaugment_num_ops=0, hflip=0.0)
    evaluated = build_transform(small, False)(Image.new("RGB", (28, 28), (9, 9, 9)), _gen(0))
    assert evaluated.shape == (3, 32, 32)
    for bad, field in [({"std": [0.1, 0.2]}, "std"), ({"hflip": 1.5}, "hflip"),
                       ({"rrc_scale": [0.5, 0.1]}, "rrc_scale"), ({"randaugment_magnitude": 11}, "randaugment_magnitude")]:
        with pytest.raises(ConfigError) as info:
            from_dict(TransformConfig, bad)
        assert info.value.field == field


# ----------------------------------------------------------------------------- Mixup / CutMix


def _batch(b=6, k=5, h=12, w=10):
    g = _gen(123)
    return {"image": torch.rand(b, 3, h, w, generator=g), "label": torch.arange(b) % k, "num_skipped": 0}


def test_one_hot_smooth():
    t = one_hot_smooth(torch.tensor([0, 3]), 4, smoothing=0.2)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.allclose(t[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_targets_sum_to_one_and_are_deterministic(mixup_alpha, cutmix_alpha):
    mix = Mixup(5, mixup_alpha, cutmix_alpha, label_smoothing=0.1)
    batch = _batch()
    out = mix(batch, _gen(0))
    assert out["image"].shape == batch["image"].shape and out["target"].shape == (6, 5)
    assert torch.allclose(out["target"].sum(1), torch.ones(6)) and out["num_skipped"] == 0
    again = mix(batch, _gen(0))
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["target"], again["target"])
    lams = {round(mix(batch, _gen(s))["mix_lam"], 6) for s in range(8)}
    assert len(lams) > 1


def test_mixup_is_a_convex_combination():
    batch = _batch()
    out = Mixup(5, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0)(batch, _gen(1))
    lam = out["mix_lam"]
    assert torch.allclose(out["image"], lam * batch["image"] + (1 - lam) * batch["image"].flip(0))


def test_cutmix_weights_match_pixel_fractions():
    batch = _batch(b=4, k=4)
    mix = Mixup(4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    for seed in range(10):
        out = mix(batch, _gen(seed))
        kept = (out["image"] == batch["image"]).all(1).float().mean((1, 2))  # (B,) fraction own pixels
        assert torch.allclose(kept, torch.full((4,), out["mix_lam"]), atol=1e-6)
        labels = batch["label"]
        own = out["target"][torch.arange(4), labels]
        assert torch.allclose(own, kept, atol=1e-6)  # target weight of own class == pixel fraction


def test_mixup_prob_zero_gives_smoothed_one_hot():
    batch = _batch()
    out = Mixup(5, prob=0.0, label_smoothing=0.1)(batch, _gen(0))
    assert torch.equal(out["image"], batch["image"]) and out["mix_lam"] == 1.0
    assert torch.allclose(out["target"], one_hot_smooth(batch["label"], 5, 0.1))


def test_soft_target_ce_equals_cross_entropy_on_hard_targets():
    logits, labels = torch.randn(7, 5, generator=_gen(0)), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    soft = SoftTargetCrossEntropy()(logits, one_hot_smooth(labels, 5))
    assert torch.allclose(soft, F.cross_entropy(logits, labels))
    smooth = SoftTargetCrossEntropy()(logits, one_hot_smooth(labels, 5, 0.1))
    assert torch.allclose(smooth, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_mixup_config():
    assert build_mixup(MixupConfig(), 10) is None
    assert isinstance(build_mixup(MixupConfig(mixup_alpha=0.8), 10), Mixup)
    with pytest.raises(ConfigError) as info:
        from_dict(MixupConfig, {"switch_prob": 2.0})
    assert info.value.field == "switch_prob"
