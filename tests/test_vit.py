"""ViT / DeiT / CaiT / hybrid: registry, shapes, gradients, init, config errors, resolution changes,
intermediates, attention maps, gradient checkpointing, distillation losses, a tiny training run."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigError, from_dict
from vlkit.encoders.vit import VIT_CONFIGS, Block, VisionTransformer, ViTConfig, create_vit
from vlkit.losses.distillation import DistillationLoss
from vlkit.nn.layers import LayerScale
from vlkit.nn.pos_embed import resample_pos_embed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kw) -> ViTConfig:
    base = dict(image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    return ViTConfig(**{**base, **kw})


VARIANTS = {
    "vit": dict(),
    "deit": dict(num_dist_tokens=1),
    "cait": dict(class_attn_depth=2, layer_scale_init=1e-5),
    "vit_avg_sincos": dict(class_token=False, global_pool="avg", pos_embed="sincos"),
}


class TinyConvNet(nn.Module):
    """forward_features(images (B, 3, H, W)) -> (B, 8, H / 4, W / 4)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward_features(self, images):
        return self.conv2(torch.relu(self.conv1(images)))


def images(b=2, size=16):
    return torch.randn(b, 3, size, size)


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_every_registered_model_runs(name):
    model = create_vit(name, image_size=32, num_classes=7).eval()
    with torch.no_grad():
        assert model(images(1, 32)).shape == (1, 7)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes(variant):
    model = VisionTransformer(tiny(**VARIANTS[variant])).eval()
    P = model.num_prefix_tokens
    tokens = model.forward_features(images())
    assert tokens.shape == (2, P + 16, 32)
    assert model.forward_head(tokens).shape == (2, 5)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    assert model(images()).shape == (2, 5)
    no_head = VisionTransformer(tiny(num_classes=0, **VARIANTS[variant])).eval()
    assert no_head(images()).shape == (2, 32)


