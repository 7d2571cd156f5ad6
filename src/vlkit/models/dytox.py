"""DyTox: Transformers for Continual Learning with DYnamic TOken eXpansion (Douillard et al. 2022).

A shared ViT encoder (self-attention blocks) and a shared Task-Attention Block (TAB: a CaiT
class-attention block whose query is a task token, §3.1 eq. 2); one learned task token per task
seen so far, each giving a task-specialised embedding, and one classifier per task on it
(§3.2, "Task-specific classifiers"); the prediction concatenates all classifiers' logits. A new
task adds a token and a classifier (:meth:`DyTox.add_task`, the dynamic expansion, §3.2); the
previous tokens and classifiers are frozen, the shared parts keep training with distillation from
the previous model (:func:`distillation_loss`, §3.3) and a rehearsal memory; from the second task on,
an auxiliary divergence classifier (:class:`WithDivergenceHead`, §3.3) sharpens the newest embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigError
from vlkit.encoders.vit import Block, ViTConfig, VisionTransformer
from vlkit.nn.attention import ClassAttention
from vlkit.nn.layers import Linear


class DyTox(nn.Module):
    """forward(images) -> {"logits" (B, classes seen), "embeddings" (B, tasks, D)}.

    ``encoder.forward_features(images)`` must give tokens (B, N, D); the TAB reads all of them."""

    def __init__(self, encoder: nn.Module, dim: int, num_heads: int):
        super().__init__()
        self.encoder, self.dim = encoder, dim
        self.tab = Block(dim, num_heads, qkv_bias=True, attn_layer=ClassAttention)
        self.task_tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.classes_per_task: list[int] = []

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_task)

    def add_task(self, num_classes: int) -> None:
        """Dynamic expansion: freeze the previous task tokens and classifiers, add a new pair."""
        for p in [*self.task_tokens, *self.heads.parameters()]:
            p.requires_grad_(False)
        token = torch.empty(1, 1, self.dim)
        nn.init.trunc_normal_(token, std=0.02)
        device = next(self.parameters()).device
        self.task_tokens.append(nn.Parameter(token.to(device)))
        self.heads.append(task_classifier(self.dim, num_classes).to(device))
        self.classes_per_task.append(num_classes)

    def forward(self, images: torch.Tensor) -> dict:
        if not self.task_tokens:
            raise RuntimeError("DyTox has no task yet: call add_task(num_classes) first")
        patches = self.encoder.forward_features(images)  # (B, N, D)
        B = patches.shape[0]
        embeddings = []
        for token in self.task_tokens:
            t = token.expand(B, -1, -1)
            embeddings.append(self.tab(t, context=torch.cat([t, patches], dim=1))[:, 0])  # (B, D)
        logits = torch.cat([head(e) for head, e in zip(self.heads, embeddings)], dim=-1)
        return {"logits": logits, "embeddings": torch.stack(embeddings, 1)}


def task_classifier(dim: int, num_classes: int) -> nn.Sequential:
    """LayerNorm + linear, weights ~ N(0, 0.02) truncated, zero bias: each task's classifier."""
    head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.02)
    nn.init.zeros_(head[1].bias)
    return head


class WithDivergenceHead(nn.Module):
    """A DyTox plus its divergence classifier for the training of the newest task (§3.3, "Divergence
    classifier"): a classifier on the newest task's embedding over that task's classes plus one class
    standing for all the old ones (:func:`divergence_targets`), which pushes that embedding to hold what
    tells the new classes from the old (weight 0.1 in the paper). It only exists while the task trains:
    :attr:`dytox` is what is kept. forward(images) -> DyTox's dict + ``"div_logits"`` (B, new + 1)."""

    def __init__(self, model: DyTox):
        super().__init__()
        self.dytox = model
        self.head = task_classifier(model.dim, model.classes_per_task[-1] + 1).to(next(model.parameters()).device)

    def forward(self, images: torch.Tensor) -> dict:
        out = self.dytox(images)
        return {**out, "div_logits": self.head(out["embeddings"][:, -1])}


def divergence_targets(labels: torch.Tensor, num_old: int) -> torch.Tensor:
    """Class ids -> the divergence classifier's: every old class (id < num_old) -> 0, new id c -> c - num_old + 1."""
    return (labels - num_old + 1).clamp(min=0)


@dataclass
class DyToxConfig:
    """A saved DyTox (architecture ``dytox``): the encoder, the TAB's heads and the classes of each task
    learnt, in order (the model after ``len(classes_per_task)`` expansions)."""

    vit: ViTConfig = field(default_factory=lambda: ViTConfig(num_classes=0, class_token=False, global_pool="avg"))
    tab_heads: int = 4  # heads of the task-attention block (its width is vit.embed_dim)
    classes_per_task: list[int] = field(default_factory=list)  # one task token + classifier each, in order

    def __post_init__(self):
        if self.vit.num_classes:
            raise ConfigError("vit.num_classes", "must be 0: the task classifiers are DyTox's")
        if any(n < 1 for n in self.classes_per_task):
            raise ConfigError("classes_per_task", f"every task needs >= 1 class, got {self.classes_per_task}")


def build_dytox(cfg: DyToxConfig) -> DyTox:
    """A DyTox expanded to ``cfg.classes_per_task`` (fresh weights; a checkpoint's load strictly)."""
    model = DyTox(VisionTransformer(cfg.vit), cfg.vit.embed_dim, cfg.tab_heads)
    for n in cfg.classes_per_task:
        model.add_task(n)
    return model


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(old || new) on the old classes' logits, softened by ``temperature`` and scaled by T^2
    (Hinton et al. 2015), as DyTox distils the previous model's predictions."""
    n = old_logits.shape[-1]
    log_new = F.log_softmax(new_logits[:, :n] / temperature, dim=-1)
    log_old = F.log_softmax(old_logits / temperature, dim=-1)
    return F.kl_div(log_new, log_old, log_target=True, reduction="batchmean") * temperature ** 2
