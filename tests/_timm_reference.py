"""timm, the reference for vlkit's timm loader, imported without torchvision.

scripts/setup.sh installs timm --no-deps. timm imports torchvision, which does not import with this torch
(ASSETS.md), so stand-in modules answer those imports while timm loads and leave ``sys.modules`` right
after: no ViT code of timm calls torchvision. Used by tests/test_timm.py and scripts/timm_vit_table.py.
"""
from __future__ import annotations

import enum
import sys
import types

STAND_INS = ["torchvision", *(f"torchvision.{n}" for n in ("ops", "ops.misc", "transforms", "transforms.functional",
                                                           "datasets", "models", "models.feature_extraction"))]


def _placeholder(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


class _InterpolationMode(enum.Enum):
    NEAREST, BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS = "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"


def import_timm():
    """The ``timm`` module (imported once)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    stand_ins = {n: types.ModuleType(n) for n in STAND_INS if n not in sys.modules}
    for n, module in stand_ins.items():
        module.__path__, module.__getattr__ = [], _placeholder
        parent, _, child = n.rpartition(".")
        if parent in stand_ins:  # a submodule is an attribute of its parent, as after a real import
            setattr(stand_ins[parent], child, module)
    if "torchvision.transforms.functional" in stand_ins:
        stand_ins["torchvision.transforms.functional"].InterpolationMode = _InterpolationMode
    sys.modules.update(stand_ins)
    try:
        import timm
    finally:
        for n in stand_ins:
            sys.modules.pop(n, None)
    return timm
