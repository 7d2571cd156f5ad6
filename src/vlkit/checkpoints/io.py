"""vlkit's own checkpoint format and strict state-dict loading.

A saved model is a folder::

    config.json        {"format": "vlkit", "version": 1, "architecture": "vit", "config": {...},
                        "backbone": {"architecture": ..., "config": {...}} | null,
                        "meta": {"class_names": [...], "preprocess": {...}, ...}}
    model.safetensors  the state dict (shared tensors stored once)

Nothing is ever unpickled. Loading matches every key and shape or fails naming the first mismatch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model (missing/unexpected key, wrong shape) or is unreadable."""


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Load ``state_dict`` into ``model``: every key and shape must match, else raise.

    The error names the first mismatch (and how many there are), e.g.
    ``missing key 'blocks.0.attn.qkv.weight'``. Buffers that are not persistent are ignored.
    """
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Raise :class:`CheckpointError` naming the first key or shape of ``state_dict`` that ``model`` lacks
    or does not match (the check of :func:`load_state_dict_strict`, without loading)."""
    expected = model.state_dict()
    where = f" in {source}" if source else ""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing:
        raise CheckpointError(f"missing key '{missing[0]}'{where} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"unexpected key '{unexpected[0]}'{where} ({len(unexpected)} unexpected in all)")
    if shapes:
        k = shapes[0]
        raise CheckpointError(f"shape mismatch for '{k}'{where}: checkpoint {tuple(state_dict[k].shape)}, "
                              f"model {tuple(expected[k].shape)} ({len(shapes)} mismatches in all)")


def dedup_shared(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous copies of a state dict with tensors sharing storage stored once.

    Returns ``(tensors, aliases)`` where ``aliases[name] = kept_name`` for the dropped duplicates
    (e.g. tied input/output embeddings).
    """
    tensors, aliases, seen = {}, {}, {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_pretrained(model: nn.Module, folder: str | Path, architecture: str, config: dict,
                    backbone: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``model`` as a vlkit folder (config.json + model.safetensors). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = dedup_shared(model.state_dict())
    save_file(tensors, str(folder / "model.safetensors.tmp"), metadata={"aliases": json.dumps(aliases)})
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    doc = {"format": "vlkit", "version": FORMAT_VERSION, "architecture": architecture, "config": config,
           "backbone": backbone, "meta": meta or {}}
    atomic_write_text(folder / "config.json", json.dumps(doc, indent=2))
    return folder


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, restoring vlkit's aliases of shared tensors if present."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    for name, kept in aliases.items():
        tensors[name] = tensors[kept]
    return tensors


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json: not a model folder")
    return json.loads(path.read_text())
