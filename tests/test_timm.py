"""timm ViT folders: vlkit.load gives timm's outputs on tiny random models that timm itself saved
(``timm.models.save_for_hf``, the layout of the Hub's ``timm/...`` repositories).

timm is the reference, imported through ``_timm_reference`` (scripts/setup.sh installs it --no-deps; a
stand-in answers its torchvision imports while it loads).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlkit
from vlkit.checkpoints.convert import convert
from vlkit.checkpoints.io import CheckpointError
from vlkit.checkpoints.timm_vit import load_timm_vit
from vlkit.tasks.predict import predict_files, preprocessing

from _timm_reference import import_timm


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _save(timm, tmp_path, name: str, model_args: dict | None = None, **kwargs):
    """(timm model in eval mode, the folder timm wrote for it)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # LayerScale, tokens and zero-initialised heads: random values so they count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / name
    timm.models.save_for_hf(model, folder, model_args=model_args, safe_serialization=True,
                            model_config={"label_names": [f"class {i}" for i in range(kwargs.get("num_classes", 0))]})
    return model, folder


CASES = {  # name -> create_model arguments (tiny: depth 2, 32 px or 28 px)
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, num_classes=5),
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, depth=2, num_classes=5),
    # DeiT III: no position rows for the class token; LayerScale
    "deit3_small_patch16_224": dict(img_size=32, patch_size=8, depth=2, num_classes=5),
    # timm's SigLIP 1 tower: exact GELU (its SigLIP 2 towers: tanh); heads other than the base's: in model_args
    "vit_base_patch16_siglip_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=192, num_heads=3, num_classes=5),
    "vit_base_patch16_siglip_256": dict(img_size=32, patch_size=8, depth=2, embed_dim=192, num_heads=3, num_classes=5),
    "vit_base_patch16_clip_quickgelu_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=192, num_heads=3,
                                                num_classes=5),  # pre-norm, no patch bias, QuickGELU, eps 1e-5
    "vit_small_patch14_dinov2": dict(img_size=28, depth=2, num_classes=0),  # LayerScale, patch 14, headless
}


@pytest.mark.parametrize("name", list(CASES))
def test_timm_vits_load_with_timm_outputs(timm, tmp_path, name):
    args = CASES[name]
    reference, folder = _save(timm, tmp_path, name, {"num_heads": args["num_heads"]} if "num_heads" in args else None,
                              **args)
    model = vlkit.load(folder)
    size = CASES[name]["img_size"]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want, got = reference(images), model(images)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4, name
    assert model.cfg.num_heads == reference.blocks[0].attn.num_heads
    assert model.cfg.norm_eps == reference.blocks[0].norm1.eps


def test_architecture_names_missing_from_the_table(timm, tmp_path, caplog):
    """An architecture timm has and vlkit's table lacks: timm's defaults with a warning, model_args first."""
    reference, folder = _save(timm, tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**doc, "architecture": "vit_tiny_patch16_future"}))
    images = torch.randn(1, 3, 32, 32)
    with caplog.at_level("WARNING"), torch.no_grad():
        assert torch.allclose(vlkit.load(folder)(images), reference(images), atol=1e-4)
    assert "assuming 3 heads, gelu and LayerNorm eps 1e-6" in caplog.text
    (folder / "config.json").write_text(json.dumps({**doc, "architecture": "x", "model_args": {"num_heads": 5}}))
    with pytest.raises(CheckpointError, match="width 192 does not split into 5 heads"):
        vlkit.load(folder)


def test_avg_pool_with_norm_after_pooling_and_heads_from_model_args(timm, tmp_path):
    """global_pool='avg' puts timm's LayerNorm after the pooling (fc_norm); a width whose head count is
    not timm's usual one is read from model_args."""
    reference, folder = _save(timm, tmp_path, "vit_tiny_patch16_224", model_args={"num_heads": 2}, img_size=32,
                              patch_size=8, depth=2, embed_dim=256, num_heads=2, num_classes=4, global_pool="avg")
    model = vlkit.load(folder)
    assert model.cfg.fc_norm and model.cfg.global_pool == "avg" and model.cfg.num_heads == 2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), reference(images), atol=1e-4)
        assert torch.allclose(model.forward_features(images), reference.forward_features(images), atol=1e-4)


