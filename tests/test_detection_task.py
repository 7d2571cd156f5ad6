"""`vlkit train detr_world` on tiny sizes: COCO AP through pycocotools, model saved and loaded."""
import json

import pytest
import torch

import vlkit
from vlkit.cli import load_recipe, main
from vlkit.checkpoints.io import load_state_dict_strict
from vlkit.config import ConfigError
from vlkit.eval.detection import coco_map

TINY = ["train.max_steps=4", "train.epochs=0", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=2",
        "train.checkpoint_every=2", "train.progress=false", "world.train_length=32", "world.val_length=8",
        "world.test_length=8", "world.compositional_length=8", "eval_limit=8", "vit.depth=1", "vit.embed_dim=32",
        "vit.num_heads=2", "detr.d_model=32", "detr.num_heads=4", "detr.enc_layers=1", "detr.dec_layers=2",
        "detr.ffn_dim=64"]


def test_detr_world_trains_and_reports_ap(tmp_path):
    run = tmp_path / "detr"
    assert main(["train", "detr_world", *TINY, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    for split in ("val", "test", "compositional"):
        assert {"AP", "AP50", "AP75"} <= set(doc["eval"][split]) and 0 <= doc["eval"][split]["AP50"] <= 100
    model = vlkit.load(run)
    assert model(torch.randn(1, 3, 64, 64))["boxes"].shape == (1, 10, 4)
    assert main(["eval", str(run)]) == 0  # the saved model scores what the end of training scored
    assert json.loads((run / "eval-cli.json").read_text())["eval"] == doc["eval"]
    with pytest.raises(ConfigError, match="num_queries"):
        load_recipe("detr_world", ["detr.num_queries=2"])


def test_denoising_recipe_with_focal_loss_trains_saves_and_predicts(tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "dn"
    assert main(["train", "detr_world_dn", *TINY, "detr.focal=true", "cost_class=2", "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert any("loss_dn_giou" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    model = vlkit.load(run)
    assert model.cfg.focal and model(torch.randn(1, 3, 64, 64))["logits"].shape == (1, 10, 8)
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "eval-cli.json").read_text())["eval"] == doc["eval"]
    Image.new("RGB", (64, 64), "white").save(tmp_path / "scene.png")
    assert main(["predict", str(run), str(tmp_path / "scene.png"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "scene_detr.png").is_file()


def test_coco_map_perfect_and_wrong_predictions():
    t = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2]])}]
    xyxy = torch.tensor([[9.6, 9.6, 22.4, 22.4], [35.2, 38.4, 54.4, 51.2]])
    perfect = [{"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1]), "boxes": xyxy}]
    m = coco_map(perfect, t, [(64, 64)], num_classes=2)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    wrong = [{"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 0]), "boxes": xyxy}]
    assert coco_map(wrong, t, [(64, 64)], num_classes=2)["AP"] == pytest.approx(0.0)
    none = [{"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    assert coco_map(none, t, [(64, 64)], num_classes=2)["AP"] == 0.0



def test_predict_draws_boxes_and_masks(tmp_path, capsys):
    from PIL import Image

    from test_segmentation import TINY as SEG_TINY

    det, seg = tmp_path / "detr", tmp_path / "seg"
    assert main(["train", "detr_world", *TINY, "--run-dir", str(det)]) == 0
    assert main(["train", "segmenter_world", *SEG_TINY, "--run-dir", str(seg)]) == 0
    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (240, 240, 240)).save(image)
    (tmp_path / "bad.png").write_bytes(b"x")
    capsys.readouterr()
    out = tmp_path / "pics"
    assert main(["predict", str(det), str(image), str(tmp_path / "bad.png"), "--out", str(out), "--threshold", "0",
                 "--json", str(tmp_path / "d.json")]) == 0
    assert (out / "scene_detr.png").is_file() and "bad.png: skipped" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "d.json").read_text())[0]["detections"]) == 10  # threshold 0: every query
    assert main(["predict", str(det), str(image), "--out", str(out), "--threshold", "0", "--attention",
                 "--json", str(tmp_path / "a.json")]) == 0
    found = json.loads((tmp_path / "a.json").read_text())[0]
    assert Image.open(found["attention_picture"]).size == (10 * (256 + 4), 256)  # one panel per drawn query
    assert sorted(d["query"] for d in found["detections"]) == list(range(10))
    assert main(["predict", str(det), str(image), "--out", str(out), "--threshold", "1", "--min-boxes", "2",
                 "--json", str(tmp_path / "m.json")]) == 0  # no score passes 1: the two best drawn anyway
    best = json.loads((tmp_path / "m.json").read_text())[0]["detections"]
    scores = sorted((d["score"] for d in json.loads((tmp_path / "a.json").read_text())[0]["detections"]), reverse=True)
    assert sorted(d["score"] for d in best) == pytest.approx(sorted(scores[:2]))
    assert main(["predict", str(seg), str(image), "--out", str(out)]) == 0
    assert Image.open(out / "scene_segmenter.png").size == (256, 256)


def test_coco_format_dataset_and_training(tmp_path):
    from PIL import Image

    from vlkit.data.coco import CocoDetection

    Image.new("RGB", (80, 40), (255, 255, 255)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"broken")
    doc = {"categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
           "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [8, 4, 40, 20],
                            "segmentation": [[8, 4, 48, 4, 48, 24, 8, 24]]},
                           {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 0, 5]},  # empty: dropped
                           {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}]}
    (tmp_path / "train.json").write_text(json.dumps(doc))
    ds = CocoDetection(tmp_path / "train.json", tmp_path, side=32, masks=True)
    s = ds[0]
    assert ds.classes == ["dog", "cat"] and s["box_labels"].tolist() == [1]
    assert torch.allclose(s["boxes"], torch.tensor([[28 / 80, 14 / 40, 40 / 80, 20 / 40]]))
    assert s["image"].size == (32, 32) and set(s["semantic_mask"].unique().tolist()) == {0, 2}
    assert ds[1] is None
    run = tmp_path / "run"
    assert main(["train", "detr_world", *TINY, "data=coco", f"coco_train={tmp_path / 'train.json'}",
                 f"coco_val={tmp_path / 'train.json'}", f"image_root={tmp_path}", "detr.num_classes=2",
                 "world.image_size=64", "train.batch_size=1", "--run-dir", str(run)]) == 0
    assert "AP50" in json.loads((run / "eval.json").read_text())["eval"]["val"]


