"""Multi-process training through ``torchrun``: process group set-up and small collectives.

``torchrun --nproc_per_node N ...`` sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT);
without them everything here is a no-op for a single process. Backend: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_distributed() -> bool:
    """Join the process group torchrun describes (once). Returns True when world size > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce(values: Sequence[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.to(device())
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a list of Python numbers (one collective)."""
    return _reduce(values)


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Element-wise mean over ranks of a list of Python numbers (one collective)."""
    return [v / world_size() for v in _reduce(values)]


def all_reduce_min(values: Sequence[float]) -> list[float]:
    """Element-wise minimum over ranks of a list of Python numbers (one collective)."""
    return _reduce(values, dist.ReduceOp.MIN)


def cleanup() -> None:
    """Leave the process group; every rank waits for the others first (gloo aborts a process
    whose peer tears the group down while it is still using it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