def test_predict_reads_timm_labels_and_preprocessing(timm, tmp_path):
    _, folder = _save(timm, tmp_path, "vit_tiny_patch16_224", **CASES["vit_tiny_patch16_224"])
    classes, tcfg = preprocessing(folder)
    doc = json.loads((folder / "config.json").read_text())
    assert classes == [f"class {i}" for i in range(5)]
    assert tcfg.image_size == 32 and tcfg.mean == tuple(doc["pretrained_cfg"]["mean"])
    assert tcfg.crop_pct == doc["pretrained_cfg"]["crop_pct"]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    results = predict_files(folder, [tmp_path / "a.png", tmp_path / "missing.png"], top_k=2)
    assert results[0]["top"][0][0].startswith("class ") and "error" in results[1]
    converted = vlkit.load(convert(folder, tmp_path / "converted"))  # a vlkit folder keeping labels and transform
    assert preprocessing(tmp_path / "converted") == (classes, tcfg)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted(images), load_timm_vit(folder)(images))


def test_variants_vlkit_lacks_are_refused(timm, tmp_path):
    _, folder = _save(timm, tmp_path, "vit_small_patch14_reg4_dinov2", img_size=28, depth=1, num_classes=0)
    with pytest.raises(CheckpointError, match="register tokens"):
        vlkit.load(folder)
    _, folder = _save(timm, tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0,
                      qk_norm=True)
    with pytest.raises(CheckpointError, match="not a variant vlkit's ViT has: unexpected key .*[qk]_norm"):
        vlkit.load(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickled"):
        vlkit.load(folder)


def test_a_timm_vit_folder_is_a_vlm_vision_tower(timm, tmp_path):
    from test_vlm_task import SCRATCH, TINY, WORLD

    from vlkit.cli import main

    _, folder = _save(timm, tmp_path, "vit_small_patch14_dinov2", {"num_heads": 2, "patch_size": 8}, img_size=32,
                      patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0)
    run = tmp_path / "run"
    over = [*TINY, *SCRATCH, *WORLD, "vision.kind=run", f"vision.path={folder}", "transform.image_size=32",
            "train.max_steps=2", "tuning.vision=frozen"]
    assert main(["train", "vlm_world_caption", *over, "--run-dir", str(run)]) == 0
    tower = vlkit.load(run).features.encoder
    assert tower.cfg.layer_scale_init is not None and tower.cfg.num_heads == 2
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the run's tower is the timm model's (frozen)
        assert torch.allclose(tower.forward_features(images), load_timm_vit(folder).forward_features(images), atol=1e-5)


def test_timm_vits_computing_otherwise_under_the_same_names_are_refused(timm, tmp_path):
    """Post-norm blocks (ResPostBlock) have a ViT's tensor names; so do pooling choices vlkit lacks."""
    cases = [("vit_base_patch16_rpn_224", None, {}, "computes otherwise"),
             ("vit_tiny_patch16_224", {"pool_include_prefix": True}, {"global_pool": "avg"}, "pool_include_prefix"),
             ("vit_tiny_patch16_224", None, {"global_pool": "max"}, "global_pool 'max'"),
             ("vit_tiny_patch16_224", None, {"global_pool": "map"}, "next to a class token")]
    for name, model_args, kwargs, message in cases:
        _, folder = _save(timm, tmp_path / message[:8], name, model_args, img_size=32, patch_size=8, depth=1,
                          num_classes=2, **kwargs)
        with pytest.raises(CheckpointError, match=message):
            vlkit.load(folder)


def test_squash_preprocessing_resizes_both_sides_to_size_over_crop_pct_then_crops():
    """timm's crop_mode='squash' (e.g. CLIP ViT-B/16 at 384 fine-tuned on ImageNet: crop_pct 0.95)."""
    from vlkit.data.transforms import TransformConfig, build_transform

    from vlkit.checkpoints.timm_vit import timm_preprocessing

    _, fields = timm_preprocessing({"pretrained_cfg": {"input_size": [3, 38, 38], "crop_pct": 0.95, "crop_mode": "squash",
                                                       "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}})
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    got = build_transform(TransformConfig(**fields), train=False)(image, torch.Generator())
    side = int(38 / 0.95)  # 40: both sides, the aspect not kept, then the centre 38 x 38
    want = np.asarray(image.resize((side, side), Image.BICUBIC), dtype=np.float32)[1:39, 1:39] / 255
    torch.testing.assert_close(got, torch.from_numpy((want - 0.5) / 0.5).permute(2, 0, 1), atol=1e-6, rtol=0)
