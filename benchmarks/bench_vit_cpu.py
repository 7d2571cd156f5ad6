"""vlkit ViT vs HF transformers' ViT (and timm's on a GPU): train-step and inference images/s.

    .venv/bin/python benchmarks/bench_vit_cpu.py                      # ViT-Ti/16, 224 px, batch 32, CPU
    .venv/bin/python benchmarks/bench_vit_cpu.py --model vit_small
    python benchmarks/bench_vit_cpu.py --device cuda --model vit_base --batch 256 --amp bf16 --compile

Both models have the same configuration and the same weights (HF's converted into vlkit's; the
max |logit difference| is printed as a check). Measurements alternate between the models in
rounds and the median per model is reported, so machine noise hits both alike. A train step is
forward + cross-entropy + backward + AdamW step. The ratio column is vlkit / peer.
On CUDA, MFU = achieved model FLOP/s / peak (``--peak-tflops``, 989 = H100/H200 dense bf16), with
the model FLOPs counted analytically (matmuls and attention, x3 for a train step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def build_pair(args):
    """(vlkit model, HF model) with identical weights, and the vlkit config."""
    import transformers

    from vlkit.checkpoints.hf_vit import convert_hf_vit_state_dict, vit_config_from_hf
    from vlkit.encoders.vit import VisionTransformer, vit_config

    c = vit_config(args.model, image_size=args.image_size, num_classes=1000)
    hf_cfg = transformers.ViTConfig(hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                    intermediate_size=int(c.embed_dim * c.mlp_ratio), image_size=c.image_size,
                                    patch_size=c.patch_size, num_labels=c.num_classes, layer_norm_eps=1e-6,
                                    attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_cfg)
    cfg = vit_config_from_hf(hf_cfg.to_dict())
    ours = VisionTransformer(cfg)
    ours.load_state_dict(convert_hf_vit_state_dict(hf.state_dict(), cfg))
    return ours, hf, cfg


def build_timm(args):
    try:
        import timm
    except Exception as e:  # timm needs torchvision, which may not import (ASSETS.md)
        print(f"timm unavailable ({type(e).__name__}: {e}); skipping it")
        return None
    return timm.create_model(f"{args.model}_patch16_{args.image_size}", num_classes=1000)


class OneDNNOff(torch.nn.Module):
    """Runs the vlkit model with its oneDNN linear path disabled (plain F.linear), to show its share."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from vlkit.nn import layers

        saved, layers.ONEDNN_LINEAR = layers.ONEDNN_LINEAR, False
        try:
            return self.model(x)
        finally:
            layers.ONEDNN_LINEAR = saved


def logits_of(model, x):
    out = model(pixel_values=x) if "transformers" in type(model).__module__ else model(x)
    return out.logits if hasattr(out, "logits") else out


def vit_flops(cfg, batch: int) -> float:
    """Forward FLOPs of one batch: 2 x (multiply-adds of every matmul) + attention scores/values."""
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_layer = 2 * n * (4 * d * d + 2 * d * hidden) + 2 * 2 * n * n * d
    patch = 2 * (n - 1) * (cfg.in_chans * cfg.patch_size ** 2) * d
    return batch * (cfg.depth * per_layer + patch + 2 * d * cfg.num_classes)


def make_step(model, train: bool, args):
    device = torch.device(args.device)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda") if train else None
    run = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    model.train(train)

    def step():
        if train:
            with amp:
                loss = F.cross_entropy(logits_of(run, x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), amp:
                logits_of(run, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def time_step(step, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t) / iters


def measure(models: dict, train: bool, args) -> dict[str, float]:
    """images/s per model: warm-up, then ``rounds`` interleaved rounds, median."""
    steps = {name: make_step(m, train, args) for name, m in models.items()}
    for step in steps.values():
        time_step(step, args.warmup)
    samples = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            samples[name].append(args.batch / time_step(step, args.iters))
    return {name: statistics.median(v) for name, v in samples.items()}


def report(results: dict, cfg, args) -> list[dict]:
    rows = []
    peak = args.peak_tflops * 1e12
    for mode, rates in results.items():
        base = rates.get("HF transformers")
        for name, rate in rates.items():
            row = {"model": name, "mode": mode, "images_per_s": rate, "ratio_vs_hf": rate / base if base else None}
            if args.device == "cuda":
                row["mfu"] = rate / args.batch * vit_flops(cfg, args.batch) * (3 if mode == "train" else 1) / peak
            rows.append(row)
    print(f"\n{args.model}/16 @ {args.image_size}px, batch {args.batch}, {args.device}, amp={args.amp}, "
          f"compile={args.compile}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}\n")
    print("| model | mode | images/s | vlkit / HF |" + (" MFU |" if args.device == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for r in rows:
        mfu = f" {100 * r['mfu']:.1f}% |" if "mfu" in r else ""
        ratio = f"{r['ratio_vs_hf']:.2f}x" if r["ratio_vs_hf"] else "-"
        print(f"| {r['model']} | {r['mode']} | {r['images_per_s']:.1f} | {ratio} |{mfu}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny", help="vit_tiny | vit_small | vit_base")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours, hf, cfg = build_pair(args)
    x = torch.randn(2, 3, args.image_size, args.image_size)
    with torch.no_grad():
        diff = (logits_of(ours.eval(), x) - logits_of(hf.eval(), x)).abs().max().item()
    print(f"same weights: max |logit diff| vlkit vs HF = {diff:.2e}")
    models = {"vlkit": ours, "HF transformers": hf}
    if args.device == "cpu":
        models["vlkit, oneDNN linear off"] = OneDNNOff(copy.deepcopy(ours))
    if args.device == "cuda":
        timm_model = build_timm(args)
        if timm_model is not None:
            models["timm"] = timm_model
    results = {mode: measure(models, mode == "train", args) for mode in args.modes.split(",")}
    rows = report(results, cfg, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
