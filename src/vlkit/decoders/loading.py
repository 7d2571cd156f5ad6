"""Language-model checkpoints -> :class:`~vlkit.decoders.causal_lm.CausalLM`: HF Llama and GPT-2
folders (config.json + safetensors) and GGUF files (llama.cpp's format, dequantised on load).

Each converter is a pure ``state_dict -> state_dict`` function followed by a strict load. vlkit
fuses q/k/v into one ``qkv`` projection and SwiGLU's gate/up into one ``fc``; GPT-2's Conv1D
weights are stored (in, out) and are transposed. llama.cpp's converter permutes the rows of the
Q and K projections (pairs interleaved for its RoPE kernel); :func:`unpermute_gguf_qk` undoes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.checkpoints.io import load_state_dict_strict, read_safetensors
from vlkit.decoders.causal_lm import CausalLM, DecoderConfig


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``*.safetensors`` shard of an HF folder, merged."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder} (pickled checkpoints are never read)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    return state


def llama_config(raw: dict[str, Any]) -> DecoderConfig:
    """DecoderConfig of an HF ``LlamaConfig`` dict (RoPE without scaling only)."""
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"RoPE scaling {kind!r} is not supported (default RoPE only)")
    cfg = DecoderConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"], max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_eps=raw.get("rms_norm_eps", 1e-6), mlp="swiglu", positions="rope",
        rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)), attn_bias=raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False), tie_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=_first(raw.get("eos_token_id")))
    if raw.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise ValueError(f"head_dim {raw['head_dim']} != hidden_size / num_heads = {cfg.head_dim} is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (silu)")
    return cfg


def _first(x):
    return x[0] if isinstance(x, list) else x


def convert_llama(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> CausalLM's."""
    out = {"embed_tokens.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        attn = [state[f"{hf}self_attn.{n}_proj.weight"] for n in "qkv"]
        out[ours + "attn.qkv.weight"] = torch.cat(attn)
        out[ours + "attn.proj.weight"] = state[hf + "self_attn.o_proj.weight"]
        if cfg.attn_bias:
            out[ours + "attn.qkv.bias"] = torch.cat([state[f"{hf}self_attn.{n}_proj.bias"] for n in "qkv"])
            out[ours + "attn.proj.bias"] = state[hf + "self_attn.o_proj.bias"]
        out[ours + "mlp.fc.weight"] = torch.cat([state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]])
        out[ours + "mlp.proj.weight"] = state[hf + "mlp.down_proj.weight"]
        if cfg.mlp_bias:
            out[ours + "mlp.fc.bias"] = torch.cat([state[hf + "mlp.gate_proj.bias"], state[hf + "mlp.up_proj.bias"]])
            out[ours + "mlp.proj.bias"] = state[hf + "mlp.down_proj.bias"]
        out[ours + "norm1.weight"] = state[hf + "input_layernorm.weight"]
        out[ours + "norm2.weight"] = state[hf + "post_attention_layernorm.weight"]
    return out


def gpt2_config(raw: dict[str, Any]) -> DecoderConfig:
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {raw['activation_function']!r} is not supported (gelu_new)")
    d = raw["n_embd"]
    return DecoderConfig(vocab_size=raw["vocab_size"], hidden_size=d, num_layers=raw["n_layer"], num_heads=raw["n_head"],
                         num_kv_heads=raw["n_head"], intermediate_size=raw.get("n_inner") or 4 * d,
                         max_position_embeddings=raw["n_positions"], norm="layernorm",
                         norm_eps=raw.get("layer_norm_epsilon", 1e-5), mlp="gelu", positions="learned",
                         attn_bias=True, mlp_bias=True, tie_embeddings=raw.get("tie_word_embeddings", True),
                         bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))


