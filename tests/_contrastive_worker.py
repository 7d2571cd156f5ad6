"""Run by tests/test_contrastive.py in each of 2 gloo processes: loss and feature gradients of a
rank's share of a global batch, written to ``out/rank{r}.pt`` (plain tensors, weights_only load)."""
import os
import sys

import torch
import torch.distributed as dist

from vlkit.losses.contrastive import ClipLoss, SigLipLoss


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    result = {}
    for name, loss_fn in [("clip", ClipLoss()), ("clip_local", ClipLoss(local_loss=True)), ("siglip", SigLipLoss())]:
        x, y = image[share].clone().requires_grad_(), text[share].clone().requires_grad_()
        args = (torch.tensor(10.0),) if name != "siglip" else (torch.tensor(10.0), torch.tensor(-5.0))
        loss = loss_fn(x, y, *args)["loss"]
        loss.backward()
        result[name] = torch.cat([loss.detach()[None], x.grad.flatten(), y.grad.flatten()])
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
