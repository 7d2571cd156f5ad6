"""Class-incremental learning: ``vlkit train dytox_fmnist`` (and ``finetune_fmnist``, ``joint_fmnist``).

The classes are split, in their natural order, into ``num_tasks`` tasks learnt one after the other; after each task the model
classifies test images of every class seen so far (no task id given). Methods:

- ``dytox``: DyTox (:mod:`vlkit.models.dytox`): a task token + classifier per task, knowledge
  distillation from the previous model (``auto_kd``: DyTox's weighting), a rehearsal memory of
  ``memory_size`` training images (``memory_selection``: random or iCaRL's herding) and
  (``balanced_steps``) a short class-balanced finetuning of the tokens and classifiers
  (``balanced_tab``: and the task-attention block) after each task; ``bce``: DyTox's per-class binary
  cross-entropy in place of the softmax's; ``divergence_weight``: DyTox's divergence classifier;
- ``finetune``: the same model trained on each new task's data only (no memory, no distillation):
  the lower bound, catastrophic forgetting;
- ``joint``: all classes at once for the whole budget: the upper bound.

Reported: the accuracy matrix A[t][j] (after task t, on task j's classes), the average incremental
accuracy (mean over t of the accuracy on all classes seen after t), the final accuracy and the
average forgetting (mean over old tasks j of max_t A[t][j] - A[last][j]); a plot per task step.
A killed run resumes where it stopped: completed tasks are read back from ``task<k>/state``.
The final model is saved to ``model/`` (architecture ``dytox``: ``vlkit.load`` and ``vlkit predict``
read it); ``vlkit eval RUN`` scores every task's saved model again and rebuilds the matrix.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlkit.checkpoints.hub import save_model
from vlkit.checkpoints.io import load_state_dict_strict
from vlkit.config import ConfigError, to_dict
from vlkit.data.base import collate
from vlkit.encoders.vit import ViTConfig
from vlkit.models.dytox import (DyTox, DyToxConfig, WithDivergenceHead, build_dytox, distillation_loss,
                                divergence_targets)
from vlkit.tasks.data import DataConfig, Subset, Splits, build_splits, eval_config, eval_dataset, train_dataset
from vlkit.train import TrainConfig, Trainer
from vlkit.train.distributed import device, is_main

log = logging.getLogger(__name__)


@dataclass
class ContinualConfig:
    """A class-incremental recipe (``task: continual``)."""

    task: str = "continual"
    name: str = "dytox_fmnist"
    output_dir: str = "runs"
    method: Literal["dytox", "finetune", "joint"] = "dytox"
    data: DataConfig = field(default_factory=DataConfig)
    vit: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=28, patch_size=4, num_classes=0,
                                                             embed_dim=128, depth=5, num_heads=4, class_token=False,
                                                             global_pool="avg"))
    tab_heads: int = 4
    num_tasks: int = 5
    memory_size: int = 200  # rehearsal images kept over all seen classes (dytox)
    # how a new class's exemplars are chosen: "random" (seeded; every class drawn again after each task) or
    # "herding" (iCaRL, as DyTox: those whose running mean of task embeddings best follows the class mean;
    # an old class keeps the first of its ranked exemplars when the memory per class shrinks)
    memory_selection: Literal["random", "herding"] = "random"
    divergence_weight: float = 0.0  # DyTox's divergence classifier from task 2 on (the paper: 0.1); 0 = off
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    # DyTox's auto_kd weighting: (1 - r) x classification + r x distillation, r = old / all classes
    # (distill_weight then unused). The distillation term stays Hinton's batch-mean KL x T^2, where DyTox's
    # reference averages over the old classes too (a C_old times smaller term) with T = 1.
    auto_kd: bool = False
    bce: bool = False  # DyTox's bce_loss: per-class binary cross-entropy on one-hot targets instead of softmax CE
    balanced_steps: int = 0  # dytox: after each new task, steps of classifier finetuning on class-balanced data
    balanced_lr: float = 1.0e-4  # its peak lr (no warmup, cosine); was 0.1 x train.lr before it was a key
    balanced_tab: bool = False  # the balanced finetuning also trains the task-attention block (DyTox: all but the SABs)
    eval_batch_size: int = 256
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=128, epochs=0, max_steps=300,
                                                                   warmup_steps=50, weight_decay=0.05))
    # train.max_steps: optimizer steps PER TASK (joint: num_tasks x this, in one task)

    def __post_init__(self):
        if self.num_tasks < 1:
            raise ConfigError("num_tasks", f"must be >= 1, got {self.num_tasks}")
        if self.divergence_weight < 0:
            raise ConfigError("divergence_weight", f"must be >= 0, got {self.divergence_weight}")
        DyToxConfig(self.vit, self.tab_heads)  # the model's own checks (vit.num_classes), at recipe time
        if self.train.parallel == "fsdp":
            raise ConfigError("train.parallel", "each task's run trains the model the previous one returned, "
                                                "unsharded: use parallel=ddp (DyTox models fit on one device)")


def labels_of(ds: Dataset) -> torch.Tensor:
    """Labels of a (Subset of a) dataset, read without decoding images where the source allows."""
    if isinstance(ds, Subset):
        return labels_of(ds.base)[torch.tensor(ds.indices, dtype=torch.long)]
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets, dtype=torch.long)
    return torch.tensor([int(ds[i]["label"]) for i in range(len(ds))])


def task_classes(num_classes: int, num_tasks: int) -> list[list[int]]:
    if num_classes % num_tasks:
        raise ConfigError("num_tasks", f"{num_classes} classes do not split into {num_tasks} equal tasks")
    k = num_classes // num_tasks
    return [list(range(t * k, (t + 1) * k)) for t in range(num_tasks)]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, bce: bool = False) -> torch.Tensor:
    """Softmax cross-entropy, or (``bce``) binary cross-entropy of every class's logit against the one-hot
    target, which does not make the new classes' logits push the old ones down."""
    if bce:
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[-1]).to(logits.dtype))
    return F.cross_entropy(logits, labels)


