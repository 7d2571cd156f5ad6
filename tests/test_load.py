"""vlkit.load: vlkit model folders, run folders and HF ViT/DeiT folders; classifier builds."""
import json

import pytest
import torch

import vlkit
from vlkit.checkpoints.hub import save_model
from vlkit.checkpoints.io import CheckpointError
from vlkit.config import ConfigError
from vlkit.encoders.vit import vit_config
from vlkit.models.classifier import ClassifierConfig, InputAdapter, build_classifier

transformers = pytest.importorskip("transformers")


def tiny_cfg(**kw) -> ClassifierConfig:
    vit = vit_config("vit_tiny", image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_dist_tokens=1)
    return ClassifierConfig(num_classes=5, vit=vit, **kw)


def test_vlkit_round_trip_through_run_folder(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(tiny_cfg()).eval()
    save_model(model, tmp_path / "run" / "model", "classifier", tiny_cfg(), meta={"classes": list("abcde")})
    x = torch.randn(3, 3, 16, 16)
    for path in (tmp_path / "run", tmp_path / "run" / "model"):
        loaded = vlkit.load(path)
        assert not loaded.training
        assert torch.equal(loaded(x), model(x))
    doc = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert doc["format"] == "vlkit" and doc["meta"]["classes"] == list("abcde")


def test_load_names_first_mismatch(tmp_path):
    save_model(build_classifier(tiny_cfg()), tmp_path, "classifier", tiny_cfg())
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["config"]["vit"]["embed_dim"] = 64
    doc["config"]["vit"]["num_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape"):
        vlkit.load(tmp_path)


def test_load_rejects_unknown_layouts(tmp_path):
    with pytest.raises(FileNotFoundError):
        vlkit.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a model folder"):
        vlkit.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(CheckpointError, match="wav2vec2"):
        vlkit.load(tmp_path)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_load_hf_folder_gives_hf_logits(tmp_path, cls_name):
    config_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(config_cls(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=5)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    model = vlkit.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max() <= 1e-4


def test_hybrid_vit_on_convnet_tokens_trains_end_to_end():
    cfg = tiny_cfg(backbone="efficientnet_lite0", pretrained=False, convnet_size=64)
    assert cfg.vit.embed == "hybrid"
    model = build_classifier(cfg)
    assert isinstance(model.patch_embed.backbone, InputAdapter)
    assert model.grid_size == (2, 2)  # 64 px / 32
    out = model(torch.randn(2, 3, 16, 16))
    loss = sum(o.sum() for o in out)  # DeiT in training mode: (class head, distillation head)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_input_adapter_undoes_the_pipeline_normalisation():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean((2, 3))

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    unit = torch.rand(1, 3, 8, 8)
    normalised = (unit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    InputAdapter(Probe(), mean, std, size=0)(normalised)
    assert torch.allclose(seen["x"], unit, atol=1e-6)
    InputAdapter(Probe(), mean, std, size=32)(normalised)
    assert seen["x"].shape[-2:] == (32, 32)


def test_classifier_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="backbone"):
        ClassifierConfig(arch="efficientnet_lite0", backbone="efficientnet_lite0")
    with pytest.raises(ConfigError, match="num_classes"):
        ClassifierConfig(num_classes=0)


def test_convert_writes_vlkit_folders_that_load_without_the_converter(tmp_path, capsys):
    """HF Llama (bfloat16 storage), SigLIP (unclamped scale) and ViT folders -> vlkit folders with the same
    outputs; a vlkit folder and a model without a self-contained description are refused."""
    from vlkit.cli import main

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama", safe_serialization=True)
    siglip = transformers.SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=8),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                           num_attention_heads=4))
    hf = transformers.SiglipModel(siglip)
    with torch.no_grad():
        hf.logit_scale.fill_(4.8)
    hf.save_pretrained(tmp_path / "siglip", safe_serialization=True)
    vit = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=48, num_labels=3)
    transformers.ViTForImageClassification(vit).save_pretrained(tmp_path / "vit", safe_serialization=True)
    ids, pixels = torch.randint(0, 50, (2, 8)), torch.randn(2, 3, 16, 16)
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "llama_vk"), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("siglip", "vit"):
        assert main(["convert", str(tmp_path / name), str(tmp_path / f"{name}_vk")]) == 0
    with torch.no_grad():
        a, b = vlkit.load(tmp_path / "llama"), vlkit.load(tmp_path / "llama_vk")
        ref = a.to(torch.bfloat16).float()(ids)  # the same weights rounded to bfloat16
        assert torch.allclose(b(ids), ref, atol=1e-5)
        a, b = vlkit.load(tmp_path / "siglip"), vlkit.load(tmp_path / "siglip_vk")
        assert torch.equal(a.encode_image(pixels), b.encode_image(pixels))
        assert torch.equal(a.encode_text(ids), b.encode_text(ids)) and b.scale() > 100
        assert torch.equal(vlkit.load(tmp_path / "vit")(pixels), vlkit.load(tmp_path / "vit_vk")(pixels))
    assert json.loads((tmp_path / "siglip_vk" / "config.json").read_text())["architecture"] == "clip_towers"
    assert main(["convert", str(tmp_path / "vit_vk"), str(tmp_path / "again")]) == 2
    assert "vlkit folder already" in capsys.readouterr().err
    from vlkit.checkpoints.convert import describe_model

    with pytest.raises(CheckpointError, match="not offered"):
        describe_model(torch.nn.Linear(2, 2))
