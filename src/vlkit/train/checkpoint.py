"""Training checkpoints: atomic folders of safetensors + JSON (nothing is ever pickled).

``run_dir/checkpoints/step-00001200/`` holds ``model.safetensors``, ``optimizer.safetensors`` +
``optimizer.json``, ``ema.safetensors`` (if EMA), ``rng.safetensors`` and ``trainer_state.json``.
A checkpoint is written into a ``tmp-*`` folder, then renamed (atomic on POSIX); the ``latest``
file naming it is replaced last. A run killed at any moment leaves the previous checkpoint intact;
leftover ``tmp-*`` folders are ignored and removed.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from vlkit.checkpoints.io import atomic_write_text, dedup_shared, read_safetensors

log = logging.getLogger(__name__)


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors "state.{param}.{key}", JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in doc["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": doc["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    doc = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, doc


def _set_rng_state(tensors: dict[str, torch.Tensor], doc: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = doc["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = doc["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tensors, aliases = dedup_shared(tensors)
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, ema: Optional[torch.nn.Module] = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and prune to ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=root))
    _save_tensors(model.state_dict(), tmp / "model.safetensors")
    opt_tensors, opt_doc = optimizer_to_flat(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_doc))
    if ema is not None:
        _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
    rng_tensors, rng_doc = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "rng": rng_doc}, indent=1))
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(root / "latest", final.name)
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, latest: str) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob("tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` (``latest`` pointer, else the highest step)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists() and (root / pointer.read_text().strip() / "trainer_state.json").exists():
        return root / pointer.read_text().strip()
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def load_checkpoint(folder: str | Path) -> dict:
    """``{"model", "optimizer", "ema" (or None), "state"}`` of a checkpoint folder; RNG restored."""
    folder = Path(folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    optimizer = optimizer_from_flat(read_safetensors(folder / "optimizer.safetensors"),
                                    json.loads((folder / "optimizer.json").read_text()))
    ema_path = folder / "ema.safetensors"
    _set_rng_state(read_safetensors(folder / "rng.safetensors"), state.pop("rng"))
    return {"model": read_safetensors(folder / "model.safetensors"), "optimizer": optimizer,
            "ema": read_safetensors(ema_path) if ema_path.exists() else None, "state": state}
