"""DETR: shapes, position encoding, auxiliary outputs, a tiny overfit whose loss must fall."""
import torch

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
