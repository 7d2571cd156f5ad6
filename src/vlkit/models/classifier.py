"""Image classifiers: a ViT/DeiT/CaiT (optionally hybrid, on a convnet feature map) or a convnet.

One config, :class:`ClassifierConfig`, names the architecture; :func:`build_classifier` builds it.
Every classifier takes the images the data pipeline produces, normalised with
``input_mean`` / ``input_std``, and returns logits (B, num_classes).

A pretrained convnet expects its own input scale and often a larger size: :class:`InputAdapter`
undoes the pipeline's normalisation (back to [0, 1]), resizes, and calls the convnet, which
normalises for itself. That is how the pretrained EfficientNet-Lite0 of ASSETS.md serves as a
DeiT teacher on 28x28 Fashion-MNIST images, or as the token source of a hybrid ViT (ViT §3.1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import ConfigError, replace
from vlkit.encoders.convnet import EfficientNetLite, create_efficientnet_lite
from vlkit.encoders.vit import ViTConfig, VisionTransformer
from vlkit.nn.patch_embed import ConvStem

log = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    """Which classifier to build and how its input relates to the data pipeline's."""

    arch: Literal["vit", "efficientnet_lite0"] = "vit"  # vit = ViT/DeiT/CaiT (see `vit`); or a convnet
    num_classes: int = 1000  # classifier outputs (recipes fill it from the dataset); overrides vit.num_classes
    vit: ViTConfig = field(default_factory=ViTConfig)  # the transformer (arch=vit)
    backbone: Literal["none", "efficientnet_lite0", "conv_stem"] = "none"  # arch=vit: convnet whose feature map
    # gives the tokens (conv_stem: Xiao et al.'s convolutional stem, trained with the ViT)
    stem_channels: tuple[int, ...] = (32, 64)  # backbone=conv_stem: widths of its stride-2 3x3 convs
    pretrained: bool = True  # load the convnet's ImageNet weights (arch or backbone efficientnet_lite0)
    convnet_size: int = 0  # side the convnet sees (images are resized); 0 = as given
    input_mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # the data pipeline's normalisation mean
    input_std: tuple[float, ...] = (0.229, 0.224, 0.225)  # the data pipeline's normalisation std

    def __post_init__(self):
        if self.num_classes < 1:
            raise ConfigError("num_classes", f"must be >= 1, got {self.num_classes}")
        if self.vit.num_classes != self.num_classes:
            self.vit = replace(self.vit, num_classes=self.num_classes)
        if self.arch != "vit" and self.backbone != "none":
            raise ConfigError("backbone", f"only arch=vit takes a backbone, arch is {self.arch!r}")
        if self.backbone != "none" and self.vit.embed != "hybrid":
            self.vit = replace(self.vit, embed="hybrid")
        if self.convnet_size < 0:
            raise ConfigError("convnet_size", f"must be >= 0, got {self.convnet_size}")
        if len(self.input_mean) != len(self.input_std):
            raise ConfigError("input_std", f"has {len(self.input_std)} values, input_mean {len(self.input_mean)}")


class InputAdapter(nn.Module):
    """Feeds pipeline-normalised images to a convnet that expects [0, 1] images of another size.

    forward(images (B, C, H, W) normalised with mean/std) -> ``convnet(x)``, and
    ``forward_features`` / ``forward_intermediates`` -> the convnet's on ``x``, with
    ``x = resize(images * std + mean, size)`` in [0, 1]. ``num_features`` is the convnet's.
    """

    def __init__(self, convnet: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int = 0):
        super().__init__()
        self.convnet = convnet
        self.size = size
        self.num_features = getattr(convnet, "num_features", None)
        self.stage_channels = getattr(convnet, "stage_channels", None)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def _to_unit(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.std + self.mean  # (B, C, H, W) in [0, 1]
        if self.size and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.convnet.forward_features(self._to_unit(images))

    def forward_intermediates(self, images: torch.Tensor, indices=1) -> list[torch.Tensor]:
        return self.convnet.forward_intermediates(self._to_unit(images), indices)

    def forward_head(self, fmap: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.convnet.forward_head(fmap, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.convnet(self._to_unit(images))

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.convnet, "no_weight_decay", lambda: set())()
        return {f"convnet.{n}" for n in inner}


def _efficientnet(num_classes: int, pretrained: bool) -> EfficientNetLite:
    if not pretrained:
        return create_efficientnet_lite("efficientnet_lite0", num_classes=num_classes)
    from vlkit.checkpoints.efficientnet import load_efficientnet_lite0

    return load_efficientnet_lite0(num_classes=num_classes).train()


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """The classifier ``cfg`` describes, initialised (pretrained parts loaded if ``cfg.pretrained``)."""
    adapt = lambda net: InputAdapter(net, cfg.input_mean, cfg.input_std, cfg.convnet_size)  # noqa: E731
    if cfg.arch == "efficientnet_lite0":
        return adapt(_efficientnet(cfg.num_classes, cfg.pretrained))
    backbone = adapt(_efficientnet(0, cfg.pretrained)) if cfg.backbone == "efficientnet_lite0" else None
    if cfg.backbone == "conv_stem":
        backbone = ConvStem(cfg.vit.in_chans, tuple(cfg.stem_channels))
    return VisionTransformer(cfg.vit, backbone=backbone)
