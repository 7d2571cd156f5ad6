"""Contrastive losses against direct loop implementations, and across 2 gloo processes."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlkit.losses.contrastive import ClipLoss, NTXentLoss, SigLipLoss, TripletLoss


def _pairs(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_is_symmetric_infonce():
    x, y = _pairs()
    out = ClipLoss()(x, y, torch.tensor(7.0))
    expected = 0.0
    for i in range(len(x)):  # -log softmax of the matching pair, both directions
        row = [7.0 * float(x[i] @ y[j]) for j in range(len(y))]
        col = [7.0 * float(y[i] @ x[j]) for j in range(len(x))]
        expected += -(row[i] - math.log(sum(map(math.exp, row)))) - (col[i] - math.log(sum(map(math.exp, col))))
    assert out["loss"].item() == pytest.approx(expected / (2 * len(x)), rel=1e-5)
    perfect = ClipLoss()(x, x, torch.tensor(100.0))
    assert perfect["loss"] < 1e-3 and perfect["acc_i2t"] == 1 and perfect["acc_t2i"] == 1


def test_siglip_loss_sums_pairwise_sigmoid_terms():
    x, y = _pairs()
    out = SigLipLoss()(x, y, torch.tensor(10.0), torch.tensor(-3.0))
    expected = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            z = 1.0 if i == j else -1.0
            expected += -math.log(1 / (1 + math.exp(-z * (10.0 * float(x[i] @ y[j]) - 3.0))))
    assert out["loss"].item() == pytest.approx(expected / len(x), rel=1e-5)


def test_triplet_loss_uses_the_hardest_negative_both_ways():
    x, y = _pairs()
    out = TripletLoss(margin=0.2)(x, y)
    s = x @ y.T
    n = len(x)
    i2t = sum(max(max(0.0, 0.2 - s[i, i].item() + s[i, j].item()) for j in range(n) if j != i) for i in range(n)) / n
    t2i = sum(max(max(0.0, 0.2 - s[j, j].item() + s[i, j].item()) for i in range(n) if i != j) for j in range(n)) / n
    assert out["loss_i2t"].item() == pytest.approx(i2t, rel=1e-5)
    assert out["loss_t2i"].item() == pytest.approx(t2i, rel=1e-5)
    far = torch.eye(4)  # each pair identical, negatives orthogonal: every margin is satisfied
    assert TripletLoss(0.2)(far, far)["loss"] == 0


def test_nt_xent_matches_simclr_definition_and_rejects_bad_temperature():
    a, b = _pairs(4)
    out = NTXentLoss(temperature=0.5)(a, b)
    z = torch.cat([a, b])
    expected = 0.0
    for k in range(8):
        pos = (k + 4) % 8
        others = [math.exp(float(z[k] @ z[m]) / 0.5) for m in range(8) if m != k]
        expected += -(float(z[k] @ z[pos]) / 0.5 - math.log(sum(others)))
    assert out["loss"].item() == pytest.approx(expected / 8, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Mean of the ranks' losses == the 1-process loss; each rank's feature gradients == W x the
    1-process gradients of its share (DDP then averages over the W ranks)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(Path(__file__).with_name("_contrastive_worker.py")), str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=120, capture_output=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    for name, loss_fn in [("clip", ClipLoss()), ("clip_local", ClipLoss(local_loss=True)), ("siglip", SigLipLoss())]:
        x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
        args = (torch.tensor(10.0),) if name != "siglip" else (torch.tensor(10.0), torch.tensor(-5.0))
        loss = loss_fn(x, y, *args)["loss"]
        loss.backward()
        losses = [r[name][0] for r in ranks]
        assert (losses[0] + losses[1]).item() / 2 == pytest.approx(loss.item(), rel=1e-5), name
        for r in range(2):
            grads = ranks[r][name][1:].view(2, 4, 16)
            torch.testing.assert_close(grads[0] / 2, x.grad[4 * r:4 * r + 4], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(grads[1] / 2, y.grad[4 * r:4 * r + 4], atol=1e-6, rtol=1e-4)
