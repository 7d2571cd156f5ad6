"""Causal decoders: parity with transformers (Llama with GQA, GPT-2), KV cache == full forward,
left-padded batches, greedy / sampling / beam search."""
import copy
import itertools

import pytest
import torch

from vlkit.decoders.causal_lm import CausalLM, DecoderConfig
from vlkit.decoders.generate import GenerationConfig, filter_logits, generate, left_pad, speculative_generate
from vlkit.decoders.loading import load_hf_gpt2, load_hf_llama, unpermute_gguf_qk

transformers = pytest.importorskip("transformers")


def hf_llama(tmp_path, tie=True, **kw):
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=37, tie_word_embeddings=tie,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, load_hf_llama(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_gqa_logits_equal_transformers(tmp_path, tie):
    hf, ours = hf_llama(tmp_path, tie=tie, rope_theta=500.0, attention_bias=True)
    ids = torch.randint(3, 99, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
        ref = hf(ids, attention_mask=mask).logits
        assert (ours(ids, attention_mask=mask) - ref)[mask.bool()].abs().max() <= 1e-4
    assert ours.cfg.num_kv_heads == 2 and (ours.lm_head.weight is ours.embed_tokens.weight) == tie


def test_gpt2_logits_equal_transformers(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                  eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_gpt2(tmp_path)
    ids = torch.randint(0, 99, (3, 17))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.zeros(1, 65, dtype=torch.long))


def test_unsupported_llama_variants_fail_clearly(tmp_path):
    import json

    hf_llama(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="yarn"):
        load_hf_llama(tmp_path)


def tiny(**kw) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(DecoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, **kw)).eval()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cached_decoding_equals_a_full_forward(positions):
    model = tiny(positions=positions)
    ids = torch.randint(3, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :5], mask[:, :5], cache=cache)]
        steps += [model(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache) for t in range(5, 9)]
        steps.append(model(ids[:, 9:], mask[:, 9:], cache=cache))  # several new tokens on a cache
    cached = torch.cat(steps, 1)
    assert (cached - full)[mask.bool()].abs().max() <= 1e-5
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :1], cache=cache)


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time():
    model = tiny()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    cfg = GenerationConfig(max_new_tokens=8, eos_token_ids=(49,))
    ids, mask = left_pad(prompts, pad_id=0)
    batched = generate(model, ids, mask, cfg)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), None, cfg)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_fixed_shape_steps_equal_plain_decoding_and_compile_without_graph_breaks(positions):
    model = tiny(positions=positions)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], pad_id=0)
    cfg = dict(max_new_tokens=20, eos_token_ids=(49,), pad_token_id=0)
    plain = generate(model, ids, mask, GenerationConfig(**cfg))
    static = generate(model, ids, mask, GenerationConfig(**cfg, static=True))
    n = plain.shape[1]
    assert torch.equal(static[:, :n], plain) and (static[:, n:] == 0).all()  # later columns: pad after eos
    with torch.no_grad():
        ref_cache, cache = model.new_cache(3, 12), model.new_cache(3, 12)
        model(ids, mask, cache=ref_cache)
        model(ids, mask, cache=cache)
        positions = cache.key_mask[:, :cache.length].sum(1, keepdim=True)
        step = torch.compile(model.decode_step, backend="eager", fullgraph=True)  # fails on any graph break
        for t in range(3):
            token = torch.tensor([[20 + t], [30 + t], [40 + t]])
            ref = model(token, cache=ref_cache)[:, -1]
            got = step(token, positions + t, torch.tensor([cache.length]), cache)
            cache.advance(1)
            assert (got - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="layer hook"):
        generate(model, ids, mask, GenerationConfig(**cfg, static=True), layer_hook=lambda i, x, past: x)


def test_compiled_decoding_reuses_one_graph_and_one_cache_across_prompts(monkeypatch):
    """compile=True: the KV cache tensors are kept per batch size (static addresses, as CUDA graphs
    need), so a second prompt of another length neither recompiles nor allocates; tokens are unchanged."""
    from vlkit.decoders import generate as gen_module

    graphs, real_compile = [], torch.compile

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(gen_module.torch, "compile",
                        lambda fn, mode=None, **kw: real_compile(fn, backend=counting_backend, **kw))
    torch._dynamo.reset()
    model = tiny()
    cfg = dict(max_new_tokens=12, eos_token_ids=(49,), pad_token_id=0)
    pointers = set()
    for prompts in ([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], [[1, 2], [3, 4, 5, 6, 7, 8, 9], [8]]):
        ids, mask = left_pad(prompts, pad_id=0)
        plain = generate(model, ids, mask, GenerationConfig(**cfg))
        compiled = generate(model, ids, mask, GenerationConfig(**cfg, compile=True))
        assert torch.equal(compiled[:, :plain.shape[1]], plain)
        (cache,) = gen_module._STATIC_CACHES[model].values()
        pointers.add(cache.k.data_ptr())
    assert len(graphs) == 1 and len(pointers) == 1 and cache.max_len == 256


