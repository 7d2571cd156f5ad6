"""Training checkpoints: atomic folders of safetensors + JSON (nothing is ever pickled).

``run_dir/checkpoints/`` holds ``step-00001200/`` folders and a ``latest`` text file naming the
newest. A folder holds:

- ``model.safetensors``: the model's state dict (tensors sharing storage stored once, aliases in the
  metadata, see :func:`vlkit.checkpoints.io.dedup_shared`);
- ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()["state"]`` as
  ``state.{param_index}.{name}``; ``optimizer.json``: ``{"param_groups": [...], "state": {index: {name:
  non-tensor value}}}``;
- ``ema.safetensors`` (with EMA): ``ModelEMA.state_dict()``;
- ``rng.safetensors``: ``torch`` (CPU generator state, uint8) and ``cuda.{i}`` tensors; the Python
  and NumPy states as JSON in its metadata;
- ``trainer_state.json``: ``{"step": int, **extra_state}`` (the loop stores epoch, position in the
  epoch, sample/skip/non-finite counts, best metrics and its config there).

A checkpoint is written into ``checkpoints/tmp-*``, renamed to ``step-*`` (atomic on POSIX), then
``latest`` is replaced: a run killed at any moment leaves the previous checkpoint intact. Leftover
``tmp-*`` folders are never read and are removed by :func:`remove_partial` and each save.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlkit.checkpoints.io import CheckpointError, atomic_write_text, dedup_shared, read_safetensors

log = logging.getLogger(__name__)

PREFIX = "step-"


def step_dirname(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---------------------------------------------------------------------------- optimizer <-> flat
def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors ``state.{param}.{name}``, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    """Inverse of :func:`optimizer_to_flat`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in doc["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": doc["param_groups"]}


# ---------------------------------------------------------------------------- random number generators
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors: torch CPU and CUDA generator states, metadata: Python and NumPy states as JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {"python": json.dumps(random.getstate()),
            "numpy": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)])}
    return tensors, meta


def restore_rng(rng: dict) -> None:
    """Set the generators from ``load_checkpoint(...)["rng"]`` (``{"tensors", "meta"}``)."""
    tensors, meta = rng["tensors"], rng["meta"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------- save
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: Optional[dict[str, str]] = None) -> None:
    tensors, aliases = dedup_shared(tensors)
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), **(meta or {})})


def _fsync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` and the folder itself to disk (survives a power cut, not just a kill)."""
    for path in [*folder.iterdir(), folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _write_contents(tmp: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | dict,
                    ema: Optional[nn.Module], extra_state: dict) -> None:
    _save_tensors(model.state_dict(), tmp / "model.safetensors")
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    opt_tensors, opt_doc = optimizer_to_flat(opt_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_doc, indent=1))
    if ema is not None:
        _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"), metadata=rng_meta)
    (tmp / "trainer_state.json").write_text(json.dumps({**extra_state, "step": step}, indent=1))
    _fsync_tree(tmp)


def save_checkpoint(folder: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | dict,
                    ema: Optional[nn.Module] = None, extra_state: Optional[dict] = None, keep: int = 0) -> Path:
    """Write checkpoint ``folder/step-{step:08d}`` atomically, point ``folder/latest`` at it (last),
    then keep only the ``keep`` newest checkpoints (0 = keep all). Returns the checkpoint folder.

    ``model`` is the unwrapped module (not DDP / compiled); ``optimizer`` an optimizer or its (unsharded)
    state dict; ``extra_state`` must be JSON-able.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=root))
    try:
        _write_contents(tmp, step, model, optimizer, ema, extra_state or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / step_dirname(step)
    if final.exists():  # the same step saved again (e.g. the end of a resumed, finished run)
        old = Path(tempfile.mkdtemp(prefix="tmp-old-", dir=root))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    _fsync_tree(root)
    atomic_write_text(root / "latest", final.name)
    prune(root, keep, protect=final)
    remove_partial(root)
    return final


def prune(root: Path, keep: int, protect: Optional[Path] = None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints of ``root`` (0 = keep all); ``protect``
    (the one just written) is never deleted."""
    if keep > 0:
        for old in _complete(root)[:-keep]:
            if protect is None or old.name != protect.name:
                shutil.rmtree(old, ignore_errors=True)


def remove_partial(folder: str | Path) -> None:
    """Delete the ``tmp-*`` folders a killed save left behind (``folder``: run or checkpoints dir)."""
    for tmp in _root(Path(folder)).glob("tmp-*"):
        log.info("removing partial checkpoint %s", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- find and load
def _root(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints of ``root`` (``step-*`` with ``trainer_state.json``), oldest first."""
    done = [p for p in root.glob(f"{PREFIX}*") if _step_of(p) >= 0 and (p / "trainer_state.json").is_file()]
    return sorted(done, key=_step_of)


def find_latest(path: str | Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None.

    ``path`` is a run folder (its ``checkpoints/`` is searched) or a checkpoints folder. The
    ``latest`` pointer is followed when it names a complete checkpoint, else the highest step wins.
    ``tmp-*`` folders are never returned.
    """
    root = _root(Path(path))
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name.startswith(PREFIX) and (named / "trainer_state.json").is_file():
            return named
    done = _complete(root)
    return done[-1] if done else None


def _read_rng(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return {"tensors": read_safetensors(path), "meta": meta}


def load_checkpoint(folder: str | Path) -> dict:
    """Read a checkpoint folder (no side effect). Returns::

        {"step": int, "model": {name: Tensor}, "optimizer": optimizer state dict,
         "ema": {name: Tensor} | None, "state": trainer_state.json dict, "rng": {"tensors", "meta"}}

    Apply ``rng`` with :func:`restore_rng`. Raises :class:`CheckpointError` for an incomplete folder.
    """
    folder = Path(folder)
    needed = ("trainer_state.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
              "rng.safetensors")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete training checkpoint: no {missing[0]}")
    state = json.loads((folder / "trainer_state.json").read_text())
    optimizer = optimizer_from_flat(read_safetensors(folder / "optimizer.safetensors"),
                                    json.loads((folder / "optimizer.json").read_text()))
    ema_path = folder / "ema.safetensors"
    return {"step": state["step"], "model": read_safetensors(folder / "model.safetensors"), "optimizer": optimizer,
            "ema": read_safetensors(ema_path) if ema_path.exists() else None, "state": state,
            "rng": _read_rng(folder / "rng.safetensors")}
