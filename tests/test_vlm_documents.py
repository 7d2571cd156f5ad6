"""Interleaved image-text documents and multi-image conversations: loading, cutting long
documents at image boundaries, training with every injection style that takes several images."""
import json

import pytest
import torch
from PIL import Image

from vlkit.cli import main
from vlkit.data.base import TransformedDataset, collate
from vlkit.data.transforms import TransformConfig, build_transform
from vlkit.data.vl import InterleavedDocuments, LlavaConversations
from vlkit.models.vlm import IGNORE_INDEX
from vlkit.tasks.vlm import encode_batch, fit_images
from test_vlm_task import SCRATCH, TINY, WORLD


def write_images(root):
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220)), ("green.png", (30, 200, 30))):
        Image.new("RGB", (32, 32), colour).save(root / name)
    (root / "broken.png").write_bytes(b"not a png")


def documents(root) -> list[dict]:
    return [{"id": "obelics", "texts": ["A red square.", None, "Then a blue one:", None, "the end."],
             "images": [None, "red.png", None, "blue.png", None]},
            {"id": "marked", "text": "<image> green <image> red, two squares.", "images": ["green.png", "red.png"]},
            {"id": "bad", "text": "<image> lost", "images": ["broken.png"]},
            {"id": "empty", "texts": [None], "images": ["red.png"]}]


def test_documents_load_in_both_formats_and_skip_bad_ones(tmp_path):
    write_images(tmp_path)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in documents(tmp_path)))
    ds = InterleavedDocuments(tmp_path / "docs.jsonl", tmp_path)
    assert len(ds) == 3  # the document without text is dropped at load
    first = ds[0]
    assert first["messages"] == [{"role": "document", "content": "A red square.<image>Then a blue one:<image>the end."}]
    assert [im.getpixel((0, 0)) for im in first["images"]] == [(220, 30, 30), (30, 30, 220)]
    assert ds[2] is None  # an unreadable image: the document is skipped, counted by the collate
    wrapped = TransformedDataset(ds, build_transform(TransformConfig(image_size=16), train=False))
    batch = collate([wrapped[i] for i in range(3)])
    assert batch["num_skipped"] == 1 and [len(x) for x in batch["images"]] == [2, 2]
    assert batch["images"][1][0].shape == (3, 16, 16)
    (tmp_path / "odd.json").write_text(json.dumps([{"text": "<image> <image>", "images": ["red.png"]}]))
    with pytest.raises(ValueError, match="2 <image> marks for 1 images"):
        InterleavedDocuments(tmp_path / "odd.json", tmp_path)
    (tmp_path / "odd.json").write_text(json.dumps([{"texts": ["a", "b"], "images": [None, "red.png", None]}]))
    with pytest.raises(ValueError, match="parallel lists"):
        InterleavedDocuments(tmp_path / "odd.json", tmp_path)


def test_long_rows_are_cut_before_an_image_that_would_not_fit():
    I = 9  # noqa: E741 - the image placeholder id, 3 per image
    ids = [1, 2, I, I, I, 3, I, I, I, 4]
    assert fit_images(ids, ids, I, 3, 100) == (ids, ids, 2)
    assert fit_images(ids, ids, I, 3, 8) == (ids[:6], ids[:6], 1)  # the 2nd image would be split: cut before it
    assert fit_images(ids, ids, I, 3, 6) == (ids[:6], ids[:6], 1)
    assert fit_images(ids, ids, I, 3, 3) == ([1, 2], [1, 2], 0)


def test_documents_label_all_text_and_keep_images_in_order():
    from test_vlm_task import tiny_encoder

    enc = tiny_encoder()
    pixels = [torch.full((3, 4, 4), float(k)) for k in range(3)]
    batch = {"messages": [[{"role": "document", "content": "red <image> blue <image> green <image> end"}]],
             "images": [pixels]}
    rows, images = encode_batch(batch, enc, max_length=100)
    ids, labels = rows[0]
    assert ids.count(enc.image_id) == 3 * enc.placeholders and labels[-1] == enc.eos_id
    assert all((lab == IGNORE_INDEX) == (i == enc.image_id) for i, lab in zip(ids, labels))
    assert torch.equal(images, torch.stack(pixels))
    cut = ids.index(enc.image_id) + enc.placeholders + 2  # room for the first image only
    rows, images = encode_batch(batch, enc, max_length=cut)
    assert rows[0][0].count(enc.image_id) == enc.placeholders and torch.equal(images, pixels[0][None])
    chat = {"messages": [[{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}]],
            "image": torch.zeros(1, 3, 4, 4)}
    with pytest.raises(ValueError, match="cuts image placeholders"):
        encode_batch(chat, enc, max_length=2)  # a conversation may not lose its image


@pytest.mark.parametrize("style", ["tokens", "cross_attention"])
def test_training_on_documents_and_multi_image_conversations(tmp_path, style):
    write_images(tmp_path)
    docs = documents(tmp_path) * 4
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    run = tmp_path / "docs"
    common = [*TINY, *SCRATCH, *WORLD, "vision.vit.image_size=16", "transform.image_size=16",
              f"data.image_root={tmp_path}", f"injection.style={style}"]
    assert main(["train", "vlm_world_caption", *common, "data.dataset=documents", f"data.train={tmp_path / 'docs.json'}",
                 f"data.val={tmp_path / 'docs.json'}", "train.group_by_length=2", "train.log_every=1",
                 "--run-dir", str(run)]) == 0
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(0 <= m.get("padding", -1) < 1 for m in logged)  # the share of padded positions is logged
    doc = json.loads((run / "eval.json").read_text())
    assert doc["eval"]["val"]["perplexity"] > 1 and doc["eval"]["val"]["tokens"] > 0
    assert "perplexity" in doc["protocol"]["scored"]
    chats = [{"id": k, "image": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "<image> or <image>: which is red?"}, {"from": "gpt", "value": "the first"}]}
        for k in range(8)]
    (tmp_path / "chats.json").write_text(json.dumps(chats))
    assert len(LlavaConversations(tmp_path / "chats.json", tmp_path)[0]["images"]) == 2
    run = tmp_path / "chats"
    assert main(["train", "vlm_world_caption", *common, "data.dataset=llava", f"data.train={tmp_path / 'chats.json'}",
                 f"data.val={tmp_path / 'chats.json'}", "--run-dir", str(run)]) == 0
    doc = json.loads((run / "eval.json").read_text())
    assert 0 <= doc["eval"]["val"]["vqa_accuracy"] <= 100
