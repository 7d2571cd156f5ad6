"""vlkit CLIP: HF CLIPModel checkpoints give transformers' image and text features; the model's parts."""
import pytest
import torch

import vlkit
from vlkit.encoders.text import BertConfig, BertEncoder, CLIPTextConfig, CLIPTextTransformer
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.losses.contrastive import ClipLoss
from vlkit.models.clip import CLIP

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_folder_gives_transformers_features(tmp_path, act):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, hidden_act=act, eos_token_id=98, bos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=act)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(3.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = vlkit.load(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(3, 90, (2, 10))
    ids[0, 9], ids[1, 5], ids[1, 6:] = 98, 98, 0  # the end-of-text token (id 98)
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=pixels)
        ref_txt = hf.get_text_features(input_ids=ids)
        ref_img = getattr(ref_img, "pooler_output", ref_img)
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
        assert (ours.encode_image(pixels) - ref_img).abs().max() <= 1e-4
        assert (ours.encode_text(ids) - ref_txt).abs().max() <= 1e-4
        out = ours(pixels, ids)
        ref = hf(input_ids=ids, pixel_values=pixels)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    assert (logits - ref.logits_per_image).abs().max() <= 1e-4


def test_any_towers_train_together_and_temperature_is_clamped():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, num_classes=0, embed_dim=32, depth=1, num_heads=2))
    for text in (CLIPTextTransformer(CLIPTextConfig(vocab_size=50, width=32, depth=1, num_heads=2, context_length=8,
                                                    embed_dim=0)),
                 BertEncoder(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=8))):
        model = CLIP(vit, text, embed_dim=16)
        ids = torch.randint(1, 50, (4, 8))
        out = model(torch.randn(4, 3, 16, 16), ids, torch.ones_like(ids))
        loss = ClipLoss()(out["image_embeds"], out["text_embeds"], out["logit_scale"])["loss"]
        loss.backward()
        assert out["image_embeds"].shape == (4, 16) and torch.allclose(out["text_embeds"].norm(dim=-1), torch.ones(4))
        assert all(p.grad is not None for n, p in model.named_parameters() if n != "logit_bias" and p.requires_grad
                   and "pooler" not in n)
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
        with torch.no_grad():
            model.logit_scale.fill_(10.0)
        assert model.scale().item() == pytest.approx(100.0)
        vit.zero_grad()


def test_lit_locking_sends_gradients_exactly_to_the_trainable_parameters():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, num_classes=0, embed_dim=32, depth=3, num_heads=2,
                                      drop_path_rate=0.2))
    text = CLIPTextTransformer(CLIPTextConfig(vocab_size=50, width=32, depth=3, num_heads=2, context_length=8,
                                              embed_dim=0))
    model = CLIP(vit, text, embed_dim=16)
    assert model.lock("visual") == 0
    unlocked = model.lock("text", unlocked_layers=1)
    assert unlocked == sum(p.numel() for p in [*text.blocks[2].parameters(), *text.norm.parameters()])
    model.train()
    assert not vit.training and text.training  # a fully locked tower stays in eval mode
    ids = torch.randint(1, 50, (4, 8))
    out = model(torch.randn(4, 3, 16, 16), ids)
    ClipLoss()(out["image_embeds"], out["text_embeds"], out["logit_scale"])["loss"].backward()
    for name, p in model.named_parameters():  # logit_bias: trainable, used by the SigLIP loss only
        trained = name.startswith(("text.blocks.2.", "text.norm.", "visual_proj.", "text_proj.", "logit_scale"))
        assert (p.grad is not None) == trained, name
        assert p.requires_grad == (trained or name == "logit_bias"), name
    with pytest.raises(ValueError, match="unlocked_layers"):
        model.lock("text", unlocked_layers=4)
    with pytest.raises(ValueError, match="tower"):
        model.lock("audio")