def test_int8_weights_approximate_the_float_model_and_decode_with_the_cache():
    from vlkit.decoders.quantize import Int8Linear, quantize_int8

    model, ids = tiny(tie_embeddings=True, attn_bias=True), torch.randint(3, 50, (2, 10))
    with torch.no_grad():
        ref = model(ids)
        q = quantize_int8(tiny(tie_embeddings=True, attn_bias=True))
        out = q(ids)
    assert isinstance(q.lm_head, Int8Linear) and not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert q.embed_tokens.weight.dtype == torch.float32  # the embedding the head was tied to stays float
    rel = (out - ref).norm() / ref.norm()
    assert 1e-6 < rel < 0.05, rel  # quantized (not the float path), and close to it
    prompts = [[5, 6, 7, 8], [9, 10]]
    batch, mask = left_pad(prompts, pad_id=0)
    cfg = GenerationConfig(max_new_tokens=5, eos_token_ids=(49,))
    batched = generate(q, batch, mask, cfg)
    for i, p in enumerate(prompts):  # cached, left-padded decoding still equals one prompt at a time
        alone = generate(q, torch.tensor([p]), None, cfg)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()


def test_int4_weights_reproduce_a_4_bit_grid_and_fall_back_to_int8_where_the_kernel_cannot():
    from vlkit.decoders.quantize import Int4Linear, Int8Linear, quantize_int4

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():  # weights on a 4-bit grid per group of 32 (a Q4_1 source, as SmolLM2's GGUF)
        scale = torch.rand(48, 2, 1).mul(0.02).add(0.01).to(torch.bfloat16).float()
        low = -8 * scale + torch.randn(48, 2, 1).mul(0.01).to(torch.bfloat16).float()
        q = torch.randint(0, 16, (48, 2, 32)).float()
        q[:, :, 0], q[:, :, 1] = 0, 15  # each group spans the whole grid: min and max are grid points
        lin.weight.copy_((q * scale + low).view(48, 64))
    x = torch.randn(3, 5, 64).to(torch.bfloat16).float()  # activations the kernel reads exactly
    out, ref = Int4Linear(lin)(x), lin(x)
    assert out.shape == (3, 5, 48)
    assert ((out - ref).norm() / ref.norm()) < 0.01
    rough = torch.nn.Linear(64, 48)  # arbitrary weights: 4 bits lose more, but stay close
    assert 1e-4 < ((Int4Linear(rough)(x) - rough(x)).norm() / rough(x).norm()) < 0.15
    with pytest.raises(ValueError, match="multiple"):
        Int4Linear(torch.nn.Linear(48, 32))
    with pytest.raises(ValueError, match="multiple"):
        Int4Linear(torch.nn.Linear(32, 24))  # output rows come in tiles of 16
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(torch.nn.Linear(48, 32), group_size=48)
    assert isinstance(quantize_int4(torch.nn.Sequential(torch.nn.Linear(32, 24)))[0], Int8Linear)
    model = quantize_int4(tiny(tie_embeddings=True))
    assert isinstance(model.blocks[0].mlp.fc, Int4Linear)  # 32 -> 96
    assert isinstance(model.blocks[0].mlp.proj, Int8Linear)  # 48 inputs: no whole groups of 32
    assert isinstance(model.lm_head, Int8Linear)  # the output head keeps int8 (its 50 outputs would not fit either)
    chosen = quantize_int4(tiny(), int8_names=("fc",))
    assert isinstance(chosen.blocks[1].mlp.fc, Int8Linear) and isinstance(chosen.blocks[1].attn.qkv, Int4Linear)
    prompts = [[5, 6, 7, 8], [9, 10]]
    batch, mask = left_pad(prompts, pad_id=0)
    cfg = GenerationConfig(max_new_tokens=5, eos_token_ids=(49,))
    batched = generate(model, batch, mask, cfg)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), None, cfg)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()


