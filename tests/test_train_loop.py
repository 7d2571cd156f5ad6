"""The training loop: learning, parameter groups, schedule, accumulation, exact resume after SIGKILL,
torchrun/DDP equivalence, non-finite losses, atomic checkpoints, EMA, metrics and curves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vlkit.data.base import TransformedDataset
from vlkit.train import ModelEMA, ParamGroupConfig, TrainConfig, Trainer, find_latest, load_checkpoint
from vlkit.train.optim import build_optimizer, lr_at
from vlkit.train.sampler import RankBatchSampler, epoch_order

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import Points, jitter, make_model, objective  # noqa: E402

WORKER = str(Path(__file__).parent / "_train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=40, batch_size=16, lr=3e-2, warmup_steps=2, progress=False, checkpoint_every=1000,
                log_every=5, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def run_worker(run_dir, *args, check=True):
    return subprocess.run([sys.executable, WORKER, str(run_dir), *args], env=ENV, capture_output=True, text=True,
                          timeout=240, check=check)


def test_loss_falls_and_metrics_are_written(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    calls = []
    trainer = Trainer(make_model(0.0), objective, data, cfg(eval_every=20), tmp_path,
                      eval_fn=lambda m: calls.append(1) or {"score": 1.0})
    summary = trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert train[-1]["loss"] < 0.6
    assert [x["step"] for x in lines if x["split"] == "val"] == [20, 40] and len(calls) == 2
    assert summary["steps"] == 40 and summary["skipped_samples"] > 0  # item 13 is None: counted
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_param_groups_freeze_scale_and_skip_decay():
    model = make_model(0.0)
    before = model[0].weight.detach().clone()
    c = cfg(weight_decay=0.1, param_groups=[ParamGroupConfig(pattern=r"^0\.", lr_scale=0.0),
                                            ParamGroupConfig(pattern=r"^3\.weight", lr_scale=0.5)])
    opt = build_optimizer(model, c)
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model[3].weight)]["lr_scale"] == 0.5 and by_id[id(model[3].weight)]["weight_decay"] == 0.1
    assert by_id[id(model[3].bias)]["weight_decay"] == 0.0  # biases are never decayed
    assert id(model[0].weight) not in by_id
    data = TransformedDataset(Points(), None)
    Trainer(model, objective, data, cfg(max_steps=3, param_groups=c.param_groups), Path("/tmp/vlkit-pg")).fit()
    assert torch.equal(model[0].weight, before)


def test_schedule_warmup_then_cosine_to_min():
    c = cfg(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, c, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, c, 104) == pytest.approx(0.55)
    assert lr_at(104, c, 104) == pytest.approx(0.1)
    assert lr_at(5, TrainConfig(lr=2.0, schedule="constant"), 10) == 2.0


def test_sampler_is_world_size_invariant_and_resumable():
    order = epoch_order(40, seed=1, epoch=2)
    assert sorted(order.tolist()) == list(range(40)) and not torch.equal(order, epoch_order(40, 1, 3))
    one = [b for b in RankBatchSampler(40, 8, 1, 2)]
    two = [RankBatchSampler(40, 8, 1, 2, rank=r, world_size=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*two)] == one
    assert list(RankBatchSampler(40, 8, 1, 2, start=3)) == one[3:]
    ra = epoch_order(40, 1, 0, repeats=3)
    assert len(ra) == 40 and torch.equal(ra[0:3], ra[0].repeat(3))


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    runs = []
    for accum in (1, 2):
        data = TransformedDataset(Points(with_bad=False), jitter, seed=0)
        t = Trainer(make_model(0.0), objective, data, cfg(max_steps=6, grad_accum_steps=accum), tmp_path / str(accum))
        t.fit()
        runs.append(t.model.state_dict())
    for k in runs[0]:
        assert torch.allclose(runs[0][k], runs[1][k], atol=1e-6), k


def test_resume_after_sigkill_is_exact(tmp_path):
    full = run_worker(tmp_path / "full", "--steps", "12")
    assert "skipped" in full.stdout
    killed = run_worker(tmp_path / "cut", "--steps", "12", "--kill-at", "10", check=False)
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup ran
    assert find_latest(tmp_path / "cut").name == "step-00000008"
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    run_worker(tmp_path / "cut", "--steps", "12", "--resume")
    for name in ("final.safetensors", "final_ema.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the killed run's extra lines are gone


def test_resume_with_dataloader_workers_is_exact(tmp_path):
    run_worker(tmp_path / "full", "--steps", "8", "--workers", "1")
    run_worker(tmp_path / "cut", "--steps", "8", "--workers", "1", "--kill-at", "6", check=False)
    run_worker(tmp_path / "cut", "--steps", "8", "--workers", "1", "--resume")
    a, b = load_file(tmp_path / "full" / "final.safetensors"), load_file(tmp_path / "cut" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_equal_one(tmp_path):
    args = ["--steps", "6", "--dropout", "0", "--no-bad", "--batch", "8"]
    run_worker(tmp_path / "one", *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", WORKER,
           str(tmp_path / "two"), *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


class NaNAt:
    """Objective returning NaN at the listed steps."""

    def __init__(self, steps):
        self.steps, self.calls = set(steps), 0

    def __call__(self, model, batch):
        out = objective(model, batch)
        self.calls += 1
        if self.calls - 1 in self.steps:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_skips_the_step(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    t = Trainer(make_model(0.0), NaNAt({3}), data, cfg(max_steps=8, checkpoint_every=4), tmp_path)
    summary = t.fit()
    assert summary["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    ckpt = load_checkpoint(find_latest(tmp_path))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_consecutive_nonfinite_losses_abort_and_keep_the_good_checkpoint(tmp_path):
    data = TransformedDataset(Points(), jitter, seed=0)
    t = Trainer(make_model(0.0), NaNAt(set(range(5, 100))), data, cfg(max_steps=20, checkpoint_every=4,
                                                                        max_nonfinite=3), tmp_path)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite"):
        t.fit()
    latest = find_latest(tmp_path)
    assert latest.name == "step-00000004"
    assert all(torch.isfinite(v).all() for v in load_checkpoint(latest)["model"].values())


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    (tmp_path / "checkpoints" / "tmp-leftover").mkdir(parents=True)
    (tmp_path / "checkpoints" / "tmp-leftover" / "model.safetensors").write_bytes(b"partial")
    data = TransformedDataset(Points(), jitter, seed=0)
    Trainer(make_model(0.0), objective, data, cfg(max_steps=12, checkpoint_every=2, keep_checkpoints=2),
            tmp_path).fit(resume=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000012"]
    files = {p.name for p in (tmp_path / "checkpoints" / "step-00000012").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                     "trainer_state.json"}


def test_ema_follows_the_weights():
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    start = ema.module.weight.clone()
    ema.update(model)
    assert ((ema.module.weight - start).abs() > 0).all()
    assert ((model.weight - ema.module.weight).abs() < (model.weight - start).abs()).all()


def test_bad_batch_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        Trainer(make_model(0.0), objective, TransformedDataset(Points(), None), cfg(batch_size=128), tmp_path)
    from vlkit.config import ConfigError
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=10, grad_accum_steps=3)
