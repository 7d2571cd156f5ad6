"""DETR: shapes, position encoding, auxiliary outputs, a tiny overfit whose loss must fall; anchor queries,
denoising groups and the focal loss."""
import pytest
import torch

from vlkit.config import ConfigError
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.losses.set_criterion import HungarianMatcher, SetCriterion
from vlkit.models.detr import DETR, DETRConfig, FeatureMap, postprocess, sine_position_embedding


def tiny_detr(**kw) -> DETR:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=4, num_classes=0, embed_dim=32, depth=1, num_heads=2))
    backbone = FeatureMap(vit)
    cfg = DETRConfig(num_classes=3, num_queries=5, d_model=32, num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=64,
                     dropout=0.0, **kw)
    return DETR(backbone, backbone.dim, cfg)


def test_shapes_and_auxiliary_outputs():
    model = tiny_detr()
    out = model(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 5, 4) and out["boxes"].shape == (2, 5, 4)
    assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all() and len(out["aux_outputs"]) == 1
    res = postprocess(out, torch.tensor([[32, 64], [32, 64]]))
    assert res[0]["boxes"].shape == (5, 4) and res[0]["boxes"][:, [0, 2]].max() <= 64
    probs = out["logits"].softmax(-1)[..., :-1].max(-1).values
    for threshold, min_boxes in ((1.0, 2), (0.0, 2), (float(probs[1].median()), 4), (1.0, 9)):
        for p, res_i in zip(probs, postprocess(out, torch.tensor([[32, 64]] * 2), threshold, min_boxes=min_boxes)):
            want = (p > threshold) | (p >= p.topk(min(min_boxes, 5)).values[-1])  # above, or among the best
            assert res_i["queries"].tolist() == want.nonzero()[:, 0].tolist()
            torch.testing.assert_close(res_i["scores"], p[want])


def test_sine_positions_differ_per_cell_and_ignore_padding():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    pos = sine_position_embedding(mask, 32)
    flat = pos.flatten(2)[0].T  # (24, 32)
    assert pos.shape == (1, 32, 4, 6) and torch.cdist(flat, flat).fill_diagonal_(1).min() > 1e-3
    padded = mask.clone()
    padded[:, :, 4:] = True  # the last two columns are padding: positions normalise over the real ones
    assert torch.allclose(sine_position_embedding(padded, 32)[..., 3], pos[..., 5], atol=1e-5)


def test_tiny_detr_overfits_two_images():
    model = tiny_detr()
    images = torch.randn(2, 3, 32, 32)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    crit = SetCriterion(3, HungarianMatcher())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        loss = crit(model(images), targets)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first


def test_query_cross_attention_is_returned_without_changing_outputs():
    model = tiny_detr().eval()
    images = torch.randn(2, 3, 32, 32)
    plain, seen = model(images), model(images, return_attention=True)
    assert torch.allclose(plain["logits"], seen["logits"], atol=1e-5)  # explicit softmax == the SDPA kernel
    assert seen["grid"] == (8, 8) and len(seen["cross_attention"]) == 2
    attn = seen["cross_attention"][-1]
    assert attn.shape == (2, 5, 64) and torch.allclose(attn.sum(-1), torch.ones(2, 5), atol=1e-5)
    pad = torch.zeros(2, 32, 32, dtype=torch.bool)
    pad[:, :, 16:] = True  # the right half is padding: no query may look there
    attn = model(images, pad_mask=pad, return_attention=True)["cross_attention"][0].reshape(2, 5, 8, 8)
    assert attn[..., 4:].abs().max() == 0 and torch.allclose(attn.sum((-1, -2)), torch.ones(2, 5), atol=1e-5)
    det = postprocess(seen, torch.tensor([[32, 32]] * 2), threshold=0.0)[0]
    assert det["queries"].tolist() == list(range(5))


TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def test_anchor_queries_start_at_their_anchors_and_refine_per_layer():
    model = tiny_detr(queries="anchor").eval()
    out = model(torch.randn(2, 3, 32, 32))
    anchors = model.anchors.weight.sigmoid()
    for layer in [*out["aux_outputs"], out]:  # the box head starts at zero: every layer keeps the anchors
        assert torch.allclose(layer["boxes"], anchors.expand(2, -1, -1), atol=1e-5)
    assert ((anchors[:, :2] > 0.04) & (anchors[:, :2] < 0.96)).all() and "query_embed.weight" not in model.state_dict()
    images = torch.randn(2, 3, 32, 32)
    seen = model(images, return_attention=True)
    assert torch.allclose(seen["boxes"], model(images)["boxes"], atol=1e-5) and len(seen["cross_attention"]) == 2
    with torch.no_grad():
        model.bbox_embed[-1].bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    out = model(torch.randn(2, 3, 32, 32))  # each layer moves its input box by the same logit delta
    first = (torch.logit(anchors, eps=1e-3) + torch.tensor([0.5, 0, 0, 0])).sigmoid()
    assert torch.allclose(out["aux_outputs"][0]["boxes"][0], first, atol=1e-5)
    assert torch.allclose(out["boxes"][0], (torch.logit(first, eps=1e-3) + torch.tensor([0.5, 0, 0, 0])).sigmoid(),
                          atol=1e-5)