def test_prepacked_float32_weights_change_no_token_and_still_make_a_quantized_draft():
    from vlkit.decoders.generate import quantized_draft
    from vlkit.decoders.quantize import Int4Linear, PackedLinear, prepack_fp32

    model = tiny(init_std=0.3, attn_bias=True)
    packed = prepack_fp32(tiny(init_std=0.3, attn_bias=True))
    assert isinstance(packed.lm_head, PackedLinear) and not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert torch.equal(packed.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)  # unpacks exactly
    assert "packed" not in " ".join(packed.state_dict())  # opaque layout: never saved
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13]], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids, mask), model(ids, mask), atol=1e-5, rtol=1e-5)
    cfg = GenerationConfig(max_new_tokens=12, eos_token_ids=(49,))
    ref = generate(model, ids, mask, cfg)
    assert generate(packed, ids, mask, cfg).tolist() == ref.tolist()
    spec = GenerationConfig(max_new_tokens=12, eos_token_ids=(49,), speculative=3)
    assert generate(packed, ids, mask, spec).tolist() == ref.tolist()  # its draft: quantized from the unpacked weights
    assert isinstance(quantized_draft(packed).blocks[0].mlp.fc, Int4Linear)
    with pytest.raises(ValueError, match="float32 CPU"):
        packed.lm_head(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inference"):
        packed.lm_head(torch.randn(2, 32, requires_grad=True))  # no silent missing gradients
    twin = copy.deepcopy(packed)
    assert twin.lm_head.bias is None and twin.blocks[0].attn.qkv.bias.data_ptr() != packed.blocks[0].attn.qkv.bias.data_ptr()
    with torch.no_grad():
        assert torch.equal(twin(ids, mask), packed(ids, mask))


def test_greedy_equals_transformers_generate(tmp_path):
    hf, ours = hf_llama(tmp_path)
    ids = torch.randint(3, 99, (1, 7))
    ref = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 7:]
    got = generate(ours, ids, None, GenerationConfig(max_new_tokens=10, eos_token_ids=(1000,)))[0]
    assert got.tolist() == ref.tolist()


def sequence_logprob(model, prompt: list[int], new: list[int]) -> float:
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        lp = model(ids).log_softmax(-1)[0, len(prompt) - 1:-1]
    return lp.gather(1, torch.tensor(new)[:, None]).sum().item()


def test_beam_search_is_exact_when_beams_cover_every_sequence():
    torch.manual_seed(0)
    model = CausalLM(DecoderConfig(vocab_size=5, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=16, eos_token_id=None)).eval()
    prompt = [1, 2]
    best = max(itertools.product(range(5), repeat=3), key=lambda s: sequence_logprob(model, prompt, list(s)))
    got = generate(model, torch.tensor([prompt]), None, GenerationConfig(max_new_tokens=3, num_beams=25,
                                                                        length_penalty=0.0))[0]
    assert got.tolist() == list(best)
    greedy = generate(model, torch.tensor([prompt]), None, GenerationConfig(max_new_tokens=3))[0]
    one_beam = generate(model, torch.tensor([prompt]), None, GenerationConfig(max_new_tokens=3, num_beams=1))[0]
    assert one_beam.tolist() == greedy.tolist()
    assert sequence_logprob(model, prompt, got.tolist()) >= sequence_logprob(model, prompt, greedy.tolist())


def test_beam_search_stops_at_eos_and_pads():
    model = tiny(eos_token_id=7)
    out = generate(model, torch.tensor([[3, 4], [5, 6]]), None, GenerationConfig(max_new_tokens=12, num_beams=3))
    assert out.shape[0] == 2
    for row in out.tolist():
        if 7 in row:
            assert all(t == 0 for t in row[row.index(7) + 1:])


def test_sampling_filters_and_seed():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, GenerationConfig(do_sample=True, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, ...: top_p 0.8 keeps the two first (0.64 < 0.8 <= 0.88)
    kept = filter_logits(logits, GenerationConfig(do_sample=True, top_p=0.8)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]] and p[0] < 0.8 <= p[:2].sum()
    model = tiny()
    ids = torch.tensor([[5, 6, 7]])
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=3, eos_token_ids=(49,))
    assert generate(model, ids, None, cfg).tolist() == generate(model, ids, None, cfg).tolist()
    greedy = generate(model, ids, None, GenerationConfig(max_new_tokens=6, eos_token_ids=(49,)))
    top1 = generate(model, ids, None, GenerationConfig(max_new_tokens=6, do_sample=True, top_k=1, eos_token_ids=(49,)))
    assert top1.tolist() == greedy.tolist()


