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


def test_learn_merges_on_sennrichs_example():
    """Sennrich et al. 2016's toy vocabulary: most frequent pair first, ties to the pair that sorts first."""
    from vlkit.data.tokenizers import learn_merges

    words = {("l", "o", "w</w>"): 5, ("l", "o", "w", "e", "r</w>"): 2, ("n", "e", "w", "e", "s", "t</w>"): 6,
             ("w", "i", "d", "e", "s", "t</w>"): 3}
    known = ["x"]
    merges = learn_merges(words, 7, 2, known)  # stops at 7 symbols
    assert merges == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w"), ("ew", "est</w>"), ("n", "ewest</w>")]
    assert known == ["x", "es", "est</w>", "lo", "ew", "ewest</w>", "newest</w>"]
    everything = learn_merges(words, 100, 2, [])
    assert everything[6:] == [("lo", "w</w>"), ("d", "est</w>"), ("i", "dest</w>"), ("w", "idest</w>"), ("e", "r</w>"),
                              ("lo", "w"), ("low", "er</w>")]  # then no pair occurs twice: min_frequency stops it
    assert len(learn_merges(words, 100, 7, [])) == 3  # counts 9, 9, 7


BPE_IN_A_PROCESS = """
import hashlib, sys
from vlkit.data.world import WorldConfig, WorldDataset
from vlkit.data.tokenizers import train_bpe
ds = WorldDataset(WorldConfig(image_size=32), "train")
tok = train_bpe([ds[i]["caption"] for i in range(400)], vocab_size=700)
print(hashlib.sha256(tok.tokenizer.to_str().encode()).hexdigest())
"""


def test_trained_bpe_is_the_same_in_every_process_and_splits_as_tokenizers_trainer():
    """tokenizers' BpeTrainer numbers equally frequent characters in hash-map order: another process,
    other ids. train_bpe gives one tokenizer (hash seeds differ here), cutting text into the same tokens."""
    import itertools
    import os
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, trainers

    from vlkit.data.tokenizers import CLIP_BOS, CLIP_EOS, _clip_pipeline, bytes_to_unicode

    digests = {subprocess.run([sys.executable, "-c", BPE_IN_A_PROCESS], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1
    captions = [WorldDataset(WorldConfig(image_size=32), "train")[i]["caption"] for i in range(400)]
    ours = train_bpe(captions, vocab_size=700)
    ref = _clip_pipeline(Tokenizer(models.BPE(end_of_word_suffix="</w>")))
    coverage = " ".join(chr(c) for c in [*range(33, 127), *range(0x2080, 0x20C0)])  # as train_bpe: byte word ends
    ref.train_from_iterator(itertools.chain([coverage], captions), trainers.BpeTrainer(
        vocab_size=700, min_frequency=2, show_progress=False, special_tokens=["<pad>", CLIP_BOS, CLIP_EOS],
        end_of_word_suffix="</w>", initial_alphabet=list(bytes_to_unicode().values())))
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for text in captions[:100] + TEXTS[:2]:
        assert ours.tokenizer.encode(text).tokens == ref.encode(text).tokens


def test_any_tokenizer_json_with_named_specials(tmp_path):
    clip_tokenizer().tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path, bos="<start_of_text>", eos="<end_of_text>")
    assert tok("a photo")["input_ids"][0, :4].tolist() == [49406, 320, 1125, 49407]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TextTokenizer.from_file(tmp_path, bos="[CLS]")
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_file(tmp_path / "missing")