def objective_fn(old: DyTox | None, cfg: ContinualConfig):
    def objective(model: nn.Module, batch: dict) -> dict:
        outputs = model(batch["image"])
        logits = outputs["logits"]
        name = "bce" if cfg.bce else "ce"  # the logged loss says which one it is
        out = {name: classification_loss(logits, batch["label"], cfg.bce)}
        loss = out[name]
        if "div_logits" in outputs:  # WithDivergenceHead: new classes vs "old", on the newest embedding
            num_old = logits.shape[-1] - (outputs["div_logits"].shape[-1] - 1)
            out["div"] = classification_loss(outputs["div_logits"], divergence_targets(batch["label"], num_old),
                                             cfg.bce)
            loss = loss + cfg.divergence_weight * out["div"]
        if old is not None and cfg.method == "dytox" and (cfg.distill_weight or cfg.auto_kd):
            with torch.no_grad():
                old_logits = old(batch["image"])["logits"]
            out["kd"] = distillation_loss(logits, old_logits, cfg.distill_temperature)
            if cfg.auto_kd:
                r = old_logits.shape[-1] / logits.shape[-1]
                loss = (1 - r) * loss + r * out["kd"]
            else:
                loss = loss + cfg.distill_weight * out["kd"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}
    return objective


@torch.no_grad()
def accuracy_per_task(model: DyTox, test: Dataset, tasks: list[list[int]], bs: int) -> list[float]:
    """Accuracy (%) on each given task's classes, predicting among every class the model knows."""
    model.eval()
    device = next(model.parameters()).device
    correct, total = torch.zeros(len(tasks)), torch.zeros(len(tasks))
    task_of = {c: t for t, cls in enumerate(tasks) for c in cls}
    for batch in DataLoader(test, batch_size=bs, collate_fn=collate):
        if "image" not in batch:
            continue
        pred = model(batch["image"].to(device))["logits"].argmax(-1).cpu()
        for p, y in zip(pred.tolist(), batch["label"].tolist()):
            correct[task_of[y]] += p == y
            total[task_of[y]] += 1
    return (100 * correct / total.clamp(min=1)).tolist()


