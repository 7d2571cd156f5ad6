"""`vlkit train clip_world` on tiny sizes: retrieval and zero-shot metrics, tokenizer and model saved."""
import json
from pathlib import Path

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
    assert main(["eval", str(run)]) == 0  # the saved model and tokenizer score what the end of training scored
    assert json.loads((run / "eval-cli.json").read_text())["eval"] == doc["eval"]
    assert main(["eval", str(run), "eval_limit=16"]) == 0 and "| compositional |" in capsys.readouterr().out
    assert all(m["t2i_mean_rank"] <= 16 for m in json.loads((run / "eval-cli.json").read_text())["eval"].values())


def test_clip_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="vision.num_classes"):
        load_recipe("clip_world", ["vision.num_classes=10"])
    with pytest.raises(ConfigError, match="image_size"):
        load_recipe("clip_world", ["vision.image_size=64"])


LIT_TINY = ["train.max_steps=4", "train.epochs=0", "train.batch_size=16", "train.warmup_steps=1",
            "train.eval_every=2", "train.checkpoint_every=2", "train.progress=false", "classes.dataset=world",
            "classes.world.image_size=28", "classes.world.train_length=96", "classes.world.val_length=32",
            "classes.world.test_length=32", "classes.world.compositional_length=32", "classes.val_size=16",
            "class_names=[]", "vision.depth=1", "vision.embed_dim=32", "vision.num_heads=2", "embed_dim=16"]


