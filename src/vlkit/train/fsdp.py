"""Fully sharded data parallel training (PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``).

With ``train.parallel=fsdp`` under ``torchrun``, each rank holds 1/N of every parameter, gradient and
AdamW state instead of a full replica (DDP): what a language model too large to replicate needs. Each
sharding unit (by default every child of every ``nn.ModuleList``: the transformer blocks of the vision
tower, the connector and the decoder) is gathered just before its forward/backward and freed after;
what no unit owns (embeddings, heads, norms) is sharded with the root.

Checkpoints are the same files as unsharded training (full tensors, see
:mod:`vlkit.train.checkpoint`): a run saved with N ranks resumes with any number of ranks, sharded or
not. Gathering a full state dict is a collective: every rank calls :func:`full_model_state` and
:func:`full_optimizer_state`; the main rank writes.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

log = logging.getLogger(__name__)


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded on their own, deepest first: ``model.fsdp_units()`` when the model defines it,
    else every child with parameters of every ``nn.ModuleList``. A unit sharing a parameter with anything
    outside it (e.g. a tied weight) is left to its parent."""
    if hasattr(model, "fsdp_units"):
        candidates = list(model.fsdp_units())
    else:
        candidates = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m
                      if any(True for _ in child.parameters())]
    order = {id(m): i for i, m in enumerate(model.modules())}
    candidates.sort(key=lambda m: -order[id(m)])  # children before their parents
    units = []
    for unit in candidates:
        inside = {id(p) for p in unit.parameters()}
        outside = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
                   if not _owned_by(model, unit, name)}
        if inside & outside:
            log.info("fsdp: %s shares a parameter with the rest of the model: sharded with its parent",
                     type(unit).__name__)
            continue
        units.append(unit)
    return units


def _owned_by(model: nn.Module, unit: nn.Module, param_name: str) -> bool:
    """True when parameter ``param_name`` of ``model`` is reached through ``unit``."""
    module = model
    for part in param_name.split(".")[:-1]:
        if module is unit:
            return True
        module = getattr(module, part)
    return module is unit


def shard(model: nn.Module, device: torch.device, world: int, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Shard ``model`` over ``world`` ranks in place; returns it. ``fully_shard`` moves each unit's parameters
    to ``device`` and keeps this rank's shard, so a model built on the CPU never sits whole on the accelerator.

    ``param_dtype`` (bf16 training on CUDA): the dtype parameters are gathered and computed in; gradients
    are reduced and the sharded weights and optimizer states kept in float32.
    """
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units = sharding_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    held = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info("fsdp: %d units + the root sharded over %d ranks: this rank holds %.1f of %.1f MiB of parameters",
             len(units), world, held / 2 ** 20, total / 2 ** 20)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def full(value):
    """A sharded tensor gathered whole (collective); any other value unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded ``model`` on the CPU (collective: every rank calls it)."""
    return {k: full(v).detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to the CPU (collective)."""
    state = optimizer.state_dict()
    gathered = {idx: {k: full(v).detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                for idx, entry in state["state"].items()}
    return {"state": gathered, "param_groups": state["param_groups"]}


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` placed like ``ref``: this rank's shard when ``ref`` is sharded, else a plain copy."""
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device, ref.dtype)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (same keys and shapes, checked by the caller) into a sharded model."""
    model.load_state_dict({k: _like(state[k], v) for k, v in model.state_dict().items()}, strict=True)


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load an unsharded ``optimizer.state_dict()`` (as saved) into the optimizer of a sharded model."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, entry in saved["state"].items():
        param = params[int(idx)]
        state[idx] = {k: _like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                      for k, v in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
