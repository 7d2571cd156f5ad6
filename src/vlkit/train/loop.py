"""The training loop every vlkit task uses.

``Trainer(model, objective, train_data, cfg, run_dir).fit()``: AdamW + warmup/cosine, per-group
learning rates, gradient accumulation and clipping, autocast on CUDA, optional EMA, DDP under
torchrun, metrics in ``run_dir/metrics.jsonl`` plotted to ``curves.png``, atomic checkpoints.

Exact resume: everything random in step s (data order, augmentation, Mixup, dropout) is a
function of (seed, s, rank), and step s always consumes global batch s mod steps_per_epoch of
epoch s // steps_per_epoch. A run killed at any point and resumed from its last checkpoint
therefore ends with the same weights, bit for bit, as a run never interrupted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlkit.checkpoints.io import load_state_dict_strict
from vlkit.data.base import collate, sample_seed
from vlkit.train import distributed as dist
from vlkit.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
from vlkit.train.config import TrainConfig
from vlkit.train.ema import ModelEMA
from vlkit.train.optim import build_optimizer, lr_at, set_lr
from vlkit.train.sampler import RankBatchSampler

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], dict]  # (model, batch) -> {"loss": scalar tensor, other scalars...}


def split_batch(batch: dict, n: int) -> list[dict]:
    """A collated batch -> ``n`` micro-batches (tensors and lists split along the first axis)."""
    if n == 1:
        return [batch]
    size = next(len(v) for k, v in batch.items() if k != "num_skipped")
    bounds = [round(i * size / n) for i in range(n + 1)]
    parts = []
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        parts.append({k: (v[lo:hi] if k != "num_skipped" else (v if i == 0 else 0)) for k, v in batch.items()})
    return parts


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Trains ``model`` on ``train_data`` by minimising ``objective(model, batch)["loss"]``.

    ``train_data``: a map-style dataset of sample dicts (``set_epoch(e)`` is called if present);
    ``collate_fn`` batches them (default :func:`vlkit.data.base.collate`, which drops ``None``);
    ``batch_transform(batch, generator)`` runs on each collated batch (e.g. Mixup);
    ``eval_fn(model) -> {name: float}`` runs on the main process every ``cfg.eval_every`` steps and
    at the end (on the EMA weights when EMA is on).
    """

    def __init__(self, model: nn.Module, objective: Objective, train_data, cfg: TrainConfig, run_dir: str | Path,
                 eval_fn: Optional[Callable[[nn.Module], dict]] = None, collate_fn=collate,
                 batch_transform: Optional[Callable[[dict, torch.Generator], dict]] = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.objective, self.train_data, self.eval_fn = objective, train_data, eval_fn
        self.collate_fn, self.batch_transform = collate_fn, batch_transform
        self.rank, self.world = dist.rank(), dist.world_size()
        if cfg.batch_size % (self.world * cfg.grad_accum_steps):
            raise ValueError(f"train.batch_size {cfg.batch_size} is not divisible by world size {self.world} x "
                             f"grad_accum_steps {cfg.grad_accum_steps}")
        self.steps_per_epoch = len(train_data) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size {cfg.batch_size} exceeds the {len(train_data)} training samples")
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self.device = dist.device()
        self.model = model.to(self.device)  # the unwrapped module: saved, evaluated, returned
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.wrapped = self._wrap(self.model)
        self.step, self.nonfinite_total, self.nonfinite_run, self.skipped = 0, 0, 0, 0
        self.elapsed, self.last_eval = 0.0, {}
        self._acc: dict[str, float] = {}

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if self.cfg.compile else model

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int, start: int) -> DataLoader:
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(epoch)
        sampler = RankBatchSampler(len(self.train_data), self.cfg.batch_size, self.cfg.seed, epoch, start,
                                   self.rank, self.world, self.cfg.repeated_aug)
        return DataLoader(self.train_data, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                          collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda")

    def _batches(self):
        """Yields this rank's batch of each remaining step, from ``self.step`` on."""
        step = self.step
        while step < self.total_steps:
            epoch, start = divmod(step, self.steps_per_epoch)
            for batch in self._loader(epoch, start):
                yield batch
                step += 1
                if step >= self.total_steps:
                    return

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.device.type != "cuda" or self.cfg.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16)

    def _micro_step(self, micro: dict, last: bool) -> dict:
        sync = self.wrapped.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
        with sync:
            with self._autocast():
                out = self.objective(self.wrapped, micro)
            loss = out["loss"].float() / self.cfg.grad_accum_steps
            self.scaler.scale(loss).backward()
        return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}

    def _step(self, batch: dict) -> bool:
        """One optimizer step on this rank's ``batch``; False when it was skipped (non-finite loss)."""
        seed = sample_seed(self.cfg.seed, self.step, self.rank)
        torch.manual_seed(seed)  # dropout / drop path: a function of (seed, step, rank)
        self.skipped += batch.get("num_skipped", 0)
        batch = to_device(batch, self.device)
        if self.batch_transform is not None:
            batch = self.batch_transform(batch, torch.Generator().manual_seed(seed))
        set_lr(self.optimizer, lr_at(self.step, self.cfg, self.total_steps))
        micros = split_batch(batch, self.cfg.grad_accum_steps)
        logs = [self._micro_step(m, i == len(micros) - 1) for i, m in enumerate(micros)]
        scalars = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}
        finite = dist.all_reduce_sum(float(not torch.isfinite(scalars["loss"]).item())) == 0
        if finite:
            self._apply_update(scalars)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return finite

    def _apply_update(self, scalars: dict) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm > 0:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            scalars["grad_norm"] = norm.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        for k, v in scalars.items():
            self._acc[k] = self._acc.get(k, 0.0) + v.item()
        self._acc["_n"] = self._acc.get("_n", 0) + 1

    # ------------------------------------------------------------------ bookkeeping
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    final_model = eval_model  # what a task exports: the EMA weights when EMA is on

    def _log(self, record: dict) -> None:
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_train(self, started: float, samples: int) -> None:
        n = self._acc.pop("_n", 0)
        means = {k: v / n for k, v in self._acc.items()} if n else {}
        self._acc = {}
        rate = samples / max(1e-9, time.time() - started)
        self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "train",
                   "lr": lr_at(self.step - 1, self.cfg, self.total_steps), **means, "samples_per_s": rate,
                   "elapsed_s": self.elapsed,
                   "batch_size": self.cfg.batch_size, "nonfinite_steps": self.nonfinite_total})

    def _evaluate(self) -> None:
        if self.eval_fn is not None and dist.is_main():
            metrics = self.eval_fn(self.eval_model())
            self.last_eval = metrics
            self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "val", **metrics,
                       "elapsed_s": self.elapsed})
            log.info("step %d val %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        dist.barrier()

    def _checkpoint(self) -> None:
        if dist.is_main():
            state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "skipped": self.skipped,
                     "elapsed_s": self.elapsed, "last_eval": self.last_eval, "world_size": self.world}
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.ema,
                            self.cfg.keep_checkpoints)
        dist.barrier()

    def _resume(self) -> None:
        latest = find_latest(self.run_dir)
        if latest is None:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
            return
        ckpt = load_checkpoint(latest)
        load_state_dict_strict(self.model, ckpt["model"], source=str(latest))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        s = ckpt["state"]
        self.step, self.nonfinite_total, self.skipped = s["step"], s["nonfinite_total"], s["skipped"]
        self.elapsed, self.last_eval = s["elapsed_s"], s["last_eval"]
        self._truncate_metrics()
        log.info("resumed from %s (step %d of %d)", latest, self.step, self.total_steps)

    def _truncate_metrics(self) -> None:
        """Drop metric lines a killed run wrote after its last checkpoint (they are recomputed)."""
        path = self.run_dir / "metrics.jsonl"
        if dist.is_main() and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict:
        """Train to ``total_steps``; returns a summary (steps, seconds, samples/s, skips, metrics)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and self.cfg.amp == "fp16")
        if resume:
            self._resume()
        elif (self.run_dir / "metrics.jsonl").exists() and dist.is_main():
            (self.run_dir / "metrics.jsonl").unlink()
        self.wrapped.train()
        start_step = self.step
        started = window = time.time()
        window_step = self.step
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.cfg.progress and dist.is_main()))
        for batch in self._batches():
            self._after_step(self._step(batch), bar)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self.elapsed += time.time() - window
                self._log_train(window, (self.step - window_step) * self.cfg.batch_size)
                window, window_step = time.time(), self.step
        bar.close()
        self.elapsed += time.time() - window
        if self.step > start_step or not self.last_eval:
            self._evaluate()
            self._checkpoint()
        self._plot()
        return self._summary(start_step, time.time() - started)

    def _after_step(self, finite: bool, bar) -> None:
        if finite:
            self.nonfinite_run = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning("step %d: non-finite loss, update skipped (%d in a row)", self.step, self.nonfinite_run)
            if self.nonfinite_run >= self.cfg.max_nonfinite:
                raise FloatingPointError(f"{self.nonfinite_run} consecutive non-finite losses at step {self.step}; "
                                         f"last good checkpoint: {find_latest(self.run_dir)}")
        bar.update(1)
        if self._acc.get("_n"):
            bar.set_postfix(loss=f"{self._acc['loss'] / self._acc['_n']:.4f}", refresh=False)
        if self.step < self.total_steps:
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                self._evaluate()
            if self.step % self.cfg.checkpoint_every == 0 and finite:
                self._checkpoint()

    def _plot(self) -> None:
        if dist.is_main() and (self.run_dir / "metrics.jsonl").exists():
            from vlkit.viz.curves import plot_metrics

            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")

    def _summary(self, start_step: int, seconds: float) -> dict:
        trained = self.step - start_step
        return {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "seconds": self.elapsed,
                "samples_per_s": trained * self.cfg.batch_size / max(seconds, 1e-9),
                "skipped_samples": int(dist.all_reduce_sum(self.skipped)), "nonfinite_steps": self.nonfinite_total,
                "last_eval": self.last_eval}