def test_hybrid_shapes_and_frozen_backbone_gets_no_gradient():
    backbone = TinyConvNet()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = VisionTransformer(tiny(embed="hybrid", image_size=32), backbone=backbone)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"the model re-initialised the backbone's {k}"
    assert model.grid_size == (8, 8) and model.pos_embed.shape == (1, 1 + 64, 32)
    backbone.requires_grad_(False)
    model(images(2, 32)).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert model(images(2, 24)).shape == (2, 5)  # 6x6 feature map, pos embed interpolated
    with pytest.raises(ValueError, match="backbone"):
        VisionTransformer(tiny(embed="hybrid"))
    with pytest.raises(ValueError, match="hybrid"):
        VisionTransformer(tiny(), backbone=TinyConvNet())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_reaches_every_parameter(variant):
    model = VisionTransformer(tiny(**VARIANTS[variant])).train()
    out = model(images())
    sum(o.pow(2).sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def init_violations(model: nn.Module, skip: nn.Module | None = None) -> dict[str, str]:
    """Parameters not at vlkit's deliberate init; every parameter must fall under some rule."""
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    bad = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in skipped:
                continue
            name, p = f"{mname}.{pname}".lstrip("."), p.detach()
            if isinstance(m, nn.LayerNorm):
                ok = torch.all(p == (1.0 if pname == "weight" else 0.0))
            elif pname == "bias":
                ok = torch.all(p == 0)
            elif isinstance(m, nn.Linear) or pname in ("cls_token", "dist_token", "pos_embed"):
                ok = 0.014 < p.std() < 0.026 and p.abs().max() < 0.2  # trunc_normal(std=0.02)
            elif isinstance(m, nn.Conv2d):  # xavier uniform on (out, in * k * k)
                fan_out, fan_in = p.shape[0], p[0].numel()
                ok = abs(p.std() / math.sqrt(2.0 / (fan_in + fan_out)) - 1) < 0.2
            elif isinstance(m, LayerScale):
                ok = torch.all(p == m.init_values)
            else:
                ok = False  # a parameter with no init rule
            if not ok:
                bad[name] = f"std={p.float().std():.4f}"
    return bad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_init_is_deliberate(variant):
    model = VisionTransformer(tiny(embed_dim=64, **VARIANTS[variant]))
    assert init_violations(model) == {}
    model.blocks[0].mlp.fc1.reset_parameters()  # PyTorch's default init: must be caught
    assert set(init_violations(model)) == {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias"}


def test_hybrid_init_is_deliberate():
    backbone = TinyConvNet()
    model = VisionTransformer(tiny(embed="hybrid", image_size=32, embed_dim=64), backbone=backbone)
    assert init_violations(model, skip=backbone) == {}


@pytest.mark.parametrize("changes, field", [
    (dict(image_size=18), "image_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_dist_tokens=2), "num_dist_tokens"),
    (dict(class_token=False), "global_pool"),
    (dict(class_attn_depth=1, num_dist_tokens=1), "class_attn_depth"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(layer_scale_init=0.0), "layer_scale_init"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(embed_dim=30, num_heads=2, pos_embed="sincos"), "embed_dim"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        tiny(**changes)
    assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        from_dict(ViTConfig, {**dict(image_size=16, patch_size=4, embed_dim=32, num_heads=4), **changes})
    assert e.value.field == field


def test_hybrid_config_skips_patch_divisibility():
    assert tiny(embed="hybrid", image_size=18).image_size == 18


def test_deit_train_and_eval_outputs():
    model = VisionTransformer(tiny(num_dist_tokens=1))
    x = images()
    logits_cls, logits_dist = model.train()(x)
    assert logits_cls.shape == logits_dist.shape == (2, 5)
    assert not torch.allclose(logits_cls, logits_dist)
    torch.testing.assert_close(model.eval()(x), (logits_cls + logits_dist) / 2)
    model.train().set_distilled_training(False)
    torch.testing.assert_close(model(x), (logits_cls + logits_dist) / 2)
    cls_only = VisionTransformer(tiny(num_dist_tokens=1, dist_head=False)).train()
    assert cls_only.head_dist is None and cls_only(x).shape == (2, 5)


def test_other_resolution_interpolates_pos_embed():
    model = VisionTransformer(tiny()).eval()
    P = model.num_prefix_tokens
    assert resample_pos_embed(model.pos_embed, (4, 4), model.grid_size, P) is model.pos_embed
    big = VisionTransformer(tiny(image_size=24)).eval()
    state = dict(model.state_dict(), pos_embed=resample_pos_embed(model.pos_embed, (6, 6), (4, 4), P))
    big.load_state_dict(state)
    x = images(2, 24)
    torch.testing.assert_close(model(x), big(x))
    assert model.forward_features(torch.randn(1, 3, 24, 12)).shape == (1, 1 + 18, 32)


def test_sincos_pos_embed_is_a_fixed_buffer():
    model = VisionTransformer(tiny(pos_embed="sincos"))
    assert "pos_embed" not in model.state_dict() and "pos_embed" not in dict(model.named_parameters())
    assert model.pos_embed.shape == (1, 1 + 16, 32) and torch.all(model.pos_embed[0, 0] == 0)
    assert model.no_weight_decay() == {"cls_token"}
    assert VisionTransformer(tiny(num_dist_tokens=1)).no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}


def test_forward_intermediates():
    model = VisionTransformer(tiny(depth=3)).eval()
    x = images()
    last = model.forward_intermediates(x, indices=1, norm=True)
    assert len(last) == 1
    torch.testing.assert_close(last[0], model.forward_features(x))
    outs = model.forward_intermediates(x, indices=[0, -1])
    assert len(outs) == 2 and all(o.shape == (2, 17, 32) for o in outs)
    torch.testing.assert_close(model.norm(outs[1]), last[0])
    assert len(model.forward_intermediates(x, indices=3)) == 3
    with pytest.raises(IndexError):
        model.forward_intermediates(x, indices=[3])


@pytest.mark.parametrize("variant, layers", [("vit", 2), ("deit", 2), ("cait", 2)])
def test_attention_maps(variant, layers):
    model = VisionTransformer(tiny(**VARIANTS[variant])).eval()
    with torch.no_grad():
        maps = model.attention_maps(images())
    assert maps["attn"].shape == (2, layers, 4, 16) and maps["grid"] == (4, 4)
    assert len(maps["layers"]) == layers
    assert torch.all(maps["attn"] >= 0) and torch.all(maps["attn"].sum(-1) <= 1 + 1e-5)
    if variant == "vit":  # the class token's full row sums to 1: patches + its own column
        own = 1 - maps["attn"].sum(-1)
        assert torch.all(own > 0)


def test_grad_checkpointing_gives_same_grads():
    cfg = tiny(drop_path_rate=0.2, num_dist_tokens=1)
    x = images(4)

    def grads(enable):
        torch.manual_seed(0)
        model = VisionTransformer(cfg).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        a, b = model(x)
        (a.pow(2).sum() + b.sum()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_block_class_attention_updates_only_the_class_token():
    from vlkit.nn.attention import ClassAttention

    blk = Block(32, 4, attn_layer=ClassAttention, init_values=1e-5).eval()
    cls, patches = torch.randn(2, 1, 32), torch.randn(2, 9, 32)
    out = blk(cls, context=torch.cat([cls, patches], 1))
    assert out.shape == (2, 1, 32)
    torch.testing.assert_close(out, cls, atol=1e-3, rtol=0)  # LayerScale 1e-5: close to identity


# ---- distillation losses (DeiT eqs. 2 and 3) ----

class LinearTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.drop(x.flatten(1)))


def test_hard_distillation_is_ce_on_teacher_argmax():
    teacher = LinearTeacher()
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard", alpha=0.5).train()
    x, y = images(), torch.tensor([1, 3])
    cls, dist = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    out = crit(x, (cls, dist), y)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    target = teacher(x).argmax(-1)
    torch.testing.assert_close(out["loss_dist"], F.cross_entropy(dist, target))
    torch.testing.assert_close(out["loss_cls"], F.cross_entropy(cls, y))
    torch.testing.assert_close(out["loss"], 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, target))
    out["loss"].backward()
    assert cls.grad is not None and dist.grad is not None and teacher.fc.weight.grad is None


def test_soft_distillation():
    teacher = LinearTeacher().eval()
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="soft", alpha=0.3, tau=2.0)
    x, y = images(), torch.tensor([0, 4])
    t = teacher(x).detach()
    same = crit(x, (torch.randn(2, 5), t.clone()), y)
    torch.testing.assert_close(same["loss_dist"], torch.tensor(0.0), atol=1e-6, rtol=0)
    dist = torch.randn(2, 5)
    out = crit(x, (torch.randn(2, 5), dist), y)
    p_t, log_p_s = F.softmax(t / 2, -1), F.log_softmax(dist / 2, -1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4  # tau^2 KL(teacher || student)
    torch.testing.assert_close(out["loss_dist"], expected)
    # a plain student (one head) uses its logits for both terms
    single = crit(x, dist, y)
    torch.testing.assert_close(single["loss_dist"], expected)


def test_distillation_without_teacher_and_errors():
    crit = DistillationLoss(nn.CrossEntropyLoss())
    logits, y = torch.randn(2, 5), torch.tensor([0, 1])
    out = crit(images(), logits, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y))
    assert out["loss_dist"] == 0
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), kind="soft")
    with pytest.raises(ValueError, match="kind"):
        DistillationLoss(nn.CrossEntropyLoss(), LinearTeacher(), kind="medium")


def test_deit_trains_with_hard_distillation():
    """A tiny DeiT fits 8 images whose labels the teacher also predicts: the loss must fall."""
    teacher = LinearTeacher()
    x = images(8)
    y = teacher.eval()(x).argmax(-1)
    model = VisionTransformer(tiny(num_dist_tokens=1, depth=1)).train()
    crit = DistillationLoss(nn.CrossEntropyLoss(), teacher, kind="hard")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = crit(x, model(x), y)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (first, loss.item())


def test_conv_stem_vit_trains_saves_and_reloads(tmp_path):
    """A ViT on Xiao et al.'s convolutional stem (28 px -> 7x7 tokens) round-trips through vlkit.load,
    BatchNorm statistics included."""
    import vlkit
    from vlkit.checkpoints.hub import save_model
    from vlkit.config import ConfigError, from_dict
    from vlkit.models.classifier import ClassifierConfig, build_classifier

    cfg = from_dict(ClassifierConfig, {"num_classes": 10, "backbone": "conv_stem", "stem_channels": [8, 16],
                                       "vit": {"image_size": 28, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                               "num_heads": 2}})
    torch.manual_seed(0)
    model = build_classifier(cfg)
    assert model.grid_size == (7, 7) and model.cfg.embed == "hybrid"
    images = torch.randn(8, 3, 28, 28)
    model(images).logsumexp(-1).mean().backward()  # training mode: BatchNorm statistics move
    assert model.patch_embed.backbone.stem[0].weight.grad.abs().sum() > 0
    save_model(model.eval(), tmp_path / "m", "classifier", cfg)
    assert torch.equal(vlkit.load(tmp_path / "m")(images), model(images))
    with pytest.raises(ConfigError, match="backbone"):
        from_dict(ClassifierConfig, {"backbone": "resnet"})
