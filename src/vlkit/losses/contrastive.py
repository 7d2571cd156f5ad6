"""Contrastive losses as modules returning dicts of scalars (``"loss"`` is the one to minimise).

- :class:`ClipLoss`: symmetric InfoNCE over image-text pairs (CLIP, Radford et al. 2021), with the
  features of every rank gathered WITH gradients, or the local-loss variant (each rank's queries
  against all keys) that gives the same gradients at a fraction of the logits memory.
- :class:`SigLipLoss`: pairwise sigmoid loss (SigLIP, Zhai et al. 2023): every pair is an
  independent binary problem, ``-log sigmoid(z_ij * (t x_i.y_j + b))`` with z = +1 on the diagonal.
- :class:`TripletLoss`: hinge loss with the hardest in-batch negative in both directions (VSE++,
  Faghri et al. 2018).
- :class:`NTXentLoss`: SimCLR's normalised temperature-scaled cross-entropy over two views of the
  same images (Chen et al. 2020): each view's positive is the other view, the 2N - 2 rest negatives.

Inputs are L2-normalised embeddings ``(B, D)`` (the models normalise; the losses do not).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, D) of every rank in rank order, gradients flowing back to each rank's part.

    A single process (no process group, or world size 1) gets ``x`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _rank_offset(batch: int) -> int:
    return dist.get_rank() * batch if dist.is_available() and dist.is_initialized() else 0


class ClipLoss(nn.Module):
    """forward(image (B, D), text (B, D), logit_scale (scalar, already exp'd)) ->
    {"loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"}.

    Across ranks: ``local_loss=False`` builds the full (W*B, W*B) logits on every rank;
    ``local_loss=True`` only this rank's B rows and columns against all W*B. Both give the loss of
    one process holding the whole global batch (the loss is averaged like DDP averages gradients).
    """

    def __init__(self, local_loss: bool = False):
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> dict:
        all_image, all_text = gather_features(image), gather_features(text)
        if self.local_loss:
            logits_i2t = logit_scale * image @ all_text.T  # (B, W*B)
            logits_t2i = logit_scale * text @ all_image.T
            labels = torch.arange(len(image), device=image.device) + _rank_offset(len(image))
        else:
            logits_i2t = logit_scale * all_image @ all_text.T  # (W*B, W*B)
            logits_t2i = logits_i2t.T
            labels = torch.arange(len(all_image), device=image.device)
        loss_i2t = F.cross_entropy(logits_i2t, labels)
        loss_t2i = F.cross_entropy(logits_t2i, labels)
        with torch.no_grad():
            acc_i2t = (logits_i2t.argmax(-1) == labels).float().mean()
            acc_t2i = (logits_t2i.argmax(-1) == labels).float().mean()
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


class SigLipLoss(nn.Module):
    """forward(image (B, D), text (B, D), logit_scale (scalar, exp'd), logit_bias (scalar)) ->
    {"loss", "pos_prob", "neg_prob"}: the mean over images of the summed pair losses (SigLIP's
    normalisation), over the global batch when features are gathered across ranks."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> dict:
        all_text = gather_features(text)
        logits = logit_scale * image @ all_text.T + logit_bias  # (B, W*B)
        rows = torch.arange(len(image), device=image.device)
        signs = -torch.ones_like(logits)
        signs[rows, rows + _rank_offset(len(image))] = 1.0
        loss = -F.logsigmoid(signs * logits).sum(1).mean()
        with torch.no_grad():
            probs = torch.sigmoid(logits)
            pos = signs > 0
            neg_prob = probs[~pos].mean() if (~pos).any() else probs.new_zeros(())
        return {"loss": loss, "pos_prob": probs[pos].mean(), "neg_prob": neg_prob}


class TripletLoss(nn.Module):
    """VSE++: ``max(0, margin - s(i, t) + s(i, t'))`` with t' the hardest negative caption of image i,
    plus the same for each caption against its hardest negative image; averaged over the batch.
    forward(image (B, D), text (B, D)) -> {"loss", "loss_i2t", "loss_t2i"}."""

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        scores = image @ text.T  # (B, B), cosine similarities
        positive = scores.diagonal()
        eye = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
        cost_t = (self.margin + scores - positive[:, None]).clamp(min=0).masked_fill(eye, 0)  # image anchors
        cost_i = (self.margin + scores - positive[None, :]).clamp(min=0).masked_fill(eye, 0)  # caption anchors
        loss_i2t, loss_t2i = cost_t.max(1).values.mean(), cost_i.max(0).values.mean()
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


class NTXentLoss(nn.Module):
    """SimCLR: forward(view1 (N, D), view2 (N, D)) -> {"loss", "acc"}; view1[k] and view2[k] are two
    augmentations of image k. ``temperature`` scales the cosine similarities (0.1 in SimCLR's
    best setting; the loss is very sensitive to it)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict:
        z = torch.cat([view1, view2])  # (2N, D)
        n = len(view1)
        sim = (z @ z.T) / self.temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        loss = F.cross_entropy(sim, labels)
        with torch.no_grad():
            acc = (sim.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}
