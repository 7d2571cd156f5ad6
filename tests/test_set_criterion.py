"""Box utilities and DETR's Hungarian matching + set criterion."""
import itertools

import pytest
import torch

from vlkit.eval.boxes import (box_area, box_iou, cxcywh_to_xyxy, generalized_box_iou, xywh_to_xyxy,
                              xyxy_to_cxcywh)
from vlkit.losses.set_criterion import HungarianMatcher, SetCriterion


def random_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.6
    wh = torch.rand(n, 2, generator=g) * 0.35 + 0.05
    return torch.cat([xy, xy + wh], -1)


def test_box_formats_round_trip():
    b = random_boxes(10)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, atol=1e-6)
    assert torch.allclose(xywh_to_xyxy(torch.tensor([[1.0, 2, 3, 4]])), torch.tensor([[1.0, 2, 4, 6]]))
    assert torch.allclose(box_area(torch.tensor([[0.0, 0, 2, 3], [1, 1, 0, 0]])), torch.tensor([6.0, 0.0]))


def test_giou_properties():
    a, b = random_boxes(6, 1), random_boxes(5, 2)
    g = generalized_box_iou(a, b)
    iou, _ = box_iou(a, b)
    assert g.shape == (6, 5) and (g <= iou + 1e-6).all() and (g >= -1).all() and (g <= 1).all()
    assert torch.allclose(generalized_box_iou(a, a).diag(), torch.ones(6))
    assert torch.allclose(g, generalized_box_iou(b, a).T)
    far = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[9.0, 9, 10, 10]]))
    assert -1 < far.item() < -0.9  # disjoint and far apart: close to -1 (IoU alone would be 0)
    with pytest.raises(ValueError, match="xyxy"):
        generalized_box_iou(torch.tensor([[1.0, 1, 0, 0]]), a)


def outputs_and_targets(B=3, N=6, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"logits": torch.randn(B, N, C + 1, generator=g, requires_grad=True),
               "boxes": xyxy_to_cxcywh(random_boxes(B * N, seed)).view(B, N, 4).requires_grad_(True)}
    sizes = [2, 0, 4][:B]
    targets = [{"labels": torch.randint(0, C, (m,), generator=g),
                "boxes": xyxy_to_cxcywh(random_boxes(m, seed + 10 + i))} for i, m in enumerate(sizes)]
    return outputs, targets


def test_matcher_is_optimal_batched_equals_unbatched_and_handles_empty_targets():
    outputs, targets = outputs_and_targets()
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b, t in enumerate(targets):
        alone = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [t])[0]
        assert all(torch.equal(x, y) for x, y in zip(batched[b], alone))
    assert len(batched[1][0]) == 0
    # optimal: no assignment of the 4 targets of image 2 to 4 of the 6 predictions is cheaper
    probs = outputs["logits"][2].softmax(-1).detach()
    t = targets[2]
    cost = (-probs[:, t["labels"]] + 5 * torch.cdist(outputs["boxes"][2].detach(), t["boxes"], p=1)
            - 2 * generalized_box_iou(cxcywh_to_xyxy(outputs["boxes"][2].detach()), cxcywh_to_xyxy(t["boxes"])))
    best = min(sum(cost[p, j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(6), 4))
    rows, cols = batched[2]
    assert torch.isclose(cost[rows, cols].sum(), torch.tensor(float(best)), atol=1e-5)


def test_set_criterion_losses_and_gradients():
    outputs, targets = outputs_and_targets()
    outputs["aux_outputs"] = [{"logits": outputs["logits"] * 0.5, "boxes": outputs["boxes"]}]
    crit = SetCriterion(num_classes=4, matcher=HungarianMatcher(), eos_coef=0.1)
    losses = crit(outputs, targets)
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "class_error"} <= set(losses)
    losses["loss"].backward()
    assert outputs["logits"].grad.abs().sum() > 0 and outputs["boxes"].grad.abs().sum() > 0
    # perfect predictions: box losses 0; the no-object class of unmatched queries down-weighted
    perfect = {"logits": torch.full((1, 3, 5), -10.0), "boxes": torch.zeros(1, 3, 4)}
    t = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    perfect["boxes"][0, 1] = t[0]["boxes"][0]
    perfect["boxes"][0, [0, 2]] = torch.tensor([0.2, 0.2, 0.1, 0.1])
    perfect["logits"][0, 1, 2] = 10.0
    perfect["logits"][0, [0, 2], 4] = 10.0
    out = crit(perfect, t)
    assert out["loss_bbox"] < 1e-6 and out["loss_giou"] < 1e-6 and out["loss_ce"] < 1e-3
    empty = crit(perfect, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert torch.isfinite(empty["loss"]) and empty["loss_bbox"] == 0


def test_focal_loss_values_matching_and_criterion():
    from vlkit.losses.set_criterion import focal_class_cost, sigmoid_focal_loss

    logits, targets = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])
    p = logits.sigmoid()
    expected = torch.stack([0.25 * (1 - p[0]) ** 2 * -p[0].log(), 0.75 * p[1] ** 2 * -(1 - p[1]).log(),
                            0.25 * (1 - p[2]) ** 2 * -p[2].log()])
    assert torch.allclose(sigmoid_focal_loss(logits, targets), expected, atol=1e-6)
    cost = focal_class_cost(torch.tensor([[3.0, -3.0]]))  # confident in class 0: cheap to label 0, dear to label 1
    assert cost[0, 0] < 0 < cost[0, 1]
    outputs, targets = outputs_and_targets()
    outputs["logits"] = outputs["logits"][..., :-1].detach().requires_grad_(True)  # C logits, no "no object"
    crit = SetCriterion(num_classes=4, matcher=HungarianMatcher(2.0, 5.0, 2.0, focal=True))
    losses = crit(outputs, targets)
    losses["loss"].backward()
    assert outputs["logits"].grad.abs().sum() > 0 and crit.focal
    perfect = {"logits": torch.full((1, 3, 4), -10.0), "boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1],
                                                                              [0.5, 0.5, 0.2, 0.2],
                                                                              [0.8, 0.8, 0.1, 0.1]]])}
    perfect["logits"][0, 1, 2] = 10.0
    t = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    res = crit(perfect, t)
    assert res["loss_ce"] < 1e-6 and res["loss_bbox"] < 1e-6 and res["class_error"] == 0
