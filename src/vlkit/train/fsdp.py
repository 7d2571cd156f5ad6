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

from vlkit.config import ConfigError

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
    candidates = list({id(m): m for m in candidates}.values())  # a module listed twice is sharded once
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
    are reduced and the sharded weights and optimizer states kept in float32. The activations between
    units are left as autocast makes them (the residual stream stays float32, as without sharding).

    A parameter that one rank leaves unused in a step (e.g. Flamingo's cross-attention on a batch without
    images) gets a zero gradient there, so every rank reduces the same tensors.
    """
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError("train.parallel", f"FSDP cannot shard 0-dim parameters ({', '.join(scalars)}): "
                                            "use parallel=ddp for this model")
    if hasattr(model, "prepare_sharding"):  # e.g. VLM: every rank runs the same blocks in each step
        model.prepare_sharding()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)
    units = sharding_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if hasattr(model, "set_reduce_scatter_unused_params"):  # torch >= 2.12
        model.set_reduce_scatter_unused_params(True)
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


def _kept(value, keep: bool):
    """A tensor gathered whole (every rank takes part) and copied to the CPU where ``keep``, else None."""
    value = full(value)
    return value.detach().cpu() if keep else None


def full_model_state(model: nn.Module, keep: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """The unsharded state dict of a sharded ``model`` on the CPU (collective: every rank calls it; the
    ranks with ``keep`` False gather each tensor but hold no copy and get None)."""
    state = {k: _kept(v, keep) for k, v in model.state_dict().items()}
    return state if keep else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> Optional[dict]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to the CPU (collective; None
    where ``keep`` is False)."""
    state = optimizer.state_dict()
    gathered = {idx: {k: _kept(v, keep) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                for idx, entry in state["state"].items()}
    return {"state": gathered, "param_groups": state["param_groups"]} if keep else None


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