def test_denoising_queries_are_invisible_to_matching_queries_and_to_other_groups():
    model = tiny_detr(queries="anchor", dn_groups=3).train()  # dropout 0: train mode is deterministic
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    with_dn = model(images, targets=TARGETS)
    alone = model(images)  # no targets: no denoising queries
    assert "dn_outputs" not in alone and len(with_dn["dn_outputs"]) == 2
    assert torch.allclose(with_dn["logits"], alone["logits"], atol=1e-5)
    assert torch.allclose(with_dn["boxes"], alone["boxes"], atol=1e-5)
    dn = with_dn["dn_targets"]
    assert dn["labels"].shape == (2, 6) and dn["valid"].tolist() == [[True] * 6, [True, False] * 3]
    assert torch.equal(dn["true_boxes"][0, 2:4], TARGETS[0]["boxes"])  # group 2 repeats the ground truth
    # the mask: group g sees itself and the matching queries; matching queries see only themselves
    mask = model._denoising_queries(TARGETS, 2)["mask"]
    assert mask.shape == (2, 11, 11) and mask[:, 6:, :6].all() and not mask[:, :, 6:].any()
    assert not mask[0, 0, 1] and mask[0, 0, 2] and mask[1, 0, 1] and not mask[1, 1, 1]  # padding sees itself
    # a group's outputs (and the matching queries') do not change when another group's content does
    dn = model._denoising_queries(TARGETS, 2)
    changed = {**dn, "content": dn["content"].clone()}
    changed["content"][:, 2:4] += 1.0  # group 1 (P = 2 queries per group)
    outs = []
    for queries in (dn, changed):
        model._denoising_queries = lambda targets, B, q=queries: q  # noqa: E731
        outs.append(model(images, targets=TARGETS))
    del model._denoising_queries
    first, second = (o["dn_outputs"][-1]["logits"] for o in outs)  # (boxes start as the inputs: zero box head)
    assert torch.allclose(first[:, :2], second[:, :2], atol=1e-5) and torch.allclose(first[:, 4:], second[:, 4:],
                                                                                     atol=1e-5)
    assert not torch.allclose(first[:, 2:4], second[:, 2:4])
    assert torch.allclose(outs[0]["logits"], outs[1]["logits"], atol=1e-5)  # the matching queries
    assert "dn_outputs" not in model.eval()(images, targets=TARGETS)  # evaluation never denoises


def test_denoising_losses():
    model = tiny_detr(queries="anchor", dn_groups=2)
    crit = SetCriterion(3, HungarianMatcher())
    losses = crit(model(torch.randn(2, 3, 32, 32), targets=TARGETS), TARGETS)
    assert {"loss_dn_ce", "loss_dn_bbox", "loss_dn_giou", "loss_dn_ce_0"} <= set(losses)
    perfect = {"logits": torch.full((1, 2, 4), -10.0), "boxes": TARGETS[0]["boxes"][None].clone()}
    perfect["logits"][0, [0, 1], [0, 2]] = 10.0
    dn = {"labels": TARGETS[0]["labels"][None], "true_boxes": TARGETS[0]["boxes"][None],
          "valid": torch.ones(1, 2, dtype=torch.bool)}
    assert all(v.item() < 1e-6 for v in crit.denoising(perfect, dn).values())
    losses["loss"].backward()  # the denoising losses reach the label embedding (training: see the focal test)
    assert model.label_embed.weight.grad[:3].abs().sum() > 0


def test_query_options_are_checked():
    with pytest.raises(ConfigError, match="queries=anchor"):
        DETRConfig(dn_groups=2)
    with pytest.raises(ConfigError, match="2 decoder layers"):
        DETRConfig(queries="anchor", dec_layers=1)
    with pytest.raises(ConfigError, match="dn_label_noise"):
        DETRConfig(queries="anchor", dn_groups=1, dn_label_noise=1.5)
    with pytest.raises(ConfigError, match="'learned' or 'anchor'"):
        DETRConfig(queries="boxes")


def test_focal_detr_with_denoising_starts_at_the_prior_and_trains():
    model = tiny_detr(queries="anchor", dn_groups=2, focal=True)
    out = model(torch.randn(2, 3, 32, 32), targets=TARGETS)
    assert out["logits"].shape == (2, 5, 3) and torch.allclose(model.class_embed.bias.sigmoid(), torch.tensor(0.01))
    assert out["logits"].sigmoid().max() < 0.1  # every query starts unsure of every class
    det = postprocess(out, torch.tensor([[32, 32]] * 2), threshold=0.0, focal=True)[0]
    assert torch.allclose(det["scores"], out["logits"][0].sigmoid().max(-1).values)
    crit = SetCriterion(3, HungarianMatcher(2.0, 5.0, 2.0, focal=True), weight_ce=2.0)
    images = torch.randn(2, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = crit(model(images), TARGETS)["loss"].item()  # the set loss of the matching queries alone
    for _ in range(120):
        loss = crit(model(images, targets=TARGETS), TARGETS)["loss"]  # with the noised queries' losses
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert crit(model(images), TARGETS)["loss"].item() < 0.25 * first