def test_gguf_qk_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_gguf_qk(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


@pytest.mark.parametrize("draft_kind", ["same", "int8", "int4", "other"])
def test_speculative_decoding_returns_the_models_greedy_tokens(draft_kind):
    from vlkit.decoders.quantize import quantize_int4, quantize_int8

    model = tiny(init_std=0.3)  # peaked logits: no near-ties between a one-token and a many-token forward
    draft = {"same": lambda: tiny(init_std=0.3), "int8": lambda: quantize_int8(tiny(init_std=0.3)),
             "int4": lambda: quantize_int4(tiny(init_std=0.3)),
             "other": lambda: CausalLM(DecoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                                     intermediate_size=24, max_position_embeddings=64))}[draft_kind]()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], pad_id=0)
    for new, eos in ((13, (49,)), (20, (7, 21))):  # lengths that are no multiple of num_draft + 1; end tokens
        cfg = GenerationConfig(max_new_tokens=new, eos_token_ids=eos)
        ref = generate(model, ids, mask, cfg)
        for k in (1, 3):
            stats = {}
            got = speculative_generate(model, draft, ids, mask, cfg, num_draft=k, stats=stats)
            assert got.tolist() == ref.tolist(), (draft_kind, new, k)
            assert stats["rounds"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"]
    rate = stats["accepted"] / stats["drafted"]
    assert rate == 1.0 if draft_kind == "same" else rate < 1.0  # the rollback path is exercised too
    if draft_kind != "other":  # a VLM passes its prompt as embeddings (read by a draft of the same width)
        embeds = model.embed_tokens(ids)
        assert speculative_generate(model, draft, ids, mask, cfg, 2, inputs_embeds=embeds).tolist() == ref.tolist()
    assert speculative_generate(model, draft, ids, mask, GenerationConfig(max_new_tokens=0)).shape == (3, 0)


def test_speculative_decoding_refuses_sampling_and_a_foreign_vocabulary():
    model = tiny()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="greedy"):
        speculative_generate(model, tiny(), ids, None, GenerationConfig(do_sample=True))
    other = CausalLM(DecoderConfig(vocab_size=60, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=24))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, other, ids, None, GenerationConfig(max_new_tokens=3))


def test_speculative_generation_config_stops_like_generate_and_redrafts_after_an_update():
    from vlkit.decoders.generate import quantized_draft
    from vlkit.decoders.quantize import Int4Linear, Int8Linear

    model = tiny(init_std=0.3)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    plain = generate(model, ids, mask, GenerationConfig(max_new_tokens=12))
    stop_at = int(plain[0, 4])  # row 0 stops at its 5th token (or earlier), as in generate

    def stop_fn(out):
        return (out == stop_at).any(1)

    ref = generate(model, ids, mask, GenerationConfig(max_new_tokens=12), stop_fn=stop_fn)
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=12, speculative=3), stop_fn=stop_fn)
    assert got.tolist() == ref.tolist() and bool(stop_fn(ref)[0])
    assert generate(model, ids, mask, GenerationConfig(max_new_tokens=12, speculative=2, draft_bits=8),
                    stop_fn=stop_fn).tolist() == ref.tolist()
    draft = quantized_draft(model)
    assert quantized_draft(model) is draft and isinstance(draft.blocks[0].mlp.fc, Int4Linear)  # kept
    assert draft.embed_tokens.weight.dtype == torch.bfloat16  # bfloat16 activations and cache around the int4 matmuls
    assert isinstance(quantized_draft(model, 8).blocks[0].mlp.fc, Int8Linear)
    draft = quantized_draft(model)
    with torch.no_grad():
        model.blocks[0].mlp.proj.weight.mul_(1.5)  # an in-place update (an optimizer step)
    assert quantized_draft(model) is not draft
    with pytest.raises(ValueError, match="draft_bits"):
        GenerationConfig(speculative=2, draft_bits=3)
    with pytest.raises(ValueError, match="greedy"):
        GenerationConfig(speculative=2, num_beams=2)
