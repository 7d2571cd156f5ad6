"""Memory per rank of full fine-tuning SmolLM2-135M: FSDP2 (``train.parallel=fsdp``) vs DDP, same run.

    .venv/bin/python benchmarks/bench_fsdp.py                     # 2 gloo processes on the CPU
    python benchmarks/bench_fsdp.py --nproc 8 --batch 64          # on 8 GPUs (NCCL), bf16 with --amp bf16

The script launches itself under ``torchrun`` twice, once per mode, on the same model (the
SmolLM2-135M-Instruct GGUF of ASSETS.md, dequantised to float32: 134.5M parameters, tied embeddings),
the same random token batches and the same :class:`vlkit.train.Trainer` settings (AdamW, every
parameter trained). Each rank counts, from the tensors themselves (a sharded tensor counts its
local shard), the bytes of parameters, of gradients (just before the optimizer step) and of AdamW
states it holds, and times its steps (median after the first). The table gives rank 0's figures and
the FSDP / DDP ratio; with N ranks the ideal ratio for sharded state is 1/N. Peak RSS is printed for
information: it includes the full model each rank builds before sharding (and, under FSDP, rank
0's unsharded copy for evaluation and checkpoints).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of ``length`` token ids (seeded: every mode sees the same batches)."""

    def __init__(self, n: int, length: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def lm_objective(model, batch):
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    return {"loss": F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())}


def rank_main(args) -> None:
    """One rank of one mode: train ``--steps`` steps, write this rank's figures as JSON."""
    from vlkit.decoders.loading import load_gguf
    from vlkit.tasks.vlm import smollm2_path
    from vlkit.train import TrainConfig, Trainer
    from vlkit.train import distributed as dist

    dist.init_distributed()
    model = load_gguf(smollm2_path())
    figures = {"grad_bytes": 0, "step_s": []}

    class Measured(Trainer):
        def _step(self, batch):
            start = time.perf_counter()
            done = super()._step(batch)
            figures["step_s"].append(time.perf_counter() - start)
            return done

        def _apply_update(self, scalars):
            figures["grad_bytes"] = sum(local_bytes(p.grad) for p in self.model.parameters())
            return super()._apply_update(scalars)

    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=1e-5, parallel=args.mode, amp=args.amp,
                      progress=False, checkpoint_every=10_000, log_every=1)
    data = Tokens(args.batch * args.steps, args.seq + 1, model.cfg.vocab_size)
    trainer = Measured(model, lm_objective, data, cfg, Path(args.out) / args.mode)
    summary = trainer.fit()
    state = trainer.optimizer.state.values()
    figures.update(
        mode=args.mode, rank=dist.rank(), world=dist.world_size(), loss=summary["last_train"]["loss"],
        param_bytes=sum(local_bytes(p) for p in trainer.model.parameters()),
        optim_bytes=sum(local_bytes(v) for s in state for v in s.values() if isinstance(v, torch.Tensor) and v.ndim),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        step_s=statistics.median(figures["step_s"][1:] or figures["step_s"]))
    (Path(args.out) / f"{args.mode}.rank{dist.rank()}.json").write_text(json.dumps(figures))
    dist.cleanup()


def launch(args, mode: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--rank-mode", mode, "--out", args.out, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--amp", args.amp]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    subprocess.run(cmd, check=True, env=env)


def report(args) -> None:
    rows = {m: json.loads((Path(args.out) / f"{m}.rank0.json").read_text()) for m in ("ddp", "fsdp")}
    mb = 2 ** 20
    print(f"\nSmolLM2-135M full fine-tuning, {args.nproc} ranks, global batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps, amp={args.amp}; rank 0's figures")
    print("| | DDP | FSDP2 | FSDP / DDP |\n|---|---|---|---|")
    for key, name in [("param_bytes", "parameters (MiB)"), ("grad_bytes", "gradients (MiB)"),
                      ("optim_bytes", "AdamW states (MiB)")]:
        a, b = rows["ddp"][key], rows["fsdp"][key]
        print(f"| {name} | {a / mb:,.1f} | {b / mb:,.1f} | {b / a:.3f} |")
    total = {m: sum(rows[m][k] for k in ("param_bytes", "grad_bytes", "optim_bytes")) for m in rows}
    print(f"| model state held (MiB) | {total['ddp'] / mb:,.1f} | {total['fsdp'] / mb:,.1f} | "
          f"{total['fsdp'] / total['ddp']:.3f} |")
    print(f"| peak RSS (MiB) | {rows['ddp']['peak_rss_bytes'] / mb:,.0f} | {rows['fsdp']['peak_rss_bytes'] / mb:,.0f} | "
          f"{rows['fsdp']['peak_rss_bytes'] / rows['ddp']['peak_rss_bytes']:.3f} |")
    print(f"| step time (s, median) | {rows['ddp']['step_s']:.3f} | {rows['fsdp']['step_s']:.3f} | "
          f"{rows['fsdp']['step_s'] / rows['ddp']['step_s']:.3f} |")
    print(f"| last loss | {rows['ddp']['loss']:.5f} | {rows['fsdp']['loss']:.5f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--out", default=None, help="folder for the per-rank figures (default: a temporary one)")
    p.add_argument("--rank-mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_mode:
        args.mode = args.rank_mode
        rank_main(args)
        return
    args.out = args.out or tempfile.mkdtemp(prefix="bench_fsdp_")
    for mode in ("ddp", "fsdp"):
        launch(args, mode)
    report(args)


if __name__ == "__main__":
    main()
