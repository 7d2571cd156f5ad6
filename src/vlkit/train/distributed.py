"""Multi-process training through ``torchrun``: process group set-up and small collectives.

``torchrun --nproc_per_node N ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a no-op for a single process. Backend: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> bool:
    """Join the process group torchrun describes (once). Returns True when world size > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float | int) -> float:
    """Sum of a Python number over ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


def cleanup() -> None:
    """Leave the process group; every rank waits for the others first (gloo aborts a process
    whose peer tears the group down while it is still using it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
