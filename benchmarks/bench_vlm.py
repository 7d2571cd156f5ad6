"""VLM training throughput: vlkit's VLM vs HF transformers' LlavaForConditionalGeneration, same model.

    .venv/bin/python benchmarks/bench_vlm.py                                  # CPU, preset tiny
    python benchmarks/bench_vlm.py --device cuda --preset smol --batch 32 [--compile]   # bf16, MFU

The LLaVA-1.5 recipe, stage 2: a CLIP ViT (frozen, last layer's patch tokens) -> 2-layer MLP
projector -> a Llama decoder (trained with the projector), the visual tokens spliced at the image
placeholders, the loss on the text tokens. HF's CLIP vision tower and Llama are built first (random
init, ``attn_implementation="sdpa"``) and saved; vlkit loads those folders, so the vision tower and
the decoder carry the same weights on both sides; the projector is copied: the loss difference on
one batch is printed as a check.
Presets: ``tiny`` = ViT d 192 x 6 layers at 224 px / 16 + Llama d 384 x 6 layers (GQA 6/2), 64 text
tokens; ``smol`` = CLIP ViT-B/16 + SmolLM2-135M's shape (d 576 x 30 layers, GQA 9/3), 128 text tokens.

A train step = forward on (images, ids) with labels, backward, AdamW (fused on CUDA). Timing as in
``bench_vit_cpu.py``: warm-up, interleaved rounds, the median; ratio = vlkit / HF. Tokens/s counts
the sequence the language model reads (196 visual + text tokens). MFU (CUDA) = analytic FLOP/s /
``--peak-tflops``: the frozen vision tower's forward once, the projector and decoder 3x (forward
+ backward).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench_vit_cpu import time_steps  # same folder: python puts the script's folder on sys.path

HF, VLKIT = "HF transformers LLaVA (sdpa)", "vlkit VLM"
PRESETS = {
    "tiny": dict(vision=dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768),
                 llm=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                          intermediate_size=1024), text=64),
    "smol": dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                 llm=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536), text=128),
}
VOCAB, PATCHES = 32000, (224 // 16) ** 2


def build_pair(preset: str, folder: Path):
    """(vlkit VLM, HF LLaVA) with the same vision tower and decoder weights; vision frozen on both."""
    import transformers

    from vlkit.tasks.vlm import VLMConfig, build_vlm
    from vlkit.config import from_dict

    p = PRESETS[preset]
    vision_cfg = transformers.CLIPVisionConfig(**p["vision"], image_size=224, patch_size=16, hidden_act="quick_gelu")
    text_cfg = transformers.CLIPTextConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=128)
    llm_cfg = transformers.LlamaConfig(**p["llm"], vocab_size=VOCAB + 1, max_position_embeddings=1024,
                                       tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision_cfg.to_dict(),
                                                          text_config=text_cfg.to_dict()))
    llama = transformers.LlamaForCausalLM(llm_cfg)
    clip.save_pretrained(folder / "clip", safe_serialization=True)
    llama.save_pretrained(folder / "llama", safe_serialization=True)
    cfg = from_dict(VLMConfig, {
        "vision": {"kind": "run", "path": str(folder / "clip")}, "connector": {"kind": "mlp"},
        "decoder": {"kind": "hf", "path": str(folder / "llama")},
        "tuning": {"vision": "frozen", "connector": "full", "decoder": "full"},
        "transform": {"image_size": 224}})
    ours = build_vlm(cfg)
    hf_cfg = transformers.LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=llm_cfg.to_dict(),
                                      image_token_id=VOCAB, vision_feature_layer=-1,
                                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                                      attn_implementation="sdpa")
    hf = transformers.LlavaForConditionalGeneration(hf_cfg)
    hf.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    hf.model.language_model.load_state_dict(llama.model.state_dict())
    hf.lm_head.load_state_dict(llama.lm_head.state_dict())
    proj = hf.model.multi_modal_projector
    proj.linear_1.load_state_dict(ours.connector.mlp.fc1.state_dict())
    proj.linear_2.load_state_dict(ours.connector.mlp.fc2.state_dict())
    tower = hf.model.vision_tower
    tower.requires_grad_(False)
    # vlkit's patch tokens pass the tower's final LayerNorm; LLaVA reads the last hidden state before
    # it: the norm is applied on HF's side too, so both compute the same model (and the same FLOPs)
    tower.encoder.layers[-1].register_forward_hook(
        lambda m, i, o: (tower.post_layernorm(o[0]), *o[1:]) if isinstance(o, tuple) else tower.post_layernorm(o))
    return ours, hf


@torch.no_grad()
def loss_diff(ours, hf) -> float:
    """|loss difference| of the two models on one batch: the same model on both sides?"""
    pixels, ids, mask, labels = batch(2, 16, torch.device("cpu"), VOCAB)
    ref = hf.eval()(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
    mine = ours.eval()(ids.masked_fill(ids == VOCAB, ours.image_token_id), mask, pixels, labels)["loss"]
    return abs(float(mine - ref))


def batch(n: int, text: int, device: torch.device, image_id: int):
    """Pixels and ids: the image's placeholders first, then ``text`` tokens, all labelled but the image."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(n, 3, 224, 224, generator=g)
    words = torch.randint(1, VOCAB, (n, text), generator=g)
    ids = torch.cat([torch.full((n, PATCHES), image_id), words], dim=1)
    labels = torch.cat([torch.full((n, PATCHES), -100), words], dim=1)
    return pixels.to(device), ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def make_step(model, args, device):
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    is_hf = type(model).__module__.startswith("transformers.")
    run = torch.compile(model) if args.compile else model
    pixels, ids, mask, labels = batch(args.batch, PRESETS[args.preset]["text"], device,
                                      VOCAB if is_hf else model.image_token_id)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            if is_hf:
                loss = run(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
            else:
                loss = run(ids, mask, pixels, labels)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_flops(preset: str) -> float:
    """Analytic FLOPs of one sequence's train step: vision forward once, projector + decoder 3x."""
    p = PRESETS[preset]
    v, m = p["vision"], p["llm"]
    seq = PATCHES + p["text"]

    def layers(c: dict, tokens: int, kv: float = 1.0) -> float:
        d, h = c["hidden_size"], c["intermediate_size"]
        mlp = 3 if "num_key_value_heads" in c else 2  # SwiGLU has three matrices
        return c["num_hidden_layers"] * (2 * tokens * ((2 + 2 * kv) * d * d + mlp * d * h) + 4 * tokens * tokens * d)

    vision = layers(v, PATCHES + 1) + 2 * PATCHES * 3 * 256 * v["hidden_size"]
    projector = 2 * PATCHES * (v["hidden_size"] * m["hidden_size"] + m["hidden_size"] ** 2)
    kv = m["num_key_value_heads"] / m["num_attention_heads"]
    decoder = layers(m, seq, kv) + 2 * seq * m["hidden_size"] * (VOCAB + 1)
    return vision + 3 * (projector + decoder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.amp = ("bf16" if args.device.startswith("cuda") else "none") if args.amp == "auto" else args.amp
    torch.set_num_threads(args.threads)
    import transformers

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        ours, hf = build_pair(args.preset, Path(d))
    diff = loss_diff(ours, hf)
    steps = {VLKIT: make_step(ours, args, device), HF: make_step(hf, args, device)}
    for step in steps.values():
        time_steps(step, device, args.warmup)
    samples = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            samples[name].append(args.batch / time_steps(steps[name], device, args.iters))
    med = {k: statistics.median(v) for k, v in samples.items()}
    seq = PATCHES + PRESETS[args.preset]["text"]
    command = shlex.join(["python", *sys.argv])
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(device)
    print(f"\n`{command}`\n\npreset {args.preset} ({step_flops(args.preset) / 1e9:.1f} GFLOP per sequence and step, "
          f"{seq} tokens), batch {args.batch}, {args.device}, amp={args.amp}, compile={args.compile}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"same model: |loss vlkit - loss HF| = {diff:.2e} on one batch; median of {args.rounds} interleaved "
          f"rounds x {args.iters} steps\n")
    cuda = device.type == "cuda"
    print("| model | train sequences/s | tokens/s | ratio vs HF |" + (" TFLOP/s | MFU |" if cuda else ""))
    print("|---|---|---|---|" + ("---|---|" if cuda else ""))
    rows = []
    for name, v in samples.items():
        tflops = step_flops(args.preset) * med[name] / 1e12
        rows.append({"model": name, "sequences_per_s": med[name], "tokens_per_s": med[name] * seq,
                     "ratio_vs_hf": med[name] / med[HF], "samples": v, "tflops": tflops,
                     **({"mfu": tflops / args.peak_tflops} if cuda else {})})
        extra = f" {tflops:.1f} | {100 * tflops / args.peak_tflops:.1f}% |" if cuda else ""
        print(f"| {name} | {med[name]:.2f} | {med[name] * seq:.0f} | {med[name] / med[HF]:.2f}x |{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "versions": versions, "args": vars(args), "loss_diff": diff, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