def _tiny_siglip(**vision):
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=12, projection_size=24)
    vision = dict(dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4), **vision)
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def test_hf_siglip_folder_gives_transformers_features_and_logits(tmp_path):
    torch.manual_seed(0)
    hf = transformers.SiglipModel(_tiny_siglip()).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(4.8)  # exp = 121.5: above CLIP's clamp at 100, which SigLIP does not have
        hf.logit_bias.fill_(-10.0)
        for p in hf.parameters():  # HF initialises the attention-pooling probe and biases to trivial values
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = vlkit.load(tmp_path)
    assert ours.visual.cls_token is None and ours.visual.cfg.global_pool == "map"
    pixels, ids = torch.randn(3, 3, 32, 32), torch.randint(2, 100, (2, 12))
    ids[1, 7:] = 1  # padded to the context length, as SigLIP's text is read
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = hf.get_text_features(input_ids=ids).pooler_output
        assert (ours.encode_image(pixels) - ref_img).abs().max() <= 1e-4
        assert (ours.encode_text(ids) - ref_txt).abs().max() <= 1e-4
        out, ref = ours(pixels, ids), hf(input_ids=ids, pixel_values=pixels)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T + out["logit_bias"]
    assert (logits - ref.logits_per_image).abs().max() <= 1e-4


@pytest.mark.parametrize("use_head", [True, False])
def test_hf_siglip_vision_folder_is_an_image_encoder(tmp_path, use_head):
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(_tiny_siglip(vision_use_head=use_head).vision_config).eval()
    if not use_head:  # also a size that is no multiple of the patch (as so400m's 384 px / patch 14): 35 -> 4 x 4
        hf = transformers.SiglipVisionModel(_tiny_siglip(vision_use_head=False, image_size=35).vision_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = vlkit.load(tmp_path)
    pixels = torch.randn(2, 3, hf.config.image_size, hf.config.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
        assert (ours.forward_features(pixels) - ref.last_hidden_state).abs().max() <= 1e-4  # 16 patch tokens, no CLS
        pooled = ours(pixels)
    if use_head:
        assert (pooled - ref.pooler_output).abs().max() <= 1e-4
    else:  # no head: the tokens' mean
        assert torch.allclose(pooled, ref.last_hidden_state.mean(1), atol=1e-5)


def test_attention_pooled_vit_trains_and_checks_its_config():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, num_classes=5, embed_dim=32, depth=1, num_heads=2,
                                      class_token=False, global_pool="map"))
    vit(torch.randn(2, 3, 16, 16)).sum().backward()
    assert vit.attn_pool.probe.grad.abs().sum() > 0 and "attn_pool.probe" in vit.no_weight_decay()
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="visual_proj=False"):
        CLIP(vit, CLIPTextTransformer(CLIPTextConfig(vocab_size=10, width=32, depth=1, num_heads=2, embed_dim=0)),
             embed_dim=16, visual_proj=False)


def test_siglip_configs_missing_default_values_and_siglip_scale_and_locking():
    """Older transformers omitted values equal to the defaults; SigLIP's scale has no clamp at either end;
    LiT-style partial locking keeps SigLIP's pooling head (its projection) trainable."""
    import math

    from vlkit.models.clip import siglip_vision_config

    cfg = siglip_vision_config({"patch_size": 14, "image_size": 224})
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.global_pool) == (768, 12, 12, "map")
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, num_classes=0, embed_dim=32, depth=2, num_heads=2,
                                      class_token=False, global_pool="map"))
    text = CLIPTextTransformer(CLIPTextConfig(vocab_size=10, width=32, depth=1, num_heads=2, embed_dim=0))
    model = CLIP(vit, text, embed_dim=32, visual_proj=False, max_logit_scale=math.inf)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    assert model.scale().item() == pytest.approx(math.exp(-1))
    model.lock("visual", 1)
    assert all(p.requires_grad for p in vit.attn_pool.parameters())
    assert not any(p.requires_grad for p in vit.blocks[0].parameters())