def summarise(matrix: list[list[float]], sizes: list[int]) -> dict:
    """Average incremental accuracy, final accuracy and forgetting from A[t][j] (j <= t)."""
    seen_acc = [sum(a * n for a, n in zip(row, sizes)) / sum(sizes[:len(row)]) for row in matrix]
    last = matrix[-1]
    forgetting = [max(matrix[t][j] for t in range(j, len(matrix) - 1)) - last[j] for j in range(len(matrix) - 1)]
    return {"avg_incremental_acc": sum(seen_acc) / len(seen_acc), "final_acc": seen_acc[-1],
            "forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0, "acc_after_task": seen_acc,
            "matrix": matrix}


def _update_memory(memory: list[int], labels: torch.Tensor, seen: list[int], size: int, seed: int,
                   rank: Callable[[int], list[int]] | None = None) -> list[int]:
    """``size // len(seen)`` exemplars per seen class: random ones (seeded, every class drawn again), or with
    ``rank`` (class -> its training images, best first: herding) the first of a new class's ranking and the
    first of an old class's exemplars kept so far (they are stored in rank order)."""
    per_class = size // max(1, len(seen))
    if rank is not None:
        kept = {c: [i for i in memory if labels[i] == c] for c in seen}
        return sum((kept[c][:per_class] if kept[c] else rank(c)[:per_class] for c in seen), [])
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in seen:
        pool = (labels == c).nonzero()[:, 0]
        out += pool[torch.randperm(len(pool), generator=g)[:per_class]].tolist()
    return out


def herding(features: torch.Tensor, k: int) -> list[int]:
    """iCaRL's exemplar ranking (Rebuffi et al. 2017, Alg. 4): features (n, d), L2-normalised here -> the
    indices of k of them, each chosen so that the mean of those chosen so far is closest to the class mean."""
    f = F.normalize(features.double(), dim=-1)
    mean, total = f.mean(0), torch.zeros_like(f[0])
    chosen: list[int] = []
    free = torch.ones(len(f), dtype=torch.bool)
    for i in range(min(k, len(f))):
        dist = ((mean - (total + f) / (i + 1)) ** 2).sum(-1).masked_fill(~free, float("inf"))
        j = int(dist.argmin())
        chosen.append(j)
        free[j] = False
        total += f[j]
    return chosen


def _herding_rank(model: DyTox, splits: Splits, labels: torch.Tensor, cfg: ContinualConfig, k: int):
    """class -> up to k of its training images ranked by :func:`herding` on the model's task embeddings
    (all tasks' concatenated: what the classifiers read), without augmentation; unreadable images are
    left out (``collate`` drops and counts them; ``index`` locates the rest in the class's pool)."""
    @torch.no_grad()
    def rank(c: int) -> list[int]:
        pool = (labels == c).nonzero()[:, 0].tolist()
        model.eval()
        feats, readable = [], []
        for batch in DataLoader(eval_dataset(Subset(splits.train, pool), cfg.data),
                                batch_size=cfg.eval_batch_size, collate_fn=collate):
            if "image" in batch:
                readable += [pool[i] for i in batch["index"].tolist()]
                feats.append(model(batch["image"].to(device()))["embeddings"].flatten(1).cpu())
        return [readable[i] for i in herding(torch.cat(feats), k)] if feats else []
    return rank


def _save_state(folder: Path, model: DyTox, memory: list[int], matrix: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "state.json").write_text(json.dumps({"memory": memory, "matrix": matrix}))


