"""EfficientNet-Lite: parity with the reference package on real ImageNet photos, ImageNet top-1,
feature-map shapes, head reset, gradients, init, config checks and strict conversion errors."""
import copy
import glob
import importlib.util
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vlkit.checkpoints.efficientnet import (
    LITE0_DEPTHS,
    convert_efficientnet_lite_state_dict,
    lite0_weights_path,
    load_efficientnet_lite0,
)
from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict
from vlkit.config import ConfigError
from vlkit.encoders.convnet import (
    EfficientNetLite,
    EfficientNetLiteConfig,
    create_efficientnet_lite,
    efficientnet_lite_config,
    round_channels,
)

log = logging.getLogger(__name__)

TINY_STAGES = ((1, 3, 1, 1, 8), (2, 3, 2, 2, 16), (1, 5, 2, 3, 24))


def _imagenet_photos() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 labelled ImageNet photos -> images (20, 3, 224, 224) in [0, 1], labels (20,)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox (test extra) is not installed: no labelled ImageNet photos")
    files = sorted(glob.glob(spec.submodule_search_locations[0] + "/data/imagenet_*.jpg"))
    assert len(files) == 20, files
    labels = torch.tensor([int(f.rsplit("_", 1)[1].split(".")[0]) for f in files])
    arrays = [np.array(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in files]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return images, labels


@pytest.fixture(scope="module")
def pretrained():
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def imagenet(pretrained):
    """Photos, labels, the reference package's logits and vlkit's logits (both eval, fp32)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    images, labels = _imagenet_photos()
    ref = reference.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_weights_path()).eval()
    with torch.no_grad():
        ref_logits = ref((images * 255.0 - 127.0) / 128.0)  # the reference's own input scale
        our_logits = pretrained(images)  # vlkit normalises inside
    return images, labels, ref_logits, our_logits


def test_logits_match_reference_package(imagenet):
    _, _, ref_logits, our_logits = imagenet
    diff = (ref_logits - our_logits).abs().max().item()
    log.info("EfficientNet-Lite0 max |logit diff| vs reference: %.3g", diff)
    assert our_logits.shape == (20, 1000)
    assert diff <= 1e-4


def test_imagenet_top1_on_real_photos(imagenet):
    _, labels, ref_logits, our_logits = imagenet
    ours, ref = our_logits.argmax(1), ref_logits.argmax(1)
    correct = (ours == labels).sum().item()
    log.info("top-1 on foolbox ImageNet photos: vlkit %d/20, reference %d/20", correct, (ref == labels).sum().item())
    assert torch.equal(ours, ref)
    assert correct >= 16


def test_pretrained_feature_map_is_what_the_head_pools(pretrained, imagenet):
    images, _, _, our_logits = imagenet
    with torch.no_grad():
        fmap = pretrained.forward_features(images[:4])
        logits = pretrained.forward_head(fmap)
    assert fmap.shape == (4, 1280, 7, 7) and fmap.min() >= 0 and fmap.max() <= 6  # after ReLU6
    torch.testing.assert_close(logits, our_logits[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(224, 224), (64, 64), (96, 96), (100, 100), (64, 96)])
def test_feature_map_shapes(size):
    model = create_efficientnet_lite(num_classes=5).eval()
    H, W = size
    with torch.no_grad():
        fmap = model.forward_features(torch.rand(2, 3, H, W))
        assert fmap.shape == (2, model.feature_dim, math.ceil(H / 32), math.ceil(W / 32))
        assert model.forward_head(fmap).shape == (2, 5)
        assert model.forward_head(fmap, pre_logits=True).shape == (2, 1280)
    assert model.reduction == 32 and model.num_features == model.feature_dim == 1280


def test_forward_intermediates_are_stage_outputs():
    model = create_efficientnet_lite().eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.rand(1, 3, 64, 64), indices=[0, -1])
    assert [tuple(f.shape) for f in feats] == [(1, 16, 32, 32), (1, 320, 2, 2)]
    with pytest.raises(IndexError, match="stage index 7"):
        model.forward_intermediates(torch.rand(1, 3, 64, 64), indices=[7])


def test_reset_classifier_keeps_backbone(pretrained):
    model = copy.deepcopy(pretrained)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        fmap = model.forward_features(x)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
        torch.testing.assert_close(model.forward_features(x), fmap, atol=0, rtol=0)
    assert model.cfg.num_classes == 7 and pretrained.cfg.num_classes == 1000  # new config, old one untouched
    assert model.classifier.weight.abs().max() <= 1 / math.sqrt(7) and not model.classifier.bias.any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)


def test_loader_with_other_num_classes_loads_backbone(pretrained):
    model = load_efficientnet_lite0(num_classes=10)
    assert model.classifier.out_features == 10 and not model.training
    ref = pretrained.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(v, ref[k]), k


def test_gradients_reach_every_parameter_and_no_frozen_one():
    model = create_efficientnet_lite(num_classes=3, drop_rate=0.0, drop_connect_rate=0.0).train()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    # 64 px: at 32 px the 1x1 late maps make a bias before train-mode BatchNorm exactly gradient-free
    loss = nn.functional.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks.0."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = EfficientNetLite(EfficientNetLiteConfig(stages=TINY_STAGES, head_chs=32, num_classes=3)).eval()
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.conv_stem.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_init_follows_the_reference_rule():
    torch.manual_seed(0)
    model = create_efficientnet_lite(num_classes=10)
    handled = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            assert isinstance(m, handled), f"{name}: {type(m).__name__} has no init rule"
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            std = m.weight.std().item()
            assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.15, (name, std)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and not m.bias.any() and not m.running_mean.any(), name
    bound = 1 / math.sqrt(10)
    w = model.classifier.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and not model.classifier.bias.any()


def test_no_weight_decay_is_the_batchnorm_parameters():
    model = create_efficientnet_lite(num_classes=4)
    names = model.no_weight_decay()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(names) == 2 * n_bn and {"bn1.weight", "bn2.bias", "blocks.6.0.bn3.weight"} <= names
    assert not names & {"classifier.weight", "conv_stem.weight"}


def test_input_normalisation_is_the_lite_scale():
    model = create_efficientnet_lite().eval()
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model.normalize(x), (x * 255 - 127) / 128, atol=1e-5, rtol=0)


def test_config_checks_and_scaling():
    with pytest.raises(ConfigError, match="drop_rate"):
        EfficientNetLiteConfig(drop_rate=1.0)
    with pytest.raises(ConfigError, match=r"stages\[0\]"):
        EfficientNetLiteConfig(stages=((1, 4, 1, 1, 16),))
    with pytest.raises(ConfigError, match="input_mean"):
        EfficientNetLiteConfig(in_chans=1, input_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="efficientnet_lite9"):
        efficientnet_lite_config("efficientnet_lite9")
    assert [s.repeats for s in efficientnet_lite_config("efficientnet_lite0").scaled_stages()] == list(LITE0_DEPTHS)
    lite4 = efficientnet_lite_config("efficientnet_lite4").scaled_stages()
    assert [s.repeats for s in lite4] == [1, 4, 4, 6, 6, 8, 1]  # first and last stages not scaled
    assert [s.out_chs for s in lite4] == [24, 32, 56, 112, 160, 272, 448]
    assert round_channels(16, 1.1) == 16 and round_channels(40, 1.1) == 48


def test_tiny_config_trains_on_grey_inputs():
    cfg = EfficientNetLiteConfig(stages=TINY_STAGES, head_chs=32, num_classes=2, in_chans=1)
    model = EfficientNetLite(cfg)
    assert model(torch.rand(3, 1, 40, 40)).shape == (3, 2)
    assert model.forward_features(torch.rand(1, 1, 40, 40)).shape == (1, 32, 5, 5)  # stride 8 here


@pytest.fixture(scope="module")
def raw_state_dict():
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def test_conversion_maps_every_key(raw_state_dict):
    sd = convert_efficientnet_lite_state_dict(raw_state_dict)
    assert len(sd) == len(raw_state_dict) == 296
    assert sd["blocks.6.0.conv_pwl.weight"].shape == (320, 1152, 1, 1)
    assert sd["blocks.0.0.conv_dw.weight"] is raw_state_dict["_blocks.0._depthwise_conv.weight"]


def test_conversion_errors_name_the_key(raw_state_dict):
    renamed = dict(raw_state_dict)
    renamed["_conv_head2.weight"] = renamed.pop("_conv_head.weight")
    with pytest.raises(CheckpointError, match=r"'_conv_head2\.weight'"):
        convert_efficientnet_lite_state_dict(renamed)
    se = {**raw_state_dict, "_blocks.3._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"'_blocks\.3\._se_reduce\.weight'"):
        convert_efficientnet_lite_state_dict(se)
    with pytest.raises(CheckpointError, match="block 15"):
        convert_efficientnet_lite_state_dict(raw_state_dict, depths=(1, 2, 2, 3, 3, 4))
    model = create_efficientnet_lite()
    missing = dict(raw_state_dict)
    del missing["_blocks.4._depthwise_conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.2\.1\.conv_dw\.weight'"):
        load_state_dict_strict(model, convert_efficientnet_lite_state_dict(missing))
    bad_shape = {**raw_state_dict, "_fc.bias": torch.zeros(10)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'classifier\.bias'"):
        load_state_dict_strict(model, convert_efficientnet_lite_state_dict(bad_shape))


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
def test_scaled_variants_match_reference_architecture(variant):
    """Lite1-4 (random weights): the reference's state dict converts and loads strictly; Lite2's
    outputs (width 1.1, odd rounding) match (at 96 px, the reference's padding built for that size)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    ref = reference.EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=96).eval()
    model = create_efficientnet_lite(f"efficientnet_lite{variant}").eval()
    depths = [s.repeats for s in model.cfg.scaled_stages()]
    load_state_dict_strict(model, convert_efficientnet_lite_state_dict(ref.state_dict(), depths))
    if variant == 2:
        x = torch.rand(1, 3, 96, 96)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref((x * 255 - 127) / 128), atol=1e-4, rtol=1e-4)


def test_backbone_for_hybrid_vit():
    from vlkit.encoders.vit import VisionTransformer, ViTConfig

    backbone = create_efficientnet_lite(num_classes=0)
    cfg = ViTConfig(image_size=64, embed="hybrid", embed_dim=32, depth=1, num_heads=2, num_classes=3)
    vit = VisionTransformer(cfg, backbone=backbone).eval()
    assert vit.grid_size == (2, 2)
    with torch.no_grad():
        assert vit.forward_features(torch.rand(2, 3, 64, 64)).shape == (2, 1 + 4, 32)
