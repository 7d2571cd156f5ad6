"""Segmenter: mask transformer and linear decoders, mIoU from a confusion matrix, the task end to end."""
import json

import pytest
import torch

import vlkit
from vlkit.cli import main
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.eval.segmentation import ConfusionMatrix
from vlkit.models.segmenter import LinearDecoder, MaskTransformer, Segmenter

TINY = ["train.max_steps=3", "train.epochs=0", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=3",
        "train.checkpoint_every=3", "train.progress=false", "world.train_length=16", "world.val_length=4",
        "world.test_length=4", "world.compositional_length=4", "eval_limit=4", "vit.depth=1", "vit.embed_dim=32",
        "vit.num_heads=2", "decoder_dim=32", "decoder_heads=2", "decoder_depth=1"]


@pytest.mark.parametrize("kind", ["mask", "linear"])
def test_decoders_give_per_pixel_logits_and_train(kind):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=4, num_classes=0, embed_dim=32, depth=1, num_heads=2))
    dec = MaskTransformer(32, 5, dim=32, depth=1, num_heads=2) if kind == "mask" else LinearDecoder(32, 5)
    model = Segmenter(vit, dec)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5, 32, 32)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_confusion_matrix_miou():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1]])
    cm.update(torch.tensor([[0, 1, 1, 1]]), target)
    m = cm.compute()
    assert m["pixel_acc"] == pytest.approx(75.0)
    assert m["iou"][0] == pytest.approx(50.0) and m["iou"][1] == pytest.approx(200 / 3) and m["iou"][2] is None
    assert m["mIoU"] == pytest.approx((50 + 200 / 3) / 2)  # class 2 is absent: excluded
    with pytest.raises(ValueError, match="outside"):
        cm.update(target, torch.tensor([[0, 5, 0, 0]]))


@pytest.mark.parametrize("recipe", ["segmenter_world", "segmenter_world_linear"])
def test_segmenter_recipes_train_and_report_miou(tmp_path, recipe):
    run = tmp_path / recipe
    assert main(["train", recipe, *TINY, "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert 0 <= doc["eval"]["test"]["mIoU"] <= 100 and "pixel_acc" in doc["eval"]["compositional"]
    assert vlkit.load(run)(torch.randn(1, 3, 64, 64)).shape == (1, 9, 64, 64)
    assert main(["eval", str(run)]) == 0  # the saved model scores what the end of training scored
    assert json.loads((run / "eval-cli.json").read_text())["eval"] == doc["eval"]


def test_segmenter_trains_on_coco_format_masks(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (255, 255, 255)).save(tmp_path / "a.png")
    doc = {"categories": [{"id": 1, "name": "square"}], "images": [{"id": 1, "file_name": "a.png"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20],
                            "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]}]}
    (tmp_path / "seg.json").write_text(json.dumps(doc))
    run = tmp_path / "run"
    assert main(["train", "segmenter_world", *TINY, "data=coco", f"coco_train={tmp_path / 'seg.json'}",
                 f"coco_val={tmp_path / 'seg.json'}", f"image_root={tmp_path}", "coco_classes=1",
                 "train.batch_size=1", "--run-dir", str(run)]) == 0
    assert set(json.loads((run / "eval.json").read_text())["eval"]) == {"val"}
