"""Tokenizers: OpenAI CLIP's BPE gives open_clip's ids; a BPE trained on captions; tokenizer.json files."""
import importlib.util

import pytest
import torch

from vlkit.data.tokenizers import TextTokenizer, clip_bpe_path, clip_tokenizer, train_bpe
from vlkit.data.world import WorldConfig, WorldDataset

TEXTS = [
    "a photo of a cat", "A RED Circle left of a blue square.", "it's what they'd've done, isn't it?",
    "  lots   of\twhite\nspace  ", "numbers 12345 and 3.14159 and 1,000,000", "café naïve Ünïcode ✓ 東京 🙂",
    "&amp; html &lt;entities&gt; &quot;quoted&quot;", "hyphen-ated e-mail@example.com #tag $5 100%",
    "", "!!!???...", "x" * 300, " ".join(["word"] * 120),
]


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer, loaded from its file (the package itself is never imported)."""
    path = clip_bpe_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(clip_bpe_path()))


def test_clip_bpe_gives_open_clip_ids(reference):
    tok = clip_tokenizer()
    assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id) == (49406, 49407)
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), text
    batch = tok(TEXTS, context_length=77)
    torch.testing.assert_close(batch["input_ids"], reference(TEXTS, context_length=77))
    assert batch["attention_mask"].sum(1).tolist() == [min(77, len(reference.encode(t)) + 2) for t in TEXTS]


def test_clip_decode_round_trip(reference):
    tok = clip_tokenizer()
    for text in ["a photo of a café", "two small green triangles"]:
        assert tok.decode(tok(text)["input_ids"][0]) == reference.decode(reference.encode(text)).strip()


def test_truncation_keeps_the_end_token_and_rejects_no_room():
    tok = clip_tokenizer()
    ids = tok(["word " * 50], context_length=8)["input_ids"][0]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 8
    assert tok(["a", "a b c d"], context_length=None)["input_ids"].shape == (2, 6)
    with pytest.raises(ValueError, match="no room"):
        tok(["a"], context_length=2)


def test_bpe_trained_on_world_captions(tmp_path):
    captions = [WorldDataset(WorldConfig(image_size=32), "train")[i]["caption"] for i in range(300)]
    tok = train_bpe(captions, vocab_size=700, min_frequency=2)
    assert tok.vocab_size <= 700 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    words = [w for c in captions for w in c.lower().replace(".", "").replace(",", "").split()]
    assert all(len(tok.encode(w)) == 1 for w in set(words))  # every frequent caption word is one token
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(captions, vocab_size=300)
    for c in captions[:20]:  # words come back whole, punctuation as its own word
        assert tok.decode(tok.encode(c)).replace(" ", "") == c.lower().replace(" ", "")
    again = TextTokenizer.from_file(tok.save(tmp_path / "tok"))
    torch.testing.assert_close(again(captions[:8])["input_ids"], tok(captions[:8])["input_ids"])
    for unseen in ["an unseen wordzzz", "жук café 東京"]:  # every byte, also as a word end, is in the vocabulary
        assert again.decode(again.encode(unseen)) == unseen


def test_any_tokenizer_json_with_named_specials(tmp_path):
    clip_tokenizer().tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path, bos="<start_of_text>", eos="<end_of_text>")
    assert tok("a photo")["input_ids"][0, :4].tolist() == [49406, 320, 1125, 49407]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TextTokenizer.from_file(tmp_path, bos="[CLS]")
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_file(tmp_path / "missing")
