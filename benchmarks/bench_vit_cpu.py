"""vlkit ViT vs HF transformers' ViT (and timm's on a GPU): train-step and inference images/s.

    .venv/bin/python benchmarks/bench_vit_cpu.py                           # ViT-Ti/16, 224 px, batch 32, CPU
    .venv/bin/python benchmarks/bench_vit_cpu.py --model vit_small_patch16_224 --out vit_s.json
    python benchmarks/bench_vit_cpu.py --device cuda --model vit_base --batch 256 --compile   # bf16, MFU, timm

Both models are built from the same configuration and carry the same weights (HF's random init,
converted into vlkit's layout with ``vlkit.checkpoints.hf_vit``); the max |logit difference| is
printed as a check. HF runs with ``attn_implementation="sdpa"``, its fastest attention on CPU.
On CPU a third row runs the vlkit model with its oneDNN Linear (``vlkit.nn.layers``) switched off,
i.e. plain ``F.linear`` as with ``VLKIT_ONEDNN_LINEAR=0``, to show where the gain comes from.

Method: ``--warmup`` steps per model, then ``--rounds`` rounds; each round times ``--iters`` steps of
every model in turn (the order reverses every other round), and the median per model is reported, so
machine noise hits all models alike. A train step is forward + cross-entropy + backward + AdamW step
(``fused=True`` on CUDA); inference is a forward under ``torch.inference_mode()``. The ratio column
is images/s of that row / images/s of HF transformers.

On CUDA: bf16 autocast by default (``--amp``), optional ``torch.compile`` (``--compile``), timm's
``vit_*_patch16_224`` when timm imports, and MFU = model FLOP/s / ``--peak-tflops`` (989 = H100/H200
SXM dense bf16). Model FLOPs are analytic: forward = 2 x (multiply-adds of every matmul: qkv, proj,
MLP, patch embedding, head) + attention 2 x 2 x T^2 x D per layer; a train step counts 3x forward.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HF = "HF transformers (sdpa)"
VLKIT = "vlkit"
VLKIT_NO_ONEDNN = "vlkit, oneDNN linear off"
TIMM = "timm"


def parse_model(name: str, image_size: int | None) -> tuple[str, int, int]:
    """'vit_tiny' or timm-style 'vit_tiny_patch16_224' -> (VIT_CONFIGS name, patch size, image size)."""
    from vlkit.encoders.vit import VIT_CONFIGS

    patch, size = 16, 224
    if m := re.fullmatch(r"(.+)_patch(\d+)_(\d+)", name):
        name, patch, size = m.group(1), int(m.group(2)), int(m.group(3))
    vits = [n for n, c in VIT_CONFIGS.items() if not c.get("num_dist_tokens") and not c.get("class_attn_depth")]
    if name not in vits:
        raise SystemExit(f"--model {name!r}: expected one of {vits} (optionally as <name>_patch16_224)")
    return name, patch, image_size or size


def build_pair(args):
    """(vlkit model, HF model, vlkit config): one configuration, identical weights."""
    import transformers

    from vlkit.checkpoints.hf_vit import HF_ACTIVATIONS, convert_hf_vit_state_dict, vit_config_from_hf
    from vlkit.encoders.vit import VisionTransformer, vit_config

    cfg = vit_config(args.arch, image_size=args.image_size, patch_size=args.patch_size, num_classes=1000)
    hf_act = {v: k for k, v in reversed(list(HF_ACTIVATIONS.items()))}[cfg.act]
    hf_cfg = transformers.ViTConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, num_labels=cfg.num_classes, qkv_bias=cfg.qkv_bias, hidden_act=hf_act,
        layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        architectures=["ViTForImageClassification"], attn_implementation="sdpa")
    back = vit_config_from_hf(hf_cfg.to_dict())  # the project's own HF -> vlkit mapping must give cfg back
    if dataclasses.replace(back, dist_head=cfg.dist_head) != cfg:  # dist_head is moot without a dist token
        raise SystemExit(f"HF config does not map back to the vlkit config:\n  {back}\n  {cfg}")
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_cfg)
    if hf.config._attn_implementation != "sdpa":
        raise SystemExit(f"HF model uses attention {hf.config._attn_implementation!r}, expected 'sdpa'")
    ours = VisionTransformer(cfg)
    ours.load_state_dict(convert_hf_vit_state_dict(hf.state_dict(), cfg), strict=True)
    return ours, hf, cfg


def build_timm(args, ours):
    """timm's ViT of the same architecture with vlkit's weights (same key names), or None."""
    try:
        import timm
    except Exception as e:  # not installed, or torchvision does not import
        print(f"timm unavailable ({type(e).__name__}: {e}); skipping the timm row")
        return None
    model = timm.create_model(f"{args.arch}_patch{args.patch_size}_{args.image_size}", pretrained=False,
                              num_classes=1000)
    try:
        model.load_state_dict(ours.state_dict(), strict=True)
    except RuntimeError as e:
        print(f"timm: vlkit weights do not load strictly ({str(e).splitlines()[0]}); timm keeps its own init")
    return model


class OneDNNOff(torch.nn.Module):
    """The vlkit model with its oneDNN Linear path switched off for the duration of its forward
    (so its backward too: the autograd function is chosen in the forward), as VLKIT_ONEDNN_LINEAR=0."""

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


def is_hf(model) -> bool:
    return type(model).__module__.startswith("transformers.")


def logits_of(model, x, hf: bool | None = None):
    """Logits (B, classes) of a vlkit/timm model or of a (possibly compiled) HF one."""
    if hf if hf is not None else is_hf(model):
        return model(pixel_values=x).logits
    return model(x)


def vit_flops(cfg) -> float:
    """Forward FLOPs of one image: 2 x multiply-adds of the matmuls + attention (scores and values)."""
    n = (cfg.image_size // cfg.patch_size) ** 2
    t = n + cfg.num_prefix_tokens
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_layer = 2 * t * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * t * t * d
    patch = 2 * n * cfg.in_chans * cfg.patch_size ** 2 * d
    return cfg.depth * per_layer + patch + 2 * d * cfg.num_classes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, train: bool, args):
    """A closure running one train step (or inference forward) of ``model`` on a fixed batch."""
    device = torch.device(args.device)
    model = model.to(device).train(train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda") if train else None
    hf = is_hf(model)
    run = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    amp_on = args.amp == "bf16"

    def step():
        if train:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_on):
                loss = F.cross_entropy(logits_of(run, x, hf).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_on):
                logits_of(run, x, hf)
    return step, device


def time_steps(step, device, iters: int) -> float:
    """Seconds per step over ``iters`` steps."""
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t) / iters


def measure(models: dict, train: bool, args) -> dict[str, list[float]]:
    """images/s samples per model: warm-up, then ``rounds`` interleaved rounds."""
    steps = {name: make_step(m, train, args) for name, m in models.items()}
    for step, device in steps.values():
        time_steps(step, device, args.warmup)
    samples = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step, device = steps[name]
            samples[name].append(args.batch / time_steps(step, device, args.iters))
    for m in models.values():  # free gradients (and optimiser state with the closures) before the next mode
        m.zero_grad(set_to_none=True)
    return samples


def report(samples: dict, cfg, args, command: str, versions: dict, diff: float, scale: float) -> list[dict]:
    cuda = args.device.startswith("cuda")
    rows = []
    for mode, per_model in samples.items():
        med = {name: statistics.median(v) for name, v in per_model.items()}
        for name, v in per_model.items():
            flops = vit_flops(cfg) * (3 if mode == "train" else 1) * med[name]
            row = {"model": name, "mode": mode, "images_per_s": med[name],
                   "ratio_vs_hf": med[name] / med[HF], "min": min(v), "max": max(v), "samples": v,
                   "tflops": flops / 1e12}
            if cuda:
                row["mfu"] = flops / (args.peak_tflops * 1e12)
            rows.append(row)
    gflop = vit_flops(cfg) / 1e9
    print(f"\n`{command}`\n")
    print(f"{args.arch}/{cfg.patch_size} @ {cfg.image_size}px (D={cfg.embed_dim}, depth={cfg.depth}, "
          f"heads={cfg.num_heads}, {gflop:.2f} GFLOP/img fwd), batch {args.batch}, device {args.device}, "
          f"amp={args.amp}, compile={args.compile}, threads={torch.get_num_threads()}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"same weights: max |logit diff| vlkit vs HF = {diff:.2e} (max |logit| {scale:.2f}); "
          f"median of {args.rounds} interleaved rounds x {args.iters} steps after {args.warmup} warm-up steps\n")
    head = "| model | mode | images/s | ratio vlkit/HF | min-max images/s |" + (" TFLOP/s | MFU |" if cuda else "")
    print(head)
    print("|" + "---|" * head.count(" |"))
    for r in rows:
        extra = f" {r['tflops']:.1f} | {100 * r['mfu']:.1f}% |" if cuda else ""
        print(f"| {r['model']} | {r['mode']} | {r['images_per_s']:.1f} | {r['ratio_vs_hf']:.2f}x | "
              f"{r['min']:.1f}-{r['max']:.1f} |{extra}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_tiny", help="vit_tiny | vit_small | vit_base, or e.g. vit_small_patch16_224")
    p.add_argument("--image-size", type=int, default=None, help="default: from the model name, else 224")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"], help="auto: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and mode")
    p.add_argument("--iters", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median is reported")
    p.add_argument("--modes", default="train,infer", help="comma-separated: train, infer")
    p.add_argument("--no-onednn-row", action="store_true", help="CPU: skip the 'vlkit, oneDNN linear off' row")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100/H200 bf16 dense)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args()
    args.arch, args.patch_size, args.image_size = parse_model(args.model, args.image_size)
    if args.amp == "auto":
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    torch.set_num_threads(args.threads)
    import transformers

    from vlkit.nn import layers

    command = shlex.join(["python", *sys.argv])
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    ours, hf, cfg = build_pair(args)
    x = torch.randn(4, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = logits_of(hf.eval(), x)
        diff = (logits_of(ours.eval(), x) - ref).abs().max().item()
    scale = ref.abs().max().item()
    models = {VLKIT: ours, HF: hf}
    if args.device == "cpu" and not args.no_onednn_row:
        if layers.ONEDNN_LINEAR:
            models[VLKIT_NO_ONEDNN] = OneDNNOff(copy.deepcopy(ours))
        else:
            print("vlkit's oneDNN linear is already off (VLKIT_ONEDNN_LINEAR=0 or no mkldnn); no extra row")
    if args.device.startswith("cuda"):
        versions["gpu"] = torch.cuda.get_device_name(args.device)
        timm_model = build_timm(args, ours)
        if timm_model is not None:
            import timm

            versions["timm"] = timm.__version__
            with torch.no_grad():
                print(f"timm: max |logit diff| vs HF = {(timm_model.eval()(x) - ref).abs().max().item():.2e}")
            models[TIMM] = timm_model
    versions["vlkit oneDNN linear"] = layers.ONEDNN_LINEAR
    samples = {mode: measure(models, mode == "train", args) for mode in args.modes.split(",")}
    rows = report(samples, cfg, args, command, versions, diff, scale)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "argv": sys.argv, "versions": versions, "args": vars(args),
                       "cpu": platform.processor() or platform.machine(), "max_abs_logit_diff": diff,
                       "max_abs_logit": scale,
                       "fwd_gflop_per_image": vit_flops(cfg) / 1e9, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
