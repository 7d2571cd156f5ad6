"""`vlkit train clip_world` on tiny sizes: retrieval and zero-shot metrics, tokenizer and model saved."""
import json

import pytest

import vlkit
from vlkit.cli import load_recipe, main
from vlkit.config import ConfigError

TINY = ["train.max_steps=6", "train.epochs=0", "train.batch_size=16", "train.warmup_steps=1", "train.eval_every=3",
        "train.checkpoint_every=3", "train.progress=false", "world.train_length=64", "world.val_length=32",
        "world.test_length=32", "world.compositional_length=32", "vision.depth=1", "vision.embed_dim=32",
        "vision.num_heads=2", "text.depth=1", "text.width=32", "text.num_heads=2", "embed_dim=16",
        "text.vocab_size=600", "tokenizer_captions=64", "eval_limit=32"]


@pytest.mark.parametrize("loss", ["infonce", "siglip", "triplet"])
def test_clip_world_trains_and_reports_retrieval(tmp_path, capsys, loss):
    run = tmp_path / "run"
    assert main(["train", "clip_world", *TINY, f"loss={loss}", "--run-dir", str(run)]) == 0
    assert "| compositional |" in capsys.readouterr().out
    doc = json.loads((run / "eval.json").read_text())
    for split in ("val", "test", "compositional"):
        m = doc["eval"][split]
        assert 0 <= m["zero_shot_top1"] <= 100 and 0 <= m["i2t_R@1"] <= m["i2t_R@5"] <= m["i2t_R@10"] <= 100
        assert 1 <= m["t2i_mean_rank"] <= 32
    assert (run / "tokenizer" / "tokenizer.json").exists() and doc["train"]["steps"] == 6
    model = vlkit.load(run)
    assert model.text.cfg.vocab_size <= 600 and model.visual_proj.out_features == 16


def test_clip_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="vision.num_classes"):
        load_recipe("clip_world", ["vision.num_classes=10"])
    with pytest.raises(ConfigError, match="image_size"):
        load_recipe("clip_world", ["vision.image_size=64"])
