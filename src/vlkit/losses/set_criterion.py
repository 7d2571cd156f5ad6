"""DETR's set prediction loss (Carion et al. 2020, §3.1, eqs. 1-2): a bipartite (Hungarian) match
between the N predictions and the targets minimising class probability + L1 + GIoU costs, then
cross-entropy over all N predictions (unmatched ones must say "no object", down-weighted by
``eos_coef``), L1 and 1 - GIoU on the matched boxes, each averaged over the number of targets; the
same on every auxiliary decoder layer's output. With DN-DETR's denoising queries ("dn_outputs" and
"dn_targets" in the outputs) also their reconstruction losses, without matching: cross-entropy to the
true class, L1 and 1 - GIoU to the true box ("loss_dn_ce", "loss_dn_bbox", "loss_dn_giou", per
layer). With ``focal`` (Deformable DETR) the classes are independent sigmoids without a "no object"
logit: the focal loss (alpha 0.25, gamma 2) summed over queries and classes per target box, and its
matching cost; unmatched queries must score every class low.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from vlkit.eval.boxes import cxcywh_to_xyxy, generalized_box_iou


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's focal loss, elementwise: targets are 0/1 like ``logits``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def focal_class_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(N, C) cost of labelling each prediction with each class: focal loss as positive minus as negative."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.softplus(-logits)  # -log p
    neg = (1 - alpha) * p ** gamma * F.softplus(logits)  # -log (1 - p)
    return pos - neg


class HungarianMatcher(nn.Module):
    """forward(outputs {"logits" (B, N, C+1) (C with ``focal``), "boxes" (B, N, 4) cxcywh in [0, 1]},
    targets [{"labels" (M_b,), "boxes" (M_b, 4) cxcywh}]) -> per image (prediction indices, target
    indices), both (min(N, M_b),) long."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, focal: bool = False):
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou, self.focal = cost_class, cost_bbox, cost_giou, focal

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # (B, N, C): cost of each class: -p(class), or the focal cost
        class_cost = focal_class_cost(outputs["logits"]) if self.focal else -outputs["logits"].softmax(-1)
        result = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.long)
                result.append((empty, empty))
                continue
            cost = (self.cost_class * class_cost[b][:, t["labels"]]  # (N, M)
                    + self.cost_bbox * torch.cdist(outputs["boxes"][b], t["boxes"].to(class_cost), p=1)
                    - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(outputs["boxes"][b]),
                                                           cxcywh_to_xyxy(t["boxes"].to(class_cost))))
            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            result.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return result


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> {"loss", "loss_ce", "loss_bbox", "loss_giou", (per aux layer "..._i"),
    "class_error"}; ``outputs`` may hold "aux_outputs" (a list of {"logits", "boxes"}). The focal loss is
    used when the matcher's cost is (``matcher.focal``; ``eos_coef`` then unused)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1,
                 weight_ce: float = 1.0, weight_bbox: float = 5.0, weight_giou: float = 2.0):
        super().__init__()
        self.num_classes, self.matcher, self.focal = num_classes, matcher, matcher.focal
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef  # the "no object" class, index num_classes
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def single(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        """The three losses of one decoder layer's outputs."""
        indices = self.matcher(outputs, targets)
        logits = outputs["logits"]
        B, N, _ = logits.shape
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        classes = torch.full((B, N), self.num_classes, dtype=torch.long, device=logits.device)
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        classes[batch_idx, src_idx] = matched_labels
        loss_ce = self._classes_loss(logits, classes, num_boxes)
        src_boxes = outputs["boxes"][batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(src_boxes)
        out = {"loss_ce": loss_ce, **self._box_losses(src_boxes, tgt_boxes, num_boxes)}
        if len(src_idx):
            correct = logits[batch_idx, src_idx].argmax(-1) == matched_labels
            out["class_error"] = 100 * (1 - correct.float().mean())
        return out

    @staticmethod
    def _box_losses(src_boxes: torch.Tensor, tgt_boxes: torch.Tensor, num_boxes: float) -> dict:
        """L1 and 1 - GIoU of paired boxes (K, 4) cxcywh, summed and divided by ``num_boxes``."""
        giou = generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)).diag() \
            if len(src_boxes) else src_boxes.new_zeros(0)
        return {"loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def _classes_loss(self, logits: torch.Tensor, classes: torch.Tensor, num_boxes: float) -> torch.Tensor:
        """logits (..., C+1) or (..., C) with focal, classes (...) in [0, C] (C = no object)."""
        if self.focal:
            onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits)  # no object: all zeros
            return sigmoid_focal_loss(logits, onehot).sum() / num_boxes
        return F.cross_entropy(logits.movedim(-1, 1), classes, self.empty_weight)

    def denoising(self, outputs: dict, dn: dict) -> dict:
        """The three reconstruction losses of one layer's denoising queries (``dn`` from the model)."""
        valid = dn["valid"]
        num = max(1.0, float(valid.sum()))
        boxes = self._box_losses(outputs["boxes"][valid], dn["true_boxes"][valid], num)
        return {"loss_dn_ce": self._classes_loss(outputs["logits"][valid], dn["labels"][valid], num),
                "loss_dn_bbox": boxes["loss_bbox"], "loss_dn_giou": boxes["loss_giou"]}

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        num_boxes = max(1.0, float(sum(len(t["labels"]) for t in targets)))
        losses = self.single(outputs, targets, num_boxes)
        total = sum(self.weights[k] * losses[k] for k in self.weights)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            layer = self.single(aux, targets, num_boxes)
            total = total + sum(self.weights[k] * layer[k] for k in self.weights)
            losses.update({f"{k}_{i}": v for k, v in layer.items() if k in self.weights})
        dn_layers = outputs.get("dn_outputs", [])
        for i, dn_out in enumerate(dn_layers):
            layer = self.denoising(dn_out, outputs["dn_targets"])
            total = total + sum(self.weights[k.replace("dn_", "")] * v for k, v in layer.items())
            suffix = "" if i == len(dn_layers) - 1 else f"_{i}"
            losses.update({f"{k}{suffix}": v for k, v in layer.items()})
        losses["loss"] = total
        return losses
