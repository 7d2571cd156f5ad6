"""Writes src/vlkit/checkpoints/timm_vit_table.py: for every timm ViT architecture vlkit's ViT can hold
(LayerNorm, plain attention and MLP blocks), what its tensors do not show: heads, activation, epsilon.

    .venv/bin/python scripts/timm_vit_table.py      # after a timm upgrade (scripts/setup.sh pins it)

Each architecture is built on the meta device (no memory, no weights) and read from its first block.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _timm_reference import import_timm  # noqa: E402

OUT = ROOT / "src" / "vlkit" / "checkpoints" / "timm_vit_table.py"


def activation(act) -> str | None:
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}.get(name)


def facts(timm, name: str):
    """(heads, activation, epsilon) of architecture ``name``; "refused" when vlkit's ViT cannot hold it
    although its tensors are named as a ViT's (post-norm blocks, rotary tables in buffers, other classes);
    None for the rest."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # architectures that need arguments or other packages
        return None
    keys = set(model.state_dict())
    if not isinstance(model, timm.models.vision_transformer.VisionTransformer) or not len(model.blocks):
        return "refused" if {"pos_embed", "patch_embed.proj.weight"} <= keys else None
    if getattr(model, "global_pool", "token") not in ("token", "avg", "map", "") or \
            (model.attn_pool is not None and model.num_prefix_tokens):
        return "refused"
    block = model.blocks[0]
    if type(block).__name__ != "Block":
        return "refused"
    kinds = (type(block.norm1).__name__, type(block.attn).__name__, type(block.mlp).__name__)
    if kinds != ("LayerNorm", "Attention", "Mlp") or activation(block.mlp.act) is None:
        return "refused"
    return block.attn.num_heads, activation(block.mlp.act), block.norm1.eps


def main() -> None:
    warnings.filterwarnings("ignore")
    timm = import_timm()
    found = {name: row for name in timm.list_models() if not name.startswith("test_")
             if (row := facts(timm, name)) is not None}
    rows = {name: row for name, row in found.items() if row != "refused"}
    refused = sorted(name for name, row in found.items() if row == "refused")
    lines = [f'    "{name}": ({heads}, "{act}", {eps!r}),' for name, (heads, act, eps) in sorted(rows.items())]
    OUT.write_text(
        f'"""timm {timm.__version__} ViT architectures vlkit\'s ViT holds -> (heads, activation, LayerNorm epsilon):\n'
        "what their tensors do not show; and those whose tensors are named as a ViT's but compute otherwise\n"
        "(post-norm blocks, rotary embedding, other pooling): refused by name. Written by\n"
        "scripts/timm_vit_table.py; do not edit by hand.\"\"\"\n\n"
        f"TIMM_VERSION = \"{timm.__version__}\"\n"
        "TIMM_VITS: dict[str, tuple[int, str, float]] = {\n" + "\n".join(lines) + "\n}\n"
        "TIMM_NOT_VITS: frozenset[str] = frozenset({\n" + "\n".join(f'    "{n}",' for n in refused) + "\n})\n")
    print(f"{len(rows)} architectures, {len(refused)} refused -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