def train(cfg: ContinualConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict:
    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    splits, tasks = _protocol(cfg)
    labels = labels_of(splits.train)
    test_labels = labels_of(splits.test)
    torch.manual_seed(cfg.train.seed)
    model = build_dytox(DyToxConfig(cfg.vit, cfg.tab_heads))
    memory, matrix, old = [], [], None
    for t, classes in enumerate(tasks):
        torch.manual_seed(cfg.train.seed + 7919 * (t + 1))  # the new token / classifier init, also on resume
        model.add_task(len(classes))
        state = run_dir / f"task{t}" / "state"
        if resume and (state / "state.json").is_file():  # this task finished before the kill
            load_state_dict_strict(model, load_file(str(state / "model.safetensors")), source=str(state))
            doc = json.loads((state / "state.json").read_text())
            memory, matrix = doc["memory"], doc["matrix"]
            old = _frozen_copy(model)
            continue
        model = _learn_task(model, old, cfg, splits, labels, classes, memory, run_dir / f"task{t}", resume)
        if cfg.method == "dytox" and cfg.balanced_steps and t > 0 and memory:
            model = _balanced_finetune(model, cfg, splits, labels, classes, memory, run_dir / f"task{t}_balanced",
                                       resume, seed=cfg.train.seed + t)
        matrix.append(_score(model, splits, test_labels, tasks[:t + 1], cfg))
        log.info("after task %d: accuracy per task %s", t, [f"{a:.1f}" for a in matrix[-1]])
        if cfg.method == "dytox" and cfg.memory_size:
            seen = sum(tasks[:t + 1], [])
            rank = (_herding_rank(model, splits, labels, cfg, cfg.memory_size // len(seen))
                    if cfg.memory_selection == "herding" else None)
            memory = _update_memory(memory, labels, seen, cfg.memory_size, cfg.train.seed + t, rank)
        _save_state(state, model, memory, matrix)
        old = _frozen_copy(model)
    doc = _eval_doc(matrix, tasks)
    if is_main():
        meta = {"classes": splits.classes, "transform": to_dict(cfg.data.transform), "dataset": splits.source,
                "tasks": tasks}
        save_model(model, run_dir / "model", "dytox", DyToxConfig(cfg.vit, cfg.tab_heads, model.classes_per_task),
                   meta=meta)
        (run_dir / "eval.json").write_text(json.dumps(doc, indent=2))
        _plot(summarise(matrix, [len(c) for c in tasks]), run_dir / "tasks.png", cfg)
    return {"run_dir": str(run_dir), "summary": {"tasks": len(tasks)}, "eval": doc["eval"]}


def _protocol(cfg: ContinualConfig) -> tuple[Splits, list[list[int]]]:
    """The data and the classes of each task, in the order they are learnt."""
    splits = build_splits(cfg.data)
    if splits.test is None:
        raise ConfigError("data.test", "class-incremental evaluation needs a test split")
    tasks = task_classes(len(splits.classes), cfg.num_tasks)
    return splits, [sum(tasks, [])] if cfg.method == "joint" else tasks


def _score(model: DyTox, splits: Splits, test_labels: torch.Tensor, tasks: list[list[int]],
           cfg: ContinualConfig) -> list[float]:
    """One row of the matrix: accuracy on each of ``tasks`` (those seen so far) over their test images."""
    seen = torch.tensor(sum(tasks, []))
    test = eval_dataset(Subset(splits.test, torch.isin(test_labels, seen).nonzero()[:, 0]), cfg.data)
    return accuracy_per_task(model, test, tasks, cfg.eval_batch_size)


def _eval_doc(matrix: list[list[float]], tasks: list[list[int]]) -> dict:
    """eval.json: the summary's numbers, the matrix and the accuracy on all seen classes after each task."""
    result = summarise(matrix, [len(c) for c in tasks])
    return {"eval": {"test": {k: v for k, v in result.items() if not isinstance(v, list)}},
            "matrix": matrix, "acc_after_task": result["acc_after_task"]}


def evaluate_run(run: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """``vlkit eval`` of a class-incremental run: the model saved after each task (``task<k>/state``)
    scored again on the test images of the classes seen by then -> the matrix and its summary, as in
    ``eval.json`` (``data.eval_limit=...`` and other data keys may change)."""
    cfg = eval_config(ContinualConfig, run, overrides, ("data.", "eval_batch_size"))
    splits, tasks = _protocol(cfg)
    test_labels = labels_of(splits.test)
    matrix = []
    for t in range(len(tasks)):
        state = Path(run) / f"task{t}" / "state"
        if not (state / "state.json").is_file():  # written last, as resume reads it
            raise FileNotFoundError(f"{state / 'state.json'} is missing: the run stopped before task {t + 1} of "
                                    f"{len(tasks)} finished (vlkit train ... --resume completes it)")
        model = build_dytox(DyToxConfig(cfg.vit, cfg.tab_heads, [len(c) for c in tasks[:t + 1]]))
        load_state_dict_strict(model, load_file(str(state / "model.safetensors")), source=str(state))
        matrix.append(_score(model.to(device()), splits, test_labels, tasks[:t + 1], cfg))
    return _eval_doc(matrix, tasks)


def _frozen_copy(model: DyTox) -> DyTox:
    old = copy.deepcopy(model).eval()
    old.requires_grad_(False)
    return old


def _learn_task(model, old, cfg, splits, labels, classes, memory, task_dir, resume):
    new = torch.isin(labels, torch.tensor(classes)).nonzero()[:, 0].tolist()
    indices = new + (memory if cfg.method == "dytox" else [])
    data = Subset(train_dataset(splits, cfg.data), indices)
    if not cfg.train.max_steps:
        raise ConfigError("train.max_steps", "set the optimizer steps per task (epochs are not used here)")
    steps = cfg.train.max_steps * (cfg.num_tasks if cfg.method == "joint" else 1)
    divergence = cfg.method == "dytox" and cfg.divergence_weight > 0 and old is not None
    trained = WithDivergenceHead(model) if divergence else model
    trainer = Trainer(trained, objective_fn(old, cfg), data, replace(cfg.train, max_steps=steps, epochs=0), task_dir)
    trainer.fit(resume=resume)
    final = trainer.final_model()
    return final.dytox if divergence else final


def _balanced_finetune(model, cfg, splits, labels, classes, memory, task_dir, resume, seed):
    """DyTox §3.3 (after each task): a short finetuning of the task tokens and classifiers (encoder frozen;
    the TAB too unless ``balanced_tab``) on the memory plus as many images per new class as the memory keeps
    per old class, against the bias towards the newest classes."""
    per_class = len(memory) // max(1, len(set(labels[memory].tolist())))
    g = torch.Generator().manual_seed(seed)
    new = []
    for c in classes:
        pool = (labels == c).nonzero()[:, 0]
        new += pool[torch.randperm(len(pool), generator=g)[:per_class]].tolist()
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for p in [*model.task_tokens, *model.heads.parameters(), *(model.tab.parameters() if cfg.balanced_tab else ())]:
        p.requires_grad_(True)
    data = Subset(train_dataset(splits, cfg.data), memory + new)
    steps_cfg = replace(cfg.train, max_steps=cfg.balanced_steps, epochs=0, lr=cfg.balanced_lr,
                        warmup_steps=0, batch_size=min(cfg.train.batch_size, len(data)))
    trainer = Trainer(model, objective_fn(None, cfg), data, steps_cfg, task_dir)
    trainer.fit(resume=resume)
    model = trainer.final_model()
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    return model


def _plot(result: dict, path: Path, cfg: ContinualConfig) -> None:
    from vlkit.viz.grid import save_figure  # imported first: it selects the Agg backend

    import matplotlib.pyplot as plt  # noqa: I001

    m = result["matrix"]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = range(1, len(m) + 1)
    ax.plot(steps, result["acc_after_task"], "ko-", lw=2, label="all seen classes")
    for j in range(len(m)):
        ax.plot(range(j + 1, len(m) + 1), [m[t][j] for t in range(j, len(m))], "o--", alpha=0.6, label=f"task {j + 1}")
    ax.set_xlabel("after task")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{cfg.name} ({cfg.method}): avg incremental {result['avg_incremental_acc']:.1f}%, "
                 f"forgetting {result['forgetting']:.1f}", fontsize=9)
    ax.set_xticks(list(steps))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
