"""The training loop: learning, parameter groups, schedule, samplers, accumulation, exact resume after
SIGKILL, torchrun/DDP == one process, non-finite losses, atomic checkpoints, EMA, metrics and curves."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlkit.checkpoints.io import CheckpointError
from vlkit.config import ConfigError
from vlkit.data.base import TransformedDataset
from vlkit.train import (ModelEMA, NonFiniteLossError, ParamGroupConfig, RepeatedAugSampler, RepeatedCopies,
                         ResumableSampler, TrainConfig, Trainer, find_latest, load_checkpoint, restore_rng,
                         save_checkpoint)
from vlkit.train.optim import build_optimizer, lr_at
from vlkit.viz.curves import metric_series, plot_metrics, plotted_metrics

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import Points, jitter, make_model, objective  # noqa: E402

WORKER = str(Path(__file__).parent / "_train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
PNG = b"\x89PNG\r\n\x1a\n"


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=40, batch_size=16, lr=3e-2, warmup_steps=2, progress=False, checkpoint_every=1000,
                log_every=5, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def run_worker(run_dir, *args, check=True, env=None):
    done = subprocess.run([sys.executable, WORKER, str(run_dir), *args], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_torchrun(run_dir, *args, check=True):
    """The worker in 2 processes (gloo on CPU, even on a machine with a GPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", WORKER,
           str(run_dir), *args]
    done = subprocess.run(cmd, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def tensors_equal(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def train_lines(run_dir):
    """metrics.jsonl train lines without the timing fields."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("samples_per_s", "elapsed_s")} for x in lines
            if x["split"] == "train"]


# ---------------------------------------------------------------------------- 1, 10, 11: learning, metrics
def test_loss_falls_metrics_curves_and_skipped_samples(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    calls = []
    trainer = Trainer(make_model(0.0), objective, data, cfg(eval_every=20), tmp_path,
                      eval_fn=lambda m: calls.append(m.training) or {"score": 1.0, "loss": 0.5})
    summary = trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"] and train[-1]["loss"] < 0.6
    assert {"step", "epoch", "lr", "loss", "acc", "samples_per_s"} <= train[0].keys()
    assert [x["step"] for x in train] == list(range(5, 41, 5))
    assert [x["step"] for x in lines if x["split"] == "val"] == [20, 40] and calls == [False, False]
    # 64 samples, batch 16: 10 epochs of 4 full batches, each epoch draws the unusable item 13 once
    assert summary["steps"] == 40 and summary["skipped_samples"] == 10 and train[-1]["skipped_samples"] == 10
    assert summary["nonfinite_steps"] == 0 and summary["last_eval"] == {"score": 1.0, "loss": 0.5}
    assert summary["last_train"]["loss"] > 0 and summary["samples_per_s"] > 0 and summary["seconds"] > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_plot_metrics_survives_missing_keys_and_single_points(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0, "lr": 0.0}\n{"split": "val"}\n'
                    '{"step": 1, "split": "val", "top1": 0.5}\n{"step": 2, "loss": NaN}\n{"step": 3, "lo')
    assert plot_metrics(path, tmp_path / "a.png").read_bytes()[:8] == PNG
    path.write_text("")
    assert plot_metrics(path, tmp_path / "b.png").read_bytes()[:8] == PNG


def test_curves_leave_out_terms_that_stayed_zero():
    records = [{"step": s, "split": "train", "loss": 2.0 / s, "loss_dist": 0.0, "lr": 0.1 * (s - 1), "top1": 0}
               for s in (1, 2, 3)] + [{"step": 3, "split": "val", "top1": 50.0, "loss": 1.0}]
    assert plotted_metrics(metric_series(records)) == ["loss", "lr", "top1"]


# ---------------------------------------------------------------------------- 2: parameter groups
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.pos = nn.Parameter(torch.zeros(2, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)
        self.extra = nn.Linear(4, 4)

    def no_weight_decay(self):
        return {"pos", "extra."}  # a name and a prefix

    def forward(self, x):
        return self.extra(self.head(self.norm(self.embed(x) + self.pos[0])))


def test_param_groups_freeze_scale_and_skip_decay(tmp_path):
    model = Tiny()
    frozen_before = model.embed.weight.detach().clone()
    groups = [ParamGroupConfig(pattern="embed.", lr_scale=0.0),  # a prefix
              ParamGroupConfig(pattern=r"^head\.", lr_scale=0.5, weight_decay=0.2)]  # a regex
    c = cfg(max_steps=6, weight_decay=0.1, param_groups=groups)
    opt = build_optimizer(Tiny(), c)
    trainer = Trainer(model, objective, TransformedDataset(Points(), None), c, tmp_path)
    by_id = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert not model.embed.weight.requires_grad and not model.embed.bias.requires_grad
    assert id(model.embed.weight) not in by_id and id(model.embed.bias) not in by_id
    decay = {n: by_id[id(p)]["weight_decay"] for n, p in names.items() if id(p) in by_id}
    assert decay == {"pos": 0.0, "norm.weight": 0.0, "norm.bias": 0.0, "head.weight": 0.2, "head.bias": 0.0,
                     "extra.weight": 0.0, "extra.bias": 0.0}
    assert len(opt.param_groups) == len(trainer.optimizer.param_groups) == 3  # (1, 0), (0.5, 0.2), (0.5, 0)
    trainer.fit()
    assert torch.equal(model.embed.weight.cpu(), frozen_before) and model.embed.weight.grad is None
    last = lr_at(5, c, 6)
    assert by_id[id(model.head.weight)]["lr"] == pytest.approx(0.5 * last)
    assert by_id[id(model.norm.weight)]["lr"] == pytest.approx(last)
    with pytest.raises(ConfigError, match="pattern"):
        ParamGroupConfig(pattern="(")


# ---------------------------------------------------------------------------- 3: schedule, config
def test_schedule_warmup_then_cosine_to_min():
    c = cfg(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, c, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c, 104) == 1.0
    assert lr_at(54, c, 104) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_at(79, c, 104) == pytest.approx(0.1 + 0.9 * (1 + np.cos(np.pi * 0.75)) / 2)
    assert lr_at(104, c, 104) == pytest.approx(0.1)
    lrs = [lr_at(s, c, 104) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(54, cfg(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="linear"), 104) == pytest.approx(0.55)
    assert lr_at(5, TrainConfig(lr=2.0, schedule="constant"), 10) == 2.0
    frac = TrainConfig(lr=1.0, warmup_fraction=0.1, max_steps=100)
    assert lr_at(0, frac, 100) == pytest.approx(0.1) and lr_at(9, frac, 100) == 1.0


@pytest.mark.parametrize("kw, name", [
    (dict(batch_size=10, grad_accum_steps=3), "batch_size"), (dict(lr=0.0), "lr"), (dict(schedule="step"), "schedule"),
    (dict(amp="fp8"), "amp"), (dict(warmup_steps=3, warmup_fraction=0.1), "warmup_fraction"),
    (dict(betas=(0.9, 1.5)), "betas"), (dict(epochs=0, max_steps=0), "epochs"), (dict(ema_decay=1.0), "ema_decay"),
])
def test_config_errors_name_the_field(kw, name):
    with pytest.raises(ConfigError, match=name) as e:
        TrainConfig(**kw)
    assert e.value.field == name


def test_trainer_start_checks_batch_against_world_and_data(tmp_path):
    with pytest.raises(ConfigError, match="exceeds"):
        Trainer(make_model(0.0), objective, TransformedDataset(Points(), None), cfg(batch_size=128), tmp_path)


# ---------------------------------------------------------------------------- samplers
def test_resumable_sampler_is_world_size_invariant_and_resumable():
    one = ResumableSampler(40, seed=1, batch_size=8)
    one.set_epoch(2)
    order = list(one)
    assert sorted(order) == list(range(40)) and len(one) == 40
    one.set_epoch(3)
    assert list(one) != order
    one.set_epoch(2)
    two = [ResumableSampler(40, 2, r, seed=1, batch_size=8) for r in (0, 1)]
    for s in two:
        s.set_epoch(2)
    parts = [list(s) for s in two]
    for j in range(5):  # global batch j = rank 0's 4 samples then rank 1's 4 samples
        assert parts[0][4 * j:4 * j + 4] + parts[1][4 * j:4 * j + 4] == order[8 * j:8 * j + 8]
    one.set_start(3)
    assert list(one) == order[24:] and len(one) == 16
    strided = ResumableSampler(10, 2, 1, seed=1, shuffle=False)  # batch_size None: rank::world
    assert list(strided) == [1, 3, 5, 7, 9]
    ragged = ResumableSampler(10, 4, 3, shuffle=False, drop_last=False, batch_size=8)  # last batch padded
    assert list(ragged) == [6, 7, 1] and len(ragged) == 3  # [8, 9] padded to [8, 9, 0, 1]


def test_repeated_aug_sampler_spreads_copies_and_is_world_size_invariant():
    one = RepeatedAugSampler(48, seed=0, batch_size=12, repeats=3)
    one.set_epoch(1)
    order = list(one)
    counts = np.bincount(order, minlength=48)
    assert len(order) == 48 and set(counts.tolist()) == {0, 3} and (counts == 3).sum() == 16
    two = [RepeatedAugSampler(48, 3, r, seed=0, batch_size=12, repeats=3) for r in range(3)]
    for s in two:
        s.set_epoch(1)
    parts = [list(s) for s in two]
    for j in range(4):  # same global batch; the 3 copies of an image on 3 different ranks
        assert sorted(sum((p[4 * j:4 * j + 4] for p in parts), [])) == sorted(order[12 * j:12 * j + 12])
        assert all(parts[0][4 * j + i] == parts[1][4 * j + i] == parts[2][4 * j + i] for i in range(4))
    two[1].set_start(2)
    assert list(two[1]) == parts[1][8:]
    coded = RepeatedAugSampler(48, seed=0, batch_size=12, repeats=3, encode_copies=True)
    coded.set_epoch(1)
    assert [i % 48 for i in coded] == order and len({i // 48 for i in coded}) == 3
    data = TransformedDataset(Points(), jitter, seed=0)
    view = RepeatedCopies(data, 3)
    view.set_epoch(2)
    assert torch.equal(view[5]["image"], data[5]["image"]) and not torch.equal(view[53]["image"], data[5]["image"])
    assert data.epoch == 2 and view[53]["label"] == data[5]["label"]


def test_length_grouped_sampler_cuts_padding_and_stays_random_and_resumable(tmp_path):
    from vlkit.train.sampler import LengthGroupedSampler

    lengths = torch.randint(5, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    padding = lambda order: sum(8 * max(lengths[i] for i in order[j:j + 8]) - sum(lengths[i] for i in order[j:j + 8])
                                for j in range(0, len(order), 8))  # noqa: E731
    plain, grouped = ResumableSampler(400, seed=1, batch_size=8), LengthGroupedSampler(lengths, seed=1, batch_size=8,
                                                                                       group=10)
    for s in (plain, grouped):
        s.set_epoch(0)
    order = list(grouped)
    assert sorted(order) == list(range(400)) and padding(order) < 0.2 * padding(list(plain))
    grouped.set_epoch(1)
    second = list(grouped)
    assert second != order and {frozenset(second[j:j + 8]) for j in range(0, 400, 8)} != \
        {frozenset(order[j:j + 8]) for j in range(0, 400, 8)}  # batches are new groupings each epoch
    grouped.set_epoch(0)
    firsts = [lengths[order[j]] for j in range(0, 400, 8)]
    assert firsts != sorted(firsts, reverse=True)  # batch order shuffled, not longest first overall
    grouped.set_start(7)
    assert list(grouped) == order[56:]
    two = [LengthGroupedSampler(lengths, 2, r, seed=1, batch_size=8, group=10) for r in (0, 1)]
    parts = [list(s) for s in two]
    assert parts[0][:4] + parts[1][:4] == order[:8]
    with pytest.raises(ConfigError, match="group_by_length"):
        Trainer(make_model(0.0), objective, TransformedDataset(Points(), None), cfg(group_by_length=4), tmp_path)
    with pytest.raises(ConfigError, match="group_by_length"):
        TrainConfig(group_by_length=2, repeated_aug=3)


def test_repeated_aug_in_the_trainer(tmp_path):
    summary = Trainer(make_model(0.0), objective, TransformedDataset(Points(), jitter, seed=0),
                      cfg(max_steps=8, repeated_aug=3), tmp_path).fit()
    assert summary["steps"] == 8


# ---------------------------------------------------------------------------- 4: accumulation
def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    runs = []
    for accum in (1, 2):
        data = TransformedDataset(Points(with_bad=False), jitter, seed=0)
        c = cfg(max_steps=6, batch_size=8, grad_accum_steps=accum, clip_grad_norm=1.0, weight_decay=0.1)
        t = Trainer(make_model(0.0), objective, data, c, tmp_path / str(accum))
        t.fit()
        runs.append(t.model.state_dict())
    for k in runs[0]:
        assert torch.allclose(runs[0][k], runs[1][k], atol=1e-6), k


# ---------------------------------------------------------------------------- 5: exact resume after SIGKILL
@pytest.mark.parametrize("workers, steps, kill_at, resumed_at", [(0, 12, 11, 9), (1, 8, 5, 3)])
def test_resume_after_sigkill_is_exact(tmp_path, workers, steps, kill_at, resumed_at):
    """Dropout, per-sample augmentation and a random batch transform; resumed mid-epoch (8 steps/epoch)."""
    args = ["--steps", str(steps), "--workers", str(workers)]
    run_worker(tmp_path / "full", *args)
    killed = run_worker(tmp_path / "cut", *args, "--kill-at", str(kill_at), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup ran
    assert find_latest(tmp_path / "cut").name == f"step-{resumed_at:08d}"
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    run_worker(tmp_path / "cut", *args, "--resume")
    for name in ("final.safetensors", "final_ema.safetensors"):
        assert tensors_equal(tmp_path / "full" / name, tmp_path / "cut" / name) == [], name
    assert train_lines(tmp_path / "cut") == train_lines(tmp_path / "full")  # same losses, step by step
    full, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "cut"))
    assert cut["resumed_from_step"] == resumed_at and cut["skipped_samples"] == full["skipped_samples"] > 0


# ---------------------------------------------------------------------------- 6: torchrun 2 processes == 1
def test_torchrun_two_processes_equal_one(tmp_path):
    """Global batch 8: 1 process x 2 micro-batches of 4 == 2 processes x 4 (same micro-batches)."""
    args = ["--steps", "6", "--dropout", "0", "--no-bad", "--no-noise", "--batch", "8"]
    run_worker(tmp_path / "one", *args, "--accum", "2", env={"CUDA_VISIBLE_DEVICES": ""})
    run_torchrun(tmp_path / "two", *args)
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    one, two = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    assert [x["loss"] for x in one] == pytest.approx([x["loss"] for x in two], abs=1e-5)  # averaged over ranks


# ---------------------------------------------------------------------------- 6b: FSDP2
def test_fsdp_two_processes_equal_one_and_resume_on_any_world_size(tmp_path):
    """parallel=fsdp in 2 processes (each holding half of every weight, gradient and AdamW state) == 1
    unsharded process with 2 micro-batches: weights, losses and the checkpoint's optimizer state. A sharded run
    killed at step 4 resumes from its step-3 checkpoint exactly, sharded in 2 processes or unsharded in 1."""
    args = ["--steps", "6", "--dropout", "0", "--no-bad", "--no-noise", "--batch", "8", "--blocks"]
    run_worker(tmp_path / "one", *args, "--accum", "2", env={"CUDA_VISIBLE_DEVICES": ""})
    run_torchrun(tmp_path / "fsdp", *args, "--fsdp")
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "fsdp" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    one, two = train_lines(tmp_path / "one"), train_lines(tmp_path / "fsdp")
    assert [x["loss"] for x in one] == pytest.approx([x["loss"] for x in two], abs=1e-6)
    opt_one, opt_two = (load_checkpoint(tmp_path / d / "checkpoints" / "step-00000006")["optimizer"] for d in ("one", "fsdp"))
    assert opt_one["param_groups"] == opt_two["param_groups"] and opt_one["state"].keys() == opt_two["state"].keys()
    for i, entry in opt_one["state"].items():  # full (gathered) AdamW moments, as an unsharded run saves them
        for name, value in entry.items():
            torch.testing.assert_close(value, opt_two["state"][i][name], atol=1e-7, rtol=1e-5)
    killed = run_torchrun(tmp_path / "cut", *args, "--fsdp", "--kill-at", "4", check=False)
    assert killed.returncode != 0 and find_latest(tmp_path / "cut").name == "step-00000003"
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_one")
    run_torchrun(tmp_path / "cut", *args, "--fsdp", "--resume")
    assert tensors_equal(tmp_path / "fsdp" / "final.safetensors", tmp_path / "cut" / "final.safetensors") == []
    run_worker(tmp_path / "cut_one", *args, "--accum", "2", "--resume", env={"CUDA_VISIBLE_DEVICES": ""})
    c = load_file(tmp_path / "cut_one" / "final.safetensors")
    for k in b:
        torch.testing.assert_close(b[k], c[k], atol=1e-6, rtol=1e-5)


def test_fsdp_ranks_run_as_many_micro_batches_when_a_sample_is_dropped(tmp_path):
    """Sharded, every micro-batch's forward gathers the weights with all ranks: when a dropped sample leaves
    one rank a single sample for grad_accum_steps=2, every rank runs one micro-batch (a collective mismatch
    and an abort otherwise); the dropped sample is counted."""
    run_torchrun(tmp_path / "fsdp", "--steps", "16", "--dropout", "0", "--no-noise", "--batch", "4", "--accum", "2",
                 "--blocks", "--fsdp", "--ckpt-every", "16")
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["skipped_samples"] == 1  # one epoch: item 13 met once
    assert all(np.isfinite(x["loss"]) for x in train_lines(tmp_path / "fsdp"))


def test_fsdp_sharding_units_and_config_checks(tmp_path):
    from _train_worker import Blocks

    from vlkit.train.fsdp import shard, sharding_units

    model = Blocks(0.0)
    assert sharding_units(model) == [model.blocks[1], model.blocks[0]]  # deepest / last first
    model.head.weight = model.blocks[1][1].weight  # tied across units: that block is sharded with the root
    assert sharding_units(model) == [model.blocks[0]]
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(parallel="fsdp", ema_decay=0.99)
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig(parallel="fsdp", amp="fp16")
    with pytest.raises(ConfigError, match="parallel"):
        TrainConfig(parallel="zero3")
    from vlkit.tasks.classification import TeacherConfig
    from vlkit.tasks.continual import ContinualConfig

    with pytest.raises(ConfigError, match="train.parallel"):  # each task's run starts from the last one's model
        ContinualConfig(train=TrainConfig(parallel="fsdp"))
    with pytest.raises(ConfigError, match="finetune.parallel"):  # the teacher runs whole on every rank
        TeacherConfig(finetune=TrainConfig(parallel="fsdp"))
    t = Trainer(make_model(0.0), objective, TransformedDataset(Points(), jitter), cfg(parallel="fsdp"), tmp_path)
    assert not t.sharded and t.full_copy is None  # one process: nothing to shard
    scalar = make_model(0.0)
    scalar.temperature = nn.Parameter(torch.tensor(1.0))  # CLIP's logit scale is 0-dim
    with pytest.raises(ConfigError, match="0-dim parameters \\(temperature\\)"):
        shard(scalar, torch.device("cpu"), 1)


# ---------------------------------------------------------------------------- 7: non-finite losses
class NaNAt:
    """The toy objective, returning NaN at the listed (0-based) calls."""

    def __init__(self, calls):
        self.nan_calls, self.calls = set(calls), 0

    def __call__(self, model, batch):
        out = objective(model, batch)
        if self.calls in self.nan_calls:
            out["loss"] = out["loss"] * float("nan")
        self.calls += 1
        return out


def test_nonfinite_loss_skips_the_step(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    t = Trainer(make_model(0.0), NaNAt({3}), data, cfg(max_steps=8, checkpoint_every=4, keep_checkpoints=5),
                tmp_path)
    summary = t.fit()
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 8
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert t.optimizer.state[t.model[0].weight]["step"].item() == 7  # 8 steps, one update skipped
    # the step-4 checkpoint fell on the NaN step: postponed to step 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000005", "step-00000008"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "step-00000005")
    assert ckpt["state"]["nonfinite_steps"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["nonfinite_steps"] == 1 and all(np.isfinite(x["loss"]) for x in lines)


def test_consecutive_nonfinite_losses_abort_and_keep_the_good_checkpoint(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    c = cfg(max_steps=20, checkpoint_every=4, max_nonfinite=3)
    t = Trainer(make_model(0.0), NaNAt(range(5, 100)), data, c, tmp_path)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses .*step-00000004"):
        t.fit()
    latest = find_latest(tmp_path)
    assert latest.name == "step-00000004"
    assert all(torch.isfinite(v).all() for v in load_checkpoint(latest)["model"].values())
    resumed = Trainer(make_model(0.0), objective, data, c, tmp_path)
    assert resumed.fit(resume=True)["steps"] == 20  # the good checkpoint resumes


# ---------------------------------------------------------------------------- 8: checkpoints
def test_checkpoints_are_atomic_pruned_and_safetensors_only(tmp_path):
    leftover = tmp_path / "checkpoints" / "tmp-leftover"
    leftover.mkdir(parents=True)
    (leftover / "trainer_state.json").write_text('{"step": 99}')  # a killed save: never read
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert find_latest(tmp_path) is None
    data = TransformedDataset(Points(), jitter, seed=0)
    c = cfg(max_steps=12, checkpoint_every=2, keep_checkpoints=2, ema_decay=0.9)
    Trainer(make_model(0.0), objective, data, c, tmp_path).fit(resume=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000012"]
    files = {p.name for p in (tmp_path / "checkpoints" / "step-00000012").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "ema.safetensors",
                     "rng.safetensors", "trainer_state.json"}
    state = json.loads((tmp_path / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["samples_seen"]) == (12, 3, 0, 192)
    assert state["config"]["keep_checkpoints"] == 2 and state["skipped_samples"] == 3
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file() and p.name != "latest"}
    assert suffixes <= {".safetensors", ".json", ".jsonl", ".png"}, suffixes  # nothing pickled
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099")  # a dangling pointer
    assert find_latest(tmp_path).name == "step-00000012"
    with pytest.raises(CheckpointError, match="optimizer.json"):
        (tmp_path / "checkpoints" / "step-00000012" / "optimizer.json").unlink()
        load_checkpoint(tmp_path / "checkpoints" / "step-00000012")


def test_save_and_load_checkpoint_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    model.tied = model.weight  # shared tensors are stored once
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    folder = save_checkpoint(tmp_path / "ck", 7, model, opt, None, {"epoch": 1}, keep=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt = load_checkpoint(folder)
    assert ckpt["step"] == 7 and ckpt["state"]["epoch"] == 1 and ckpt["ema"] is None
    assert set(load_file(folder / "model.safetensors")) == {"weight", "bias"}  # "tied" stored once...
    assert torch.equal(ckpt["model"]["tied"], model.weight)  # ...and restored as an alias
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(ckpt["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restore_rng(ckpt["rng"])
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    restore_rng(ckpt["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    save_checkpoint(tmp_path / "ck", 8, model, opt, None, {}, keep=1)
    assert [p.name for p in (tmp_path / "ck").glob("step-*")] == ["step-00000008"]


# ---------------------------------------------------------------------------- 9: EMA
def test_ema_follows_the_weights_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.5
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(8, 2))  # moves the BatchNorm running statistics
    start = ema.module[0].weight.clone()
    ema.update(model)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, (1 - d) * model[1].running_mean)
    assert ema.module[1].num_batches_tracked.item() == 1 and ema.updates.item() == 1
    copy = ModelEMA(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), ema.state_dict().values()))


def test_ema_is_restored_on_resume(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    c = cfg(max_steps=8, checkpoint_every=4, ema_decay=0.9)
    first = Trainer(make_model(0.0), objective, data, c, tmp_path)
    first.fit()
    ema_at_8 = {k: v.clone() for k, v in first.ema.state_dict().items()}
    again = Trainer(make_model(0.0), objective, data, replace_steps(c, 10), tmp_path)
    again.fit(resume=True)  # resumes at step 8 (the final checkpoint), trains 2 more steps
    assert again.ema.updates.item() == 10
    assert not torch.equal(again.ema.module[0].weight, ema_at_8["module.0.weight"])
    reloaded = Trainer(make_model(0.0), objective, data, replace_steps(c, 10), tmp_path)
    reloaded._resume()
    assert all(torch.equal(a, b) for a, b in zip(reloaded.ema.state_dict().values(), again.ema.state_dict().values()))


def replace_steps(c: TrainConfig, steps: int) -> TrainConfig:
    from vlkit.config import replace

    return replace(c, max_steps=steps)