def test_backbone_init_starts_detr_and_segmenter_from_a_vit_classifier(tmp_path):
    from vlkit.checkpoints.hub import save_model
    from vlkit.encoders.vit import ViTConfig
    from vlkit.models.classifier import ClassifierConfig, build_classifier
    from vlkit.tasks.data import pretrained_vit
    from vlkit.tasks.detection import build_detr

    torch.manual_seed(0)
    cls_cfg = ClassifierConfig(arch="vit", num_classes=8, vit=ViTConfig(image_size=64, patch_size=8, embed_dim=32,
                                                                          depth=2, num_heads=2))
    classifier = build_classifier(cls_cfg).eval()
    save_model(classifier, tmp_path / "cls", "classifier", cls_cfg)
    cfg, state = pretrained_vit(load_recipe("detr_world", [f"backbone_init={tmp_path / 'cls'}"])[0])
    assert cfg.vit.depth == 2 and cfg.vit.num_classes == 0 and not any(k.startswith("head") for k in state)
    detr = build_detr(cfg).eval()
    load_state_dict_strict(detr.backbone.encoder, state)
    x = torch.randn(2, 3, 64, 64)
    tokens = classifier.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
    assert torch.allclose(detr.backbone(x), tokens, atol=1e-6)
    # end to end, the backbone frozen: the saved detector's encoder is the classifier's, and rebuilds alone
    frozen = "train.param_groups=[{pattern: '^backbone\\.', lr_scale: 0}]"
    run = tmp_path / "detr"
    assert main(["train", "detr_world", *TINY, f"backbone_init={tmp_path / 'cls'}", frozen, "--run-dir", str(run)]) == 0
    (tmp_path / "cls" / "model.safetensors").unlink()  # the detector no longer needs it
    saved = vlkit.load(run).backbone.encoder.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state.items()) and len(saved) == len(state)
    # nor does resuming it: the ViT comes from the run's config.yaml, its weights from the checkpoint
    assert main(["train", "detr_world", *TINY, "train.max_steps=6", f"backbone_init={tmp_path / 'cls'}", frozen,
                 "--run-dir", str(run), "--resume"]) == 0
    assert json.loads((run / "eval.json").read_text())["train"]["resumed_from_step"] == 4
    saved = vlkit.load(run).backbone.encoder.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    seg = tmp_path / "seg"
    save_model(classifier, tmp_path / "cls", "classifier", cls_cfg)
    from test_segmentation import TINY as SEG_TINY

    assert main(["train", "segmenter_world", *SEG_TINY, f"backbone_init={tmp_path / 'cls'}", "vit.patch_size=8",
                 "--run-dir", str(seg)]) == 0
    assert vlkit.load(seg).encoder.cfg.depth == 2
    assert pretrained_vit(load_recipe("detr_world", [f"backbone_init={seg}"])[0])[0].vit.patch_size == 8  # a Segmenter
    with pytest.raises(ConfigError, match="not a ViT classifier"):
        pretrained_vit(load_recipe("detr_world", [f"backbone_init={run}"])[0])
    with pytest.raises(ConfigError, match="needs backbone=vit"):
        load_recipe("detr_world", ["backbone_init=x", "backbone=efficientnet_lite0"])
