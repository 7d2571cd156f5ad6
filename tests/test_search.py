"""vlkit search: exact and FAISS search, incremental re-indexing, unreadable files, the CLI."""
import json
import os
from pathlib import Path

import pytest
import torch

from vlkit.checkpoints.hub import save_model
from vlkit.cli import main
from vlkit.data.tokenizers import TextTokenizer, train_bpe
from vlkit.data.world import WorldConfig, WorldDataset
from vlkit.search import Embedder, SearchIndex, build_faiss, build_index, exact_search, scan
from vlkit.tasks.contrastive import ContrastiveConfig, build_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small random vlkit CLIP model folder with its tokenizer."""
    cfg = ContrastiveConfig(embed_dim=16)
    cfg.vision.depth, cfg.vision.embed_dim, cfg.vision.num_heads = 1, 32, 2
    cfg.text.depth, cfg.text.width, cfg.text.num_heads = 1, 32, 2
    world = WorldDataset(WorldConfig(image_size=32), "train", length=64, task="retrieval")
    tok = train_bpe((world[i]["caption"] for i in range(64)), vocab_size=600)
    cfg.text.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "model"
    save_model(build_clip(cfg), folder, "clip", cfg)
    tok.save(folder / "tokenizer")
    return folder


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    world = WorldDataset(WorldConfig(image_size=32), "test", length=start + n, task="retrieval")
    paths = []
    for i in range(start, start + n):
        path = folder / ("sub" if i % 2 else "") / f"scene{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        world[i]["image"].save(path)
        paths.append(path)
    return paths


def test_exact_search_equals_a_full_sort_across_chunks():
    torch.manual_seed(0)
    db, q = torch.randn(1000, 8), torch.randn(5, 8)
    scores, ids = exact_search(db, q, k=7, chunk=64)
    ref_s, ref_i = (q @ db.T).topk(7, dim=1)
    assert torch.equal(ids, ref_i) and torch.allclose(scores, ref_s)
    assert exact_search(db[:3], q, k=10)[1].shape == (5, 3)


def test_faiss_ivf_finds_the_exact_neighbours_of_clustered_data():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(20, 32), dim=-1)
    db = torch.nn.functional.normalize(centres.repeat_interleave(100, 0) + 0.05 * torch.randn(2000, 32), dim=-1)
    index = build_faiss(db, nlist=20, nprobe=4)
    q = db[::97]
    _, got = index.search(q.numpy(), 10)
    _, ref = exact_search(db, q, 10)
    recall = sum(len(set(g) & set(r)) for g, r in zip(got.tolist(), ref.tolist())) / ref.numel()
    assert recall >= 0.95


def test_index_query_and_incremental_reindex(tmp_path, clip_folder):
    images = write_images(tmp_path / "imgs", 12)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored: not an image suffix")
    (tmp_path / "imgs" / ".hidden").mkdir()
    images[0].rename(tmp_path / "imgs" / ".hidden" / "x.png")  # hidden folders are not indexed
    embedder = Embedder.load(clip_folder)
    index, stats = build_index(embedder, tmp_path / "imgs", tmp_path / "idx", progress=False)
    assert (stats["files"], stats["added"], stats["skipped"], stats["backend"]) == (11, 11, 1, "exact")
    assert index.skipped[0]["path"] == "broken.jpg" and index.skipped[0]["error"]
    assert set(scan(tmp_path / "imgs")) == {f["path"] for f in index.files} | {"broken.jpg"}

    hits = SearchIndex.load(tmp_path / "idx").search(embedder.images([images[5]]), k=3)[0]
    assert Path(hits[0][0]) == images[5].resolve() and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    text_hits = index.search(embedder.texts(["a red circle"]), k=4)[0]
    assert len(text_hits) == 4 and all(a[1] >= b[1] for a, b in zip(text_hits, text_hits[1:]))

    write_images(tmp_path / "imgs", 2, start=12)  # two new files
    images[3].unlink()  # one deleted
    os.utime(images[4], ns=(1, 1))  # one changed (new mtime)
    index2, stats2 = build_index(embedder, tmp_path / "imgs", tmp_path / "idx", progress=False)
    assert (stats2["added"], stats2["kept"], stats2["removed"], stats2["new_skipped"], stats2["skipped"]) == \
        (3, 9, 2, 0, 1)  # the unchanged broken file is not retried
    fresh, _ = build_index(embedder, tmp_path / "imgs", tmp_path / "idx_fresh", progress=False)
    assert [f["path"] for f in index2.files] == [f["path"] for f in fresh.files]
    assert torch.allclose(index2.embeddings, fresh.embeddings, atol=1e-5)


def test_faiss_backend_and_a_changed_model_rebuilds(tmp_path, clip_folder):
    images = write_images(tmp_path / "imgs", 8)
    embedder = Embedder.load(clip_folder)
    index, stats = build_index(embedder, tmp_path / "imgs", tmp_path / "idx", backend="faiss", progress=False)
    assert stats["backend"] == "faiss" and (tmp_path / "idx" / "index.faiss").is_file()
    loaded = SearchIndex.load(tmp_path / "idx")
    assert loaded.faiss_index is not None
    q = embedder.images(images[:4])
    exact = [[p for p, _ in hits] for hits in SearchIndex(loaded.root, "", loaded.files, loaded.embeddings).search(q, 3)]
    assert [[p for p, _ in hits] for hits in loaded.search(q, 3)] == exact
    embedder.model_id = "another model"
    _, stats = build_index(embedder, tmp_path / "imgs", tmp_path / "idx", backend="exact", progress=False)
    assert (stats["added"], stats["kept"]) == (8, 0) and not (tmp_path / "idx" / "index.faiss").exists()


def test_search_cli_index_query_picture(tmp_path, clip_folder, capsys):
    images = write_images(tmp_path / "imgs", 6)
    assert main(["search", "index", str(clip_folder), str(tmp_path / "imgs")]) == 0
    assert "6 images (6 added" in capsys.readouterr().out
    out_json, picture = tmp_path / "hits.json", tmp_path / "hits.png"
    assert main(["search", "query", str(tmp_path / "imgs" / ".vlkit_index"), "a", "blue", "square", "-k", "3",
                 "--json", str(out_json), "--picture", str(picture)]) == 0
    assert len(json.loads(out_json.read_text())) == 3 and picture.stat().st_size > 1000
    assert main(["search", "query", str(tmp_path / "imgs" / ".vlkit_index"), "--image", str(images[2]), "-k", "1"]) == 0
    assert str(images[2].resolve()) in capsys.readouterr().out
    assert main(["search", "query", str(tmp_path / "imgs" / ".vlkit_index")]) == 2  # no query
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["search", "query", str(tmp_path / "imgs" / ".vlkit_index"), "--image", str(bad)]) == 2
    assert main(["search", "query", str(tmp_path / "nowhere")]) == 2


def test_hf_clip_folder_embeds_text_with_openai_bpe(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    embedder = Embedder.load(tmp_path / "hf")
    from vlkit.data.tokenizers import clip_tokenizer

    ids = clip_tokenizer()(["a photo of a cat"], 77)["input_ids"]
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=ids)
    ref = torch.nn.functional.normalize(getattr(ref, "pooler_output", ref), dim=-1)
    assert (embedder.texts(["a photo of a cat"]) - ref).abs().max() <= 1e-4
    images = write_images(tmp_path / "imgs", 2)
    assert embedder.images(images).shape == (2, 16)


def test_hf_siglip_folder_searches_with_its_own_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=8, projection_size=16)
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    folder = tmp_path / "siglip"
    hf.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    embedder = Embedder.load(folder)
    ids = torch.tensor([[3, 8, 9, 3, 4, 6, 1, 0]])  # "a photo of a red circle", its end token, padded to 8
    with torch.no_grad():
        ref = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert (embedder.texts(["a photo of a red circle"]) - ref).abs().max() <= 1e-4
    from PIL import Image

    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 16, 32))  # a blue band that a centre crop would cut off
    t = embedder.transform(wide, torch.Generator())  # SigLIP: squashed to 32 x 32, normalised with 0.5 / 0.5
    assert t.shape == (3, 32, 32) and t[2, :, :6].mean() > 0.9 and t[0, :, :6].mean() < -0.9
    write_images(tmp_path / "imgs", 3)
    assert main(["search", "index", str(folder), str(tmp_path / "imgs")]) == 0
    assert main(["search", "query", str(tmp_path / "imgs" / ".vlkit_index"), "a red circle", "-k", "2"]) == 0
    assert capsys.readouterr().out.count("scene") >= 2
    from vlkit.checkpoints.convert import convert

    converted = Embedder.load(convert(folder, tmp_path / "siglip_vk"))  # its tokenizer files travel along
    assert torch.equal(converted.texts(["a photo of a red circle"]), embedder.texts(["a photo of a red circle"]))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Embedder.load(folder)


SPM_VOCAB = 60


def _trained_spiece(path):
    """A small Unigram SentencePiece model trained by sentencepiece itself, T5 / SigLIP 1 layout (pad 0, end 1,
    unknown 2, no start token, NFKC normalisation)."""
    spm = pytest.importorskip("sentencepiece")
    import io
    import random

    words = ("a photo of the cat dog two playing in snow red circle blue square green triangle next to above below "
             "small large picture shows some many one three hund läuft über die wiese café naïve résumé").split()
    rng = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]),
        model_writer=model, vocab_size=SPM_VOCAB, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="nmt_nfkc", character_coverage=1.0, minloglevel=2)
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


ODD_TEXTS = ["A photo of a cat.", "  Two  DOGS, playing in the snow!  ", "ein Hund läuft über die Wiese", "",
             "Café naïve — résumé (½ ＦＵＬＬ width)", "new\nline\ttab", "</s> is not the end <unk>", "▁already",
             "unseen ✓ symbols ζ", "a " * 30]


def test_sentencepiece_model_gives_sentencepiece_ids(tmp_path):
    """spiece.model read without sentencepiece: the same ids as SentencePieceProcessor.encode, control pieces
    never produced from text, unknown characters as the unknown id."""
    from vlkit.data.sentencepiece import read_model, sentencepiece_tokenizer

    sp = _trained_spiece(tmp_path / "spiece.model")
    tok = sentencepiece_tokenizer(tmp_path / "spiece.model")
    for text in ODD_TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert tok.decode(sp.encode("a photo of the cat")) == "a photo of the cat"
    assert read_model(tmp_path / "spiece.model")["unk_id"] == 2 and tok.get_vocab_size() == SPM_VOCAB
    (tmp_path / "bad.model").write_bytes(b"\x0a\xff\xff\xff")  # a field running past the end
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        read_model(tmp_path / "bad.model")
    whole = (tmp_path / "spiece.model").read_bytes()
    (tmp_path / "cut.model").write_bytes(whole[:len(whole) // 2])  # a download cut short
    with pytest.raises(ValueError, match="cut short"):
        read_model(tmp_path / "cut.model")


def test_hf_siglip1_folder_reads_spiece_model_as_siglip_tokenizer(tmp_path):
    """A SigLIP 1 folder ships spiece.model, no tokenizer.json: SiglipTokenizer's ids (canonicalised text: lower
    case, no punctuation; end token; padded with it) and, through vlkit search's embedder, transformers' text
    features."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "siglip"
    folder.mkdir()
    _trained_spiece(tmp_path / "spiece.model")
    hf_tok = transformers.SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model"))
    hf_tok.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # the hub's SigLIP 1 layout
    assert (folder / "spiece.model").is_file()
    ours = TextTokenizer.from_hf_folder(folder)
    assert ours.canonical and ours.lower and ours.eos_id == 1
    cased = transformers.SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model"), do_lower_case=False)
    cased.save_pretrained(tmp_path / "cased")
    (tmp_path / "cased" / "tokenizer.json").unlink(missing_ok=True)
    assert TextTokenizer.from_hf_folder(tmp_path / "cased")(["A Photo"], 12)["input_ids"][0].tolist() == \
        cased("A Photo", padding="max_length", max_length=12, truncation=True)["input_ids"]
    for text in ODD_TEXTS:
        if "</s>" in text:  # SiglipTokenizer reads a written "</s>" as its end token; here it is text
            continue
        ref = hf_tok(text, padding="max_length", max_length=12, truncation=True)["input_ids"]
        assert ours([text], 12)["input_ids"][0].tolist() == ref, text
    text = dict(vocab_size=SPM_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=12, projection_size=16)
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    embedder = Embedder.load(folder)
    queries = ["A photo of a RED circle!", "two dogs"]
    ids = torch.tensor(hf_tok(queries, padding="max_length", max_length=12, truncation=True)["input_ids"])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert (embedder.texts(queries) - ref).abs().max() <= 1e-4