def convert_gpt2(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """HF ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict -> CausalLM's; Conv1D (in, out) transposed."""
    p = "transformer." if "transformer.wte.weight" in state else ""
    out = {"embed_tokens.weight": state[p + "wte.weight"], "pos_embed.weight": state[p + "wpe.weight"],
           "norm.weight": state[p + "ln_f.weight"], "norm.bias": state[p + "ln_f.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    pairs = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(cfg.num_layers):
        for hf, ours in pairs.items():
            w = state[f"{p}h.{i}.{hf}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = w if hf.startswith("ln") else w.t().contiguous()
            out[f"blocks.{i}.{ours}.bias"] = state[f"{p}h.{i}.{hf}.bias"]
    return out


def load_hf_llama(folder: str | Path) -> CausalLM:
    folder = Path(folder)
    cfg = llama_config(json.loads((folder / "config.json").read_text()))
    return causal_lm_from_state(cfg, convert_llama(read_folder_weights(folder), cfg), str(folder))


def load_hf_gpt2(folder: str | Path) -> CausalLM:
    folder = Path(folder)
    cfg = gpt2_config(json.loads((folder / "config.json").read_text()))
    return causal_lm_from_state(cfg, convert_gpt2(read_folder_weights(folder), cfg), str(folder))


def build_causal_lm(cfg: DecoderConfig) -> CausalLM:
    """A vlkit-format decoder folder's model (``architecture: causal_lm``)."""
    return CausalLM(cfg)


def causal_lm_from_state(cfg: DecoderConfig, state: dict[str, torch.Tensor], source: str) -> CausalLM:
    """A :class:`CausalLM` of ``cfg`` holding ``state`` (vlkit names; a tied head taken from the embedding)."""
    model = CausalLM(cfg)
    if cfg.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    load_state_dict_strict(model, state, source=source)
    return model.eval()


def unpermute_gguf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: per head, its rows were reordered from (2, D/2) to (D/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_metadata(reader) -> dict[str, Any]:
    """Scalar / string / small-array fields of a ``GGUFReader`` (token lists are left to the tokenizer)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.bos_token_id",
                                                             "tokenizer.ggml.eos_token_id",
                                                             "tokenizer.ggml.padding_token_id"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            continue
    return meta


def gguf_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> DecoderConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama)")
    heads = meta["llama.attention.head_count"]
    return DecoderConfig(
        vocab_size=vocab_size, hidden_size=meta["llama.embedding_length"], num_layers=meta["llama.block_count"],
        num_heads=heads, num_kv_heads=meta.get("llama.attention.head_count_kv", heads),
        intermediate_size=meta["llama.feed_forward_length"], max_position_embeddings=meta.get("llama.context_length", 2048),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), tie_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def convert_gguf(tensors: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Dequantised GGUF tensors (llama.cpp names) -> CausalLM's state dict."""
    out = {"embed_tokens.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tensors["output.weight"]
    for i in range(cfg.num_layers):
        b, ours = f"blk.{i}.", f"blocks.{i}."
        q = unpermute_gguf_qk(tensors[b + "attn_q.weight"], cfg.num_heads)
        k = unpermute_gguf_qk(tensors[b + "attn_k.weight"], cfg.num_kv_heads)
        out[ours + "attn.qkv.weight"] = torch.cat([q, k, tensors[b + "attn_v.weight"]])
        out[ours + "attn.proj.weight"] = tensors[b + "attn_output.weight"]
        out[ours + "mlp.fc.weight"] = torch.cat([tensors[b + "ffn_gate.weight"], tensors[b + "ffn_up.weight"]])
        out[ours + "mlp.proj.weight"] = tensors[b + "ffn_down.weight"]
        out[ours + "norm1.weight"] = tensors[b + "attn_norm.weight"]
        out[ours + "norm2.weight"] = tensors[b + "ffn_norm.weight"]
    return out


def read_gguf(path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(GGUFReader, {name: dequantised float32 tensor in PyTorch's (out, in) layout})."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest dimension first
        arr = dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
    return reader, tensors


def load_gguf(path: str | Path) -> CausalLM:
    """A llama-architecture GGUF file as a CausalLM (float32 weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    reader, tensors = read_gguf(path)
    cfg = gguf_config(gguf_metadata(reader), tensors["token_embd.weight"].shape[0], "output.weight" not in tensors)
    return causal_lm_from_state(cfg, convert_gguf(tensors, cfg), str(path))