def test_lit_locked_pretrained_text_tower_stays_unchanged(tmp_path):
    import torch

    from vlkit.encoders.text import load_hf_bert
    from vlkit.tasks.contrastive import pretrained_text_folder

    run = tmp_path / "lit"
    assert main(["train", "lit_fmnist", *LIT_TINY, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert set(doc["eval"]) == {"val", "test", "compositional"}
    assert all(0 <= m["zero_shot_top1"] <= 100 and "i2t_R@1" not in m for m in doc["eval"].values())
    model = vlkit.load(run)
    reference = load_hf_bert(pretrained_text_folder("minilm")).state_dict()
    trained = model.text.state_dict()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)  # locked: bit-identical
    meta = json.loads((run / "tokenizer" / "vlkit_tokenizer.json").read_text())
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (101, 102, 0)  # MiniLM's [CLS] [SEP] [PAD]


def test_text_feature_cache_matches_the_tower_and_encodes_each_caption_once():
    import torch

    from vlkit.data.tokenizers import TextTokenizer
    from vlkit.encoders.text import BertConfig, BertEncoder
    from vlkit.encoders.vit import ViTConfig, VisionTransformer
    from vlkit.models.clip import CLIP
    from vlkit.tasks.contrastive import TextFeatureCache, pretrained_text_folder

    tok = TextTokenizer.from_file(pretrained_text_folder("minilm"), bos="[CLS]", eos="[SEP]", pad="[PAD]")
    torch.manual_seed(0)
    text = BertEncoder(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    model = CLIP(VisionTransformer(ViTConfig(image_size=8, patch_size=4, num_classes=0, embed_dim=16, depth=1,
                                             num_heads=2)), text, 8)
    model.lock("text")
    cache = TextFeatureCache(tok, 16)
    calls = []
    model.text.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    captions = ["a photo of a cat.", "a dog.", "a photo of a cat."]
    feats = cache(model, captions)
    again = cache(model, captions[::-1])
    assert calls == [2]  # two distinct captions, encoded once
    ids = tok(captions, 16)
    assert torch.allclose(feats, model.text_features(ids["input_ids"], ids["attention_mask"]), atol=1e-6)
    assert torch.equal(again, feats.flip(0))


def test_class_captions_are_seeded_per_epoch():
    from vlkit.data.base import ClassCaptions

    base = [{"label": i % 3} for i in range(40)]
    ds = ClassCaptions(base, ["cat", "dog", "bird"], ["a {}", "the {}", "one {}"], seed=1)
    first = [ds[i]["caption"] for i in range(40)]
    assert first == [ds[i]["caption"] for i in range(40)]
    assert all(c.split()[1] == ["cat", "dog", "bird"][i % 3] for i, c in enumerate(first))
    ds.set_epoch(1)
    assert first != [ds[i]["caption"] for i in range(40)]
    with pytest.raises(ValueError, match="template"):
        ClassCaptions(base, ["cat"], ["no slot"])


def test_fixed_temperature_stays_fixed(tmp_path):
    import math

    run = tmp_path / "fixed"
    assert main(["train", "clip_world", *TINY, "init_temperature=0.3", "learn_temperature=false",
                 "--run-dir", str(run)]) == 0
    assert vlkit.load(run).logit_scale.item() == pytest.approx(math.log(1 / 0.3), abs=1e-6)
    learned = tmp_path / "learned"
    assert main(["train", "clip_world", *TINY, "init_temperature=0.3", "--run-dir", str(learned)]) == 0
    assert vlkit.load(learned).logit_scale.item() != pytest.approx(math.log(1 / 0.3), abs=1e-6)


@pytest.mark.parametrize("fmt", ["manifest", "webdataset"])
def test_clip_trains_on_your_own_image_caption_pairs(tmp_path, capsys, fmt):
    """data=pairs: a JSONL manifest or webdataset shards of image + caption (one broken image, counted):
    BPE on the captions, Recall@K on the held-out and test splits, a model vlkit search can use."""
    import io
    import tarfile

    from vlkit.data.world import WorldConfig, WorldDataset

    world = WorldDataset(WorldConfig(image_size=32), "train", length=48, task="retrieval")
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(48):
        path = tmp_path / "img" / f"{i:03d}.png"
        world[i]["image"].save(path)
        rows.append({"image": f"img/{i:03d}.png", "caption": world[i]["caption"]})
    (tmp_path / "img" / "000.png").write_bytes(b"broken")
    if fmt == "manifest":
        for name, part in (("train", rows[:40]), ("test", rows[40:])):
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        paths = [f"pairs.train={tmp_path / 'train.jsonl'}", f"pairs.test={tmp_path / 'test.jsonl'}"]
    else:
        for name, part in (("train", rows[:40]), ("test", rows[40:])):
            with tarfile.open(tmp_path / f"{name}.tar", "w") as tar:
                for r in part:
                    for ext, data in (("png", (tmp_path / r["image"]).read_bytes()), ("txt", r["caption"].encode())):
                        info = tarfile.TarInfo(f"{Path(r['image']).stem}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        paths = [f"pairs.train={tmp_path / 'train.tar'}", f"pairs.test={tmp_path / 'test.tar'}"]
    pairs = ["data=pairs", f"pairs.dataset={fmt}", *paths, "pairs.val_size=8", "pairs.transform.image_size=32",
             "pairs.transform.crop_pct=1.0", "pairs.transform.rrc_scale=[1.0,1.0]", "pairs.transform.hflip=0.0",
             "pairs.transform.randaugment_num_ops=0", "pairs.transform.mean=[0.5,0.5,0.5]",
             "pairs.transform.std=[0.25,0.25,0.25]"]
    run = tmp_path / "run"
    assert main(["train", "clip_world", *TINY, *pairs, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert set(doc["eval"]) == {"val", "test"}
    for split, n in (("val", 8), ("test", 8)):
        m = doc["eval"][split]
        assert "zero_shot_top1" not in m and 0 <= m["i2t_R@1"] <= m["i2t_R@5"] <= 100 and m["t2i_mean_rank"] <= n
    assert doc["train"]["skipped_samples"] == 3  # the broken image, once per epoch (seeded split: in train)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    write = tmp_path / "query"
    write.mkdir()
    world[1]["image"].save(write / "a.png")
    assert main(["search", "index", str(run / "model"), str(write)]) == 0
    with pytest.raises(ConfigError, match="pairs.dataset"):
        load_recipe("clip_world", ["data=pairs"])
