"""HF ViT/DeiT -> vlkit: parity with transformers on tiny random models saved with save_pretrained."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlkit.checkpoints.hf_vit import convert_hf_vit_state_dict, load_hf_vit, vit_config_from_hf  # noqa: E402
from vlkit.checkpoints.io import CheckpointError  # noqa: E402
from vlkit.config import ConfigError  # noqa: E402

TOL = 1e-4


def hf_config(cls_name: str, **kw):
    config_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=5, attn_implementation="eager")
    return config_cls(**{**base, **kw})


def save_hf(tmp_path, cls_name: str, **kw):
    """A tiny random HF model written with save_pretrained; returns (model in eval mode, folder)."""
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(hf_config(cls_name, **kw)).eval()
    with torch.no_grad():  # HF zero-inits some tokens; randomise everything so parity means something
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def hf_output(model, x, interpolate=False):
    with torch.no_grad():
        out = model(pixel_values=x, interpolate_pos_encoding=interpolate)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel", "DeiTForImageClassification",
                                      "DeiTForImageClassificationWithTeacher"])
def test_parity_with_transformers(tmp_path, cls_name):
    hf, folder = save_hf(tmp_path, cls_name)
    model = load_hf_vit(folder)
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_features(x) if cls_name.endswith("Model") else model(x)
    assert (ours - hf_output(hf, x)).abs().max() <= TOL
    # a second resolution: HF's interpolate_pos_encoding is the same bicubic resampling
    x2 = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ours = model.forward_features(x2) if cls_name.endswith("Model") else model(x2)
    assert (ours - hf_output(hf, x2, interpolate=True)).abs().max() <= TOL


def test_deit_heads_match_in_training_mode(tmp_path):
    hf, folder = save_hf(tmp_path, "DeiTForImageClassificationWithTeacher")
    model = load_hf_vit(folder).train()  # no dropout in this config: train mode returns both heads
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls, dist = model(x)
        out = hf(pixel_values=x)
    assert (cls - out.cls_logits).abs().max() <= TOL
    assert (dist - out.distillation_logits).abs().max() <= TOL


def test_sdpa_hf_model_and_v5_key_names(tmp_path):
    hf, folder = save_hf(tmp_path, "ViTForImageClassification", attn_implementation="sdpa", qkv_bias=False,
                         hidden_act="gelu_pytorch_tanh")
    cfg = vit_config_from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg.act == "gelu_tanh" and not cfg.qkv_bias and cfg.norm_eps == 1e-12
    # transformers 5 in-memory names (layers.N.attention.q_proj ...) convert too
    sd = convert_hf_vit_state_dict(hf.state_dict(), cfg)
    model = load_hf_vit(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - hf_output(hf, x)).abs().max() <= TOL


def test_config_from_hf():
    cfg = vit_config_from_hf(hf_config("DeiTForImageClassificationWithTeacher").to_dict()
                             | {"architectures": ["DeiTForImageClassificationWithTeacher"]})
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (32, 2, 4, 2.0)
    assert cfg.num_dist_tokens == 1 and cfg.dist_head and cfg.num_classes == 5
    assert vit_config_from_hf(hf_config("ViTModel").to_dict()).num_classes == 0
    with pytest.raises(ConfigError) as e:
        vit_config_from_hf({"model_type": "bert"})
    assert e.value.field == "model_type"
    with pytest.raises(ConfigError) as e:
        vit_config_from_hf(hf_config("ViTModel").to_dict() | {"architectures": ["ViTForMaskedImageModeling"]})
    assert e.value.field == "architectures"


def test_strict_loading_names_the_first_mismatch(tmp_path):
    hf, folder = save_hf(tmp_path, "ViTForImageClassification")
    cfg = vit_config_from_hf(json.loads((folder / "config.json").read_text()))
    sd = dict(hf.state_dict())
    with pytest.raises(CheckpointError, match="unexpected key 'vit.embeddings.mask_token'"):
        convert_hf_vit_state_dict({**sd, "vit.embeddings.mask_token": torch.zeros(1, 1, 32)}, cfg)
    with pytest.raises(CheckpointError, match="query/key/value incomplete"):
        convert_hf_vit_state_dict({k: v for k, v in sd.items() if "layers.1.attention.k_proj" not in k}, cfg)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="2 layers, config depth is 3"):
        load_hf_vit(folder)
    (folder / "config.json").write_text(json.dumps(config | {"id2label": {str(i): str(i) for i in range(4)}}))
    with pytest.raises(CheckpointError, match="shape mismatch for 'head.weight'"):
        load_hf_vit(folder)
