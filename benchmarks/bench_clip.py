"""vlkit CLIP vs HF transformers' CLIPModel: contrastive train-step pairs/s on the same configuration.

    .venv/bin/python benchmarks/bench_clip.py                       # CPU: ViT-Ti/16 + 6-layer text, batch 32
    python benchmarks/bench_clip.py --device cuda --preset b16 --batch 256 [--compile]   # bf16, MFU

Presets: ``tiny`` = ViT-Ti/16 at 224 px (D 192, 12 layers) + text tower D 256, 6 layers, 77 tokens,
embed 256; ``b16`` = ViT-B/16 at 224 px + OpenAI's 12-layer D 512 text tower, embed 512 (CLIP ViT-B/16).
HF's model is built first (random init, ``attn_implementation="sdpa"``) and saved; vlkit loads that
folder with ``vlkit.load`` (its HF CLIP converter), so both carry the same weights: the max |diff|
of the image and text features is printed as a check.

A train step = both towers forward on (images, 77-token captions), the symmetric InfoNCE loss
(HF: ``return_loss=True``; vlkit: ``ClipLoss``), backward, AdamW (fused on CUDA). Timing as in
``bench_vit_cpu.py``: warm-up, then interleaved rounds, the median reported; ratio = vlkit / HF.
MFU (CUDA) = analytic model FLOP/s (3x forward per train step) / ``--peak-tflops``.
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

import torch

from bench_vit_cpu import time_steps  # same folder: python puts the script's folder on sys.path

HF, VLKIT = "HF transformers (sdpa)", "vlkit"
PRESETS = {
    "tiny": dict(vision=dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
                 text=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024),
                 projection_dim=256),
    "b16": dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
                projection_dim=512),
}
CONTEXT, VOCAB, EOS = 77, 49408, 49407


def build_pair(preset: str):
    """(vlkit CLIP, HF CLIPModel) with identical weights."""
    import transformers

    import vlkit

    p = PRESETS[preset]
    cfg = transformers.CLIPConfig(
        vision_config=dict(**p["vision"], image_size=224, patch_size=16, hidden_act="quick_gelu"),
        text_config=dict(**p["text"], vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
                         eos_token_id=EOS, bos_token_id=EOS - 1, pad_token_id=0),
        projection_dim=p["projection_dim"], attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        ours = vlkit.load(d)
    return ours, hf


def batch(n: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(n, 3, 224, 224, generator=g)
    lengths = torch.randint(8, CONTEXT, (n,), generator=g)
    ids = torch.randint(1, EOS - 1, (n, CONTEXT), generator=g)
    ids[:, 0] = EOS - 1
    ids[torch.arange(n), lengths] = EOS
    mask = torch.arange(CONTEXT)[None] <= lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    return pixels.to(device), ids.to(device), mask.long().to(device)


def make_step(model, args, device):
    from vlkit.losses.contrastive import ClipLoss

    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    is_hf = type(model).__module__.startswith("transformers.")
    run = torch.compile(model) if args.compile else model
    pixels, ids, mask = batch(args.batch, device)
    loss_fn = ClipLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            if is_hf:
                loss = run(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True).loss
            else:
                out = run(pixels, ids, mask)
                loss = loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def clip_flops(preset: str) -> float:
    """Forward FLOPs of one (image, caption) pair: 2 x matmul multiply-adds + attention, both towers."""
    p = PRESETS[preset]

    def tower(c: dict, tokens: int) -> float:
        d, h = c["hidden_size"], c["intermediate_size"]
        return c["num_hidden_layers"] * (2 * tokens * (4 * d * d + 2 * d * h) + 4 * tokens * tokens * d)

    patches = (224 // 16) ** 2
    v, t = p["vision"]["hidden_size"], p["text"]["hidden_size"]
    return (tower(p["vision"], patches + 1) + tower(p["text"], CONTEXT) + 2 * patches * 3 * 256 * v
            + 2 * p["projection_dim"] * (v + t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.amp = ("bf16" if args.device.startswith("cuda") else "none") if args.amp == "auto" else args.amp
    torch.set_num_threads(args.threads)
    import transformers

    device = torch.device(args.device)
    ours, hf = build_pair(args.preset)
    pixels, ids, mask = batch(4, torch.device("cpu"))
    with torch.no_grad():
        ref_i, ref_t = hf.eval().get_image_features(pixel_values=pixels), hf.get_text_features(input_ids=ids,
                                                                                                attention_mask=mask)
        ref_i, ref_t = getattr(ref_i, "pooler_output", ref_i), getattr(ref_t, "pooler_output", ref_t)
        diff = max((ours.eval().encode_image(pixels) - ref_i).abs().max().item(),
                   (ours.encode_text(ids, mask) - ref_t).abs().max().item())
    steps = {VLKIT: make_step(ours, args, device), HF: make_step(hf, args, device)}
    for step in steps.values():
        time_steps(step, device, args.warmup)
    samples = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            samples[name].append(args.batch / time_steps(steps[name], device, args.iters))
    med = {k: statistics.median(v) for k, v in samples.items()}
    command = shlex.join(["python", *sys.argv])
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(device)
    print(f"\n`{command}`\n\npreset {args.preset} ({clip_flops(args.preset) / 1e9:.2f} GFLOP/pair fwd), batch "
          f"{args.batch}, {args.device}, amp={args.amp}, compile={args.compile}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"same weights: max |feature diff| vlkit vs HF = {diff:.2e}; median of {args.rounds} interleaved rounds "
          f"x {args.iters} steps\n")
    cuda = device.type == "cuda"
    print("| model | train pairs/s | ratio vs HF | min-max |" + (" TFLOP/s | MFU |" if cuda else ""))
    print("|---|---|---|---|" + ("---|---|" if cuda else ""))
    rows = []
    for name, v in samples.items():
        tflops = 3 * clip_flops(args.preset) * med[name] / 1e12
        rows.append({"model": name, "pairs_per_s": med[name], "ratio_vs_hf": med[name] / med[HF], "samples": v,
                     "tflops": tflops, **({"mfu": tflops / args.peak_tflops} if cuda else {})})
        extra = f" {tflops:.1f} | {100 * tflops / args.peak_tflops:.1f}% |" if cuda else ""
        print(f"| {name} | {med[name]:.1f} | {med[name] / med[HF]:.2f}x | {min(v):.1f}-{max(v):.1f} |{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "versions": versions, "args": vars(args), "max_abs_diff": diff,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
