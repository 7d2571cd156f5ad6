"""The training loop every vlkit task uses.

``Trainer(model, objective, train_data, cfg, run_dir).fit()``: AdamW + warmup/cosine, per-group
learning rates (0 freezes), gradient accumulation and clipping, autocast on CUDA, optional EMA, DDP or
FSDP2 (``parallel=fsdp``, :mod:`vlkit.train.fsdp`) under torchrun, metrics in ``run_dir/metrics.jsonl``
plotted to ``run_dir/curves.png``, atomic safetensors checkpoints in ``run_dir/checkpoints``.

Exact resume: everything random in step s is a function of (seed, s, rank): the data order
(:mod:`vlkit.train.sampler`, global batch ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``),
sample augmentation (:class:`vlkit.data.base.TransformedDataset` seeds by (seed, epoch, index)), the
batch transform's generator and dropout (the global RNG is re-seeded before each step). A run killed
at any point and resumed from its last checkpoint ends with the same weights, bit for bit, as a run
never interrupted.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlkit.checkpoints.io import check_state_dict, load_state_dict_strict
from vlkit.config import ConfigError, to_dict
from vlkit.data.base import collate, sample_seed
from vlkit.train import distributed as dist
from vlkit.train import fsdp
from vlkit.train.checkpoint import find_latest, load_checkpoint, remove_partial, restore_rng, save_checkpoint
from vlkit.train.config import TrainConfig
from vlkit.train.ema import ModelEMA
from vlkit.train.optim import build_optimizer, lr_at, set_lr
from vlkit.train.sampler import LengthGroupedSampler, RepeatedAugSampler, RepeatedCopies, ResumableSampler

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], dict]  # (model, batch) -> {"loss": scalar tensor, other scalars...}
EvalFn = Callable[[nn.Module], dict]  # model -> {metric name: float}
BatchTransform = Callable[[dict, torch.Generator], dict]  # (batch, generator) -> batch (e.g. Mixup)


class NonFiniteLossError(FloatingPointError):
    """``max_nonfinite`` consecutive steps had a non-finite loss (or gradient norm): training stopped."""


def batch_len(batch: dict) -> int:
    """Number of samples of a collated batch (0 when every sample was ``None``)."""
    return next((len(v) for k, v in batch.items() if k != "num_skipped"), 0)


def split_batch(batch: dict, n: int) -> list[dict]:
    """A collated batch -> ``min(n, its samples)`` non-empty micro-batches (tensors and lists split along axis 0)."""
    size = batch_len(batch)
    n = max(1, min(n, size))
    if n == 1:
        return [batch]
    bounds = [round(i * size / n) for i in range(n + 1)]
    return [{k: v[lo:hi] for k, v in batch.items()} for lo, hi in zip(bounds, bounds[1:])]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _minimised(name: str) -> bool:
    """Best-metric direction: names with "loss" or "err" are minimised, the others maximised."""
    return "loss" in name or "err" in name


class Trainer:
    """Trains ``model`` on ``train_data`` by minimising ``objective(model, batch)["loss"]``.

    ``train_data``: a map-style dataset of sample dicts (``set_epoch(e)`` is called if present);
    ``collate_fn`` batches them (default :func:`vlkit.data.base.collate`, which drops ``None`` samples
    and sets ``batch["num_skipped"]``); ``batch_transform(batch, generator)`` runs on each rank's collated
    batch (already on the device) with a CPU ``torch.Generator`` seeded from (seed, step, rank); ``objective`` returns
    ``{"loss": 0-d tensor, <name>: 0-d tensor or float, ...}``, all logged; ``eval_fn(model) ->
    {name: float}`` runs on the main process (on every process if ``eval_fn.all_ranks`` is True) every
    ``cfg.eval_every`` steps and at the end, on the EMA weights when EMA is on. ``lengths``: each
    sample's length (e.g. its tokens), for ``cfg.group_by_length``.

    ``cfg.parallel == "fsdp"`` with several processes: ``model`` is sharded in place (FSDP2); the main
    process keeps an unsharded copy on the CPU, refreshed (all ranks gathering) before each evaluation and
    checkpoint and at the end: :meth:`eval_model` / :meth:`final_model` return it there (moved whole to the
    training device for evaluation and after ``fit``), and the sharded module on the other ranks (usable
    only in collectives with every rank: use the main rank's).
    """

    def __init__(self, model: nn.Module, objective: Objective, train_data, cfg: TrainConfig, run_dir: str | Path,
                 eval_fn: Optional[EvalFn] = None, collate_fn: Callable = collate,
                 batch_transform: Optional[BatchTransform] = None, lengths: Optional[Sequence[int]] = None):
        self.cfg, self.run_dir, self.ckpt_dir = cfg, Path(run_dir), Path(run_dir) / "checkpoints"
        self.objective, self.train_data, self.eval_fn = objective, train_data, eval_fn
        self.collate_fn, self.batch_transform = collate_fn, batch_transform
        self.rank, self.world = dist.rank(), dist.world_size()
        self._check_batch(len(train_data))
        self.data = RepeatedCopies(train_data, cfg.repeated_aug) if cfg.repeated_aug > 1 else train_data
        self.sampler = self._make_sampler(len(train_data), lengths)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        self.total_steps = cfg.total_steps(self.steps_per_epoch)
        self.device = dist.device()
        self.amp_dtype = self._amp_dtype()
        self.sharded = cfg.parallel == "fsdp" and self.world > 1
        self.full_copy = copy.deepcopy(model).cpu() if self.sharded and dist.is_main() else None
        self._gathered_at = -1  # the step whose weights full_copy holds
        self.model = model if self.sharded else model.to(self.device)  # the unwrapped module: saved, evaluated
        if self.sharded:  # fully_shard moves one unit at a time and keeps its shard: the whole model never
            fsdp.shard(self.model, self.device, self.world, self.amp_dtype)  # sits on the accelerator
            self.model.to(self.device)  # buffers no unit manages
        self.optimizer = build_optimizer(self.model, cfg)
        if self.full_copy is not None:  # the same frozen parameters (lr_scale 0 groups)
            flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
            for n, p in self.full_copy.named_parameters():
                p.requires_grad_(flags[n])
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.wrapped = self._wrap(self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._loader_gen = torch.Generator()
        self.loader = DataLoader(self.data, batch_size=cfg.batch_size // self.world, sampler=self.sampler,
                                 num_workers=cfg.num_workers, collate_fn=collate_fn, drop_last=False,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False,
                                 generator=self._loader_gen)
        self.step, self.nonfinite_total, self.nonfinite_run, self.skipped = 0, 0, 0, 0
        self.elapsed, self.last_eval, self.last_train, self.best = 0.0, {}, {}, {}
        self._acc: dict[str, float] = {}
        self._window = (time.time(), 0)  # (wall clock, step) at the start of the current log window
        self._ckpt_pending = False

    # ------------------------------------------------------------------ set-up
    def _check_batch(self, length: int) -> None:
        cfg = self.cfg
        if cfg.batch_size % (self.world * cfg.grad_accum_steps):
            raise ConfigError("batch_size", f"{cfg.batch_size} is not divisible by world size {self.world} x "
                                            f"grad_accum_steps {cfg.grad_accum_steps}")
        if cfg.batch_size > length:
            raise ConfigError("batch_size", f"global batch {cfg.batch_size} exceeds the {length} training samples")

    def _make_sampler(self, length: int, lengths: Optional[Sequence[int]]) -> ResumableSampler:
        kw = dict(num_replicas=self.world, rank=self.rank, seed=self.cfg.seed, shuffle=True, drop_last=True,
                  batch_size=self.cfg.batch_size)
        if self.cfg.group_by_length:
            if lengths is None or len(lengths) != length:
                raise ConfigError("group_by_length", "this task gives no sample lengths to group by")
            return LengthGroupedSampler(lengths, group=self.cfg.group_by_length, **kw)
        if self.cfg.repeated_aug > 1:
            return RepeatedAugSampler(length, repeats=self.cfg.repeated_aug, encode_copies=True, **kw)
        return ResumableSampler(length, **kw)

    def _amp_dtype(self) -> Optional[torch.dtype]:
        if self.cfg.amp == "none":
            return None
        if self.device.type != "cuda":
            log.info("amp=%s needs CUDA: training in float32 on %s", self.cfg.amp, self.device)
            return None
        return torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world > 1 and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if self.cfg.compile else model

    # ------------------------------------------------------------------ data
    def _set_epoch(self, epoch: int, start: int) -> None:
        """Select epoch ``epoch`` (dataset augmentation, sampler order) from global batch ``start`` on."""
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        self._loader_gen.manual_seed(sample_seed(self.cfg.seed, epoch, 1))  # worker base seeds

    def _batches(self):
        """This rank's batch of each remaining step, from ``self.step`` on."""
        step = self.step
        while step < self.total_steps:
            self._set_epoch(*divmod(step, self.steps_per_epoch))
            for batch in self.loader:
                yield batch
                step += 1
                if step >= self.total_steps:
                    return

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _micro_step(self, micro: dict, last: bool, n: int) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch (loss scaled by 1/n); returns its detached scalars."""
        sync = contextlib.nullcontext()
        if self.sharded:  # reduce-scatter the gradients on the last micro-batch only
            self.model.set_requires_gradient_sync(last)
        elif self.world > 1 and not last:
            sync = self.wrapped.no_sync()
        with sync:
            with self._autocast():
                out = self.objective(self.wrapped, micro)
            if "loss" not in out:
                raise KeyError(f"the objective must return a dict with 'loss'; got keys {sorted(out)}")
            self.scaler.scale(out["loss"].float() / n).backward()
        return {k: torch.as_tensor(v).detach().float().reshape(()) for k, v in out.items()
                if isinstance(v, (float, int)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}

    def _step(self, batch: dict) -> bool:
        """One optimizer step on this rank's ``batch``. False when its update was skipped (non-finite)."""
        seed = sample_seed(self.cfg.seed, self.step, self.rank)
        torch.manual_seed(seed)  # dropout / drop path: a function of (seed, step, rank)
        num_skipped = batch.pop("num_skipped", 0)
        if batch_len(batch) == 0:
            return self._empty_step(num_skipped)
        batch = to_device(batch, self.device)
        if self.batch_transform is not None:
            batch = self.batch_transform(batch, torch.Generator().manual_seed(seed ^ 0xB47C))
        set_lr(self.optimizer, lr_at(self.step, self.cfg, self.total_steps))
        micros = split_batch(batch, self._micro_count(batch_len(batch)))
        logs = [self._micro_step(m, i == len(micros) - 1, len(micros)) for i, m in enumerate(micros)]
        scalars = {k: torch.stack([d[k] for d in logs]).mean() for k in logs[0]}
        finite, scalars = self._reduce(scalars, num_skipped)
        if finite:
            finite = self._apply_update(scalars)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return finite

    def _micro_count(self, size: int) -> int:
        """Micro-batches of this step: ``grad_accum_steps``, fewer when samples were dropped. Sharded, every
        rank runs the same number (each forward gathers the weights with all ranks): the fewest of any rank."""
        n = max(1, min(self.cfg.grad_accum_steps, size))
        if self.sharded and self.cfg.grad_accum_steps > 1:
            n = int(dist.all_reduce_min([n])[0])
        return n

    def _empty_step(self, num_skipped: int) -> bool:
        if self.world > 1:
            raise RuntimeError(f"step {self.step}: every sample of rank {self.rank}'s batch is unusable (None); "
                               "DDP cannot skip a step on one rank only (use a larger batch)")
        log.warning("step %d: every sample of the batch is unusable (None): no update", self.step)
        self.skipped += num_skipped
        self.step += 1
        return True

    def _reduce(self, scalars: dict[str, torch.Tensor], num_skipped: int) -> tuple[bool, dict[str, float]]:
        """One collective: (all ranks' losses finite?, scalars averaged over ranks); counts skipped samples."""
        keys = sorted(scalars)
        local = torch.stack([scalars[k] for k in keys]).cpu().tolist()
        bad = 0.0 if math.isfinite(local[keys.index("loss")]) else 1.0
        total = dist.all_reduce_sum([bad, num_skipped, *local])
        self.skipped += int(total[1])
        return total[0] == 0, {k: v / self.world for k, v in zip(keys, total[2:])}

    def _apply_update(self, scalars: dict[str, float]) -> bool:
        """Unscale, clip, step, EMA. False (no update) when the gradient norm is not finite."""
        self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm > 0:
            norm = nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                            self.cfg.clip_grad_norm)
            norm = fsdp.full(norm).item()
            if not math.isfinite(norm) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
                return False
            scalars["grad_norm"] = norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        for k, v in scalars.items():
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._acc["_n"] = self._acc.get("_n", 0) + 1
        self.last_train = scalars
        return True

    # ------------------------------------------------------------------ after a step
    def _after_step(self, finite: bool, bar) -> None:
        self._count_nonfinite(finite)
        bar.update(1)
        if "loss" in self.last_train:
            bar.set_postfix(loss=f"{self.last_train['loss']:.4f}", refresh=False)
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            self._log_train()
        if self.step >= self.total_steps:
            return
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            self._evaluate()
        if self.step % self.cfg.checkpoint_every == 0 or self._ckpt_pending:
            if finite:
                self._checkpoint()
            else:
                log.warning("step %d: checkpoint postponed to the next finite step", self.step)
                self._ckpt_pending = True

    def _count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                    self.step - 1, self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_run} consecutive non-finite losses (steps {self.step - self.nonfinite_run} to "
                f"{self.step - 1}); training stopped. Last good checkpoint: {find_latest(self.ckpt_dir)}")

    # ------------------------------------------------------------------ bookkeeping
    def eval_model(self) -> nn.Module:
        """What is evaluated and exported: the EMA weights when EMA is on, else the model (sharded:
        the main process's unsharded copy)."""
        if self.full_copy is not None:
            return self.full_copy
        return self.ema.module if self.ema is not None else self.model

    def final_model(self) -> nn.Module:
        """The trained model after :meth:`fit` (sharded: the unsharded copy on the main process's device)."""
        if self.full_copy is not None:
            return self.full_copy.to(self.device)
        return self.eval_model()

    def _gather(self) -> None:
        """Sharded: refresh the main process's unsharded copy (a collective: every rank calls it)."""
        if self.sharded and self._gathered_at != self.step:
            full = fsdp.full_model_state(self.model, keep=self.full_copy is not None)
            if self.full_copy is not None:
                self.full_copy.load_state_dict(full)
            self._gathered_at = self.step

    def _log(self, record: dict) -> None:
        """Append one line to ``run_dir/metrics.jsonl`` (main process)."""
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_train(self) -> None:
        now = time.time()
        started, first_step = self._window
        self.elapsed += now - started
        self._window = (now, self.step)
        n = self._acc.pop("_n", 0)
        means = {k: v / n for k, v in self._acc.items()} if n else {}
        self._acc = {}
        rate = (self.step - first_step) * self.cfg.batch_size / max(1e-9, now - started)
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "train",
                  "lr": lr_at(self.step - 1, self.cfg, self.total_steps), **means, "batch_size": self.cfg.batch_size,
                  "samples_per_s": rate, "elapsed_s": self.elapsed, "skipped_samples": self.skipped, "nonfinite_steps": self.nonfinite_total}
        self._log(record)
        if dist.is_main():
            log.log(logging.DEBUG if self._bar_on() else logging.INFO, "step %d/%d %s", self.step, self.total_steps,
                    " ".join(f"{k}={v:.4g}" for k, v in {**means, "lr": record["lr"]}.items()))

    def _evaluate(self) -> None:
        """Run ``eval_fn`` (main process, or all if ``eval_fn.all_ranks``), log a "val" line, track the best."""
        if self.eval_fn is None:
            return
        all_ranks = getattr(self.eval_fn, "all_ranks", False)
        if self.sharded and not all_ranks:
            self._gather()
        if dist.is_main() or all_ranks:
            model = self.model if self.sharded and all_ranks else self.eval_model().to(self.device)
            was_training = model.training
            model.eval()
            metrics = {k: float(v) for k, v in self.eval_fn(model).items()}
            model.train(was_training)
            if model is self.full_copy:
                model.cpu()
            self.last_eval = metrics
            for k, v in metrics.items():
                if k not in self.best or (v < self.best[k] if _minimised(k) else v > self.best[k]):
                    self.best[k] = v
            self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "val",
                       "elapsed_s": self.elapsed + time.time() - self._window[0], **metrics})
            if dist.is_main():
                log.info("step %d val %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        dist.barrier()

    def _state(self) -> dict:
        """What ``trainer_state.json`` holds besides the step (all JSON)."""
        epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "samples_seen": self.step * self.cfg.batch_size,
                "skipped_samples": self.skipped, "nonfinite_steps": self.nonfinite_total,
                "nonfinite_run": self.nonfinite_run, "elapsed_s": self.elapsed, "last_eval": self.last_eval,
                "best_metrics": self.best, "world_size": self.world, "dataset_length": len(self.train_data),
                "scaler": self.scaler.state_dict(), "config": to_dict(self.cfg)}

    def _checkpoint(self) -> None:
        """Save a checkpoint (main process) unless a weight is not finite; every rank waits."""
        self._ckpt_pending = False
        model, optimizer = self.model, self.optimizer
        if self.sharded:  # gathered on every rank, written by the main one
            self._gather()
            model, optimizer = self.full_copy, fsdp.full_optimizer_state(self.optimizer, keep=dist.is_main())
        if dist.is_main():
            if all(torch.isfinite(p).all() for p in model.parameters()):
                save_checkpoint(self.ckpt_dir, self.step, model, optimizer, self.ema, self._state(),
                                keep=self.cfg.keep_checkpoints)
            else:
                log.error("step %d: the weights are not finite: no checkpoint written", self.step)
        dist.barrier()

    # ------------------------------------------------------------------ start, resume
    def _fresh_start(self) -> None:
        """Not resuming: the metrics and checkpoints of an earlier run in ``run_dir`` go."""
        if not dist.is_main():
            return
        (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        old = find_latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        if old is not None:
            log.warning("starting from scratch: removing the checkpoints of the earlier run in %s", self.ckpt_dir)
            shutil.rmtree(self.ckpt_dir)

    def _resume(self) -> bool:
        """Restore the newest checkpoint of ``run_dir``; False when there is none."""
        latest = find_latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        if latest is None:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return False
        ckpt = load_checkpoint(latest)
        if self.sharded:  # full tensors on disk: each rank keeps its shard
            check_state_dict(self.model, ckpt["model"], source=str(latest / "model.safetensors"))
            fsdp.load_full_model_state(self.model, ckpt["model"])
            fsdp.load_full_optimizer_state(self.optimizer, ckpt["optimizer"])
        else:
            load_state_dict_strict(self.model, ckpt["model"], source=str(latest / "model.safetensors"))
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt["ema"] is not None:
            load_state_dict_strict(self.ema, ckpt["ema"], source=str(latest / "ema.safetensors"))
        elif self.ema is not None:
            log.warning("%s has no EMA weights: the EMA restarts from the resumed weights", latest)
        restore_rng(ckpt["rng"])
        self._restore_state(ckpt["state"], latest)
        return True

    def _restore_state(self, s: dict, latest: Path) -> None:
        self.step, self.skipped, self.nonfinite_total = s["step"], s["skipped_samples"], s["nonfinite_steps"]
        self.nonfinite_run, self.elapsed = s["nonfinite_run"], s["elapsed_s"]
        self.last_eval, self.best = s["last_eval"], s["best_metrics"]
        if self.scaler.is_enabled() and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        if s["steps_per_epoch"] != self.steps_per_epoch:
            log.warning("steps per epoch changed (%d in the checkpoint, %d now: batch size or data changed): "
                        "the resumed run will not match an uninterrupted one", s["steps_per_epoch"],
                        self.steps_per_epoch)
        self._truncate_metrics()
        log.info("resumed from %s (step %d of %d, epoch %d, batch %d of the epoch)", latest, self.step,
                 self.total_steps, *divmod(self.step, self.steps_per_epoch))

    def _truncate_metrics(self) -> None:
        """Drop metric lines a killed run wrote after its last checkpoint (they are recomputed)."""
        path = self.run_dir / "metrics.jsonl"
        if not (dist.is_main() and path.exists()):
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if record.get("step", 0) <= self.step:
                keep.append(line + "\n")
        path.write_text("".join(keep))

    # ------------------------------------------------------------------ the loop
    def _bar_on(self) -> bool:
        return self.cfg.progress and dist.is_main() and sys.stderr.isatty()

    def fit(self, resume: bool = False) -> dict:
        """Train to ``total_steps`` (continuing the newest checkpoint with ``resume``). Returns the summary::

            {"steps", "epochs", "seconds" (training time over all resumes), "samples_per_s" (this call),
             "skipped_samples", "nonfinite_steps", "last_train": {scalar: float}, "last_eval": {metric: float},
             "best_metrics": {metric: float}, "resumed_from_step": int}
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main() and self.ckpt_dir.is_dir():
            remove_partial(self.ckpt_dir)
        dist.barrier()
        if not (resume and self._resume()):
            self._fresh_start()
        dist.barrier()
        self.wrapped.train()
        start_step, started = self.step, time.time()
        self._window = (started, self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not self._bar_on())
        try:
            for batch in self._batches():
                self._after_step(self._step(batch), bar)
        finally:
            bar.close()
        self._finish(start_step)
        return self._summary(start_step, time.time() - started)

    def _finish(self, start_step: int) -> None:
        """Final evaluation, checkpoint and curves (once: a finished run resumed again redoes nothing)."""
        self._gather()
        if self.step > start_step or (self.eval_fn is not None and not self.last_eval):
            self._evaluate()
            if self.nonfinite_run == 0:
                self._checkpoint()
            else:
                log.warning("the last step was not finite: no final checkpoint")
        if dist.is_main() and (self.run_dir / "metrics.jsonl").exists():
            from vlkit.viz.curves import plot_metrics

            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")

    def _summary(self, start_step: int, seconds: float) -> dict:
        trained = self.step - start_step
        return {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "seconds": self.elapsed,
                "samples_per_s": trained * self.cfg.batch_size / max(seconds, 1e-9),
                "skipped_samples": self.skipped, "nonfinite_steps": self.nonfinite_total,
                "last_train": dict(self.last_train), "last_eval": dict(self.last_eval),
                "best_metrics": dict(self.best), "resumed_from_step": start_step}
