"""A tiny training run for the loop tests, run as a subprocess (SIGKILL, torchrun).

usage: _train_worker.py RUN_DIR [--steps N] [--kill-at S] [--resume] [--dropout P] [--accum K] [--batch B]
                        [--workers W] [--ckpt-every C] [--no-bad] [--no-noise] [--blocks] [--fsdp]
The main process writes RUN_DIR/final.safetensors, final_ema.safetensors (not with --fsdp) and summary.json.
"""
import argparse
import json
import os
import signal
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vlkit.data.base import TransformedDataset
from vlkit.train import TrainConfig, Trainer
from vlkit.train import distributed as dist


class Points(torch.utils.data.Dataset):
    """64 fixed random 8-d points with 4 classes; item 13 is unusable (None) unless ``with_bad`` is False."""

    def __init__(self, n=64, with_bad=True):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + 2 * (self.x[:, 1] > 0).long()
        self.with_bad = with_bad

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.with_bad and i == 13:
            return None
        return {"image": self.x[i], "label": int(self.y[i])}


def jitter(x, g):
    """A random per-sample augmentation drawing from the per-sample generator."""
    return x + 0.1 * torch.randn(x.shape, generator=g)


def batch_noise(batch, g):
    """A random batch transform (like Mixup) drawing from the loop's per-step (CPU) generator."""
    image = batch["image"]
    batch["image"] = image + 0.05 * torch.randn(image.shape, generator=g).to(image.device)
    return batch


def make_model(dropout: float) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 4))


class Blocks(nn.Module):
    """Embedding, two residual MLP blocks in a ModuleList (FSDP's sharding units), a head tied to nothing."""

    def __init__(self, dropout: float):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU(), nn.Dropout(dropout))
                                    for _ in range(2))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def objective(model, batch):
    logits = model(batch["image"])
    loss = F.cross_entropy(logits, batch["label"])
    return {"loss": loss, "acc": (logits.argmax(-1) == batch["label"]).float().mean()}


class KillingTrainer(Trainer):
    """SIGKILLs its own process when step ``kill_at`` starts: no cleanup, no atexit, like a crash."""

    kill_at = -1

    def _step(self, batch):
        if self.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._step(batch)


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--no-bad", action="store_true", help="no unusable sample (equal per-rank batch sizes)")
    p.add_argument("--no-noise", action="store_true", help="no batch transform (it is seeded per rank)")
    p.add_argument("--blocks", action="store_true", help="the Blocks model (a ModuleList)")
    p.add_argument("--fsdp", action="store_true", help="train.parallel=fsdp (no EMA)")
    return p.parse_args()


def main():
    a = parse()
    torch.set_num_threads(1)
    dist.init_distributed()
    data = TransformedDataset(Points(with_bad=not a.no_bad), jitter, seed=3)
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch, grad_accum_steps=a.accum, lr=1e-2, warmup_steps=2,
                      checkpoint_every=a.ckpt_every, keep_checkpoints=2, progress=False, log_every=1,
                      num_workers=a.workers, ema_decay=0.0 if a.fsdp else 0.9, clip_grad_norm=1.0,
                      parallel="fsdp" if a.fsdp else "ddp")
    model = Blocks(a.dropout) if a.blocks else make_model(a.dropout)
    trainer = KillingTrainer(model, objective, data, cfg, a.run_dir,
                             batch_transform=None if a.no_noise else batch_noise)
    trainer.kill_at = a.kill_at
    summary = trainer.fit(resume=a.resume)
    if dist.is_main():
        save_file({k: v.contiguous() for k, v in (trainer.final_model() if a.fsdp else trainer.model).state_dict().items()},
                  os.path.join(a.run_dir, "final.safetensors"))
        if trainer.ema is not None:
            save_file({k: v.contiguous() for k, v in trainer.ema.state_dict().items()},
                      os.path.join(a.run_dir, "final_ema.safetensors"))
        with open(os.path.join(a.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
