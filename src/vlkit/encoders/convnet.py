"""EfficientNet-Lite: a convnet classifier and feature-map backbone, one model configured by
:class:`EfficientNetLiteConfig`.

- EfficientNet: Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
  Networks" (ICML): MBConv blocks (inverted residual bottleneck of MobileNetV2, Sandler et al.
  2018) in 7 stages (Table 1), compound scaling of width and depth (§3.3, eq. 3), stochastic
  depth ("drop connect") on the residual branch and dropout before the classifier (§5.2).
- The "Lite" variant (TensorFlow ``efficientnet/lite``, 2020) for mobile accelerators: no
  squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 channels), the head
  (1280 channels) and the repeats of the first and last stages are not scaled.

Convolutions pad like TensorFlow's ``SAME`` (asymmetric for stride 2), which the pretrained
weights were trained with; any input size works. Images come in as floats in [0, 1]; the model
owns its input normalisation (``(x * 255 - 127) / 128`` for the Lite weights).

Shapes: B batch, C channels, H x W image, h x w = ceil(H / 32) x ceil(W / 32) final feature map.
Parameter names follow timm's ``efficientnet.py`` (``conv_stem``, ``blocks.<stage>.<i>.conv_dw``,
``conv_head``, ``classifier``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.config import ConfigError, from_dict, replace
from vlkit.nn.layers import DropPath


class StageSpec(NamedTuple):
    """One stage of MBConv blocks (a row of EfficientNet's Table 1); the stride is the first block's."""

    repeats: int  # blocks in the stage (before depth scaling)
    kernel: int  # depthwise kernel size
    stride: int  # stride of the first block (the others: 1)
    expand: int  # expansion ratio of the inverted bottleneck (1 = no expansion conv)
    out_chs: int  # output channels (before width scaling)


# EfficientNet-B0 / Lite0 stages (Tan & Le 2019, Table 1, rows 2-8); the Lite variant has no SE.
LITE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass
class EfficientNetLiteConfig:
    """Architecture of an :class:`EfficientNetLite` (defaults: EfficientNet-Lite0, ImageNet-1k)."""

    width_mult: float = 1.0  # channel multiplier of the MBConv stages (stem and head are not scaled)
    depth_mult: float = 1.0  # repeats multiplier (ceil), except the first and last stages
    num_classes: int = 1000  # classifier outputs; 0 = no head (forward returns pooled features (B, 1280))
    in_chans: int = 3  # image channels
    drop_rate: float = 0.2  # dropout before the classifier
    drop_connect_rate: float = 0.2  # stochastic depth of the residual branch, block i of n: rate * i / n
    stem_chs: int = 32  # stem conv output channels (fixed in Lite)
    head_chs: int = 1280  # head conv output channels = feature_dim (fixed in Lite)
    stages: tuple[tuple[int, int, int, int, int], ...] = LITE_STAGES  # rows (repeats, kernel, stride, expand, out_chs)
    divisor: int = 8  # scaled channel counts are rounded to a multiple of this
    bn_eps: float = 1e-3  # BatchNorm epsilon (TensorFlow's default in the reference code)
    bn_momentum: float = 0.01  # BatchNorm running-stat momentum, PyTorch convention (TF decay 0.99)
    input_mean: tuple[float, ...] = (127.0 / 255.0,)  # per-channel (or one shared) mean on the [0, 1] scale
    input_std: tuple[float, ...] = (128.0 / 255.0,)  # per-channel (or one shared) std on the [0, 1] scale

    def __post_init__(self):
        for name in ("width_mult", "depth_mult", "bn_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("in_chans", "stem_chs", "head_chs", "divisor"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        for name in ("drop_rate", "drop_connect_rate", "bn_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        self._check_stages()
        for name in ("input_mean", "input_std"):
            if len(getattr(self, name)) not in (1, self.in_chans):
                raise ConfigError(name, f"needs 1 or in_chans={self.in_chans} values, got {getattr(self, name)}")
        if min(self.input_std) <= 0:
            raise ConfigError("input_std", f"must be > 0, got {self.input_std}")

    def _check_stages(self) -> None:
        if not self.stages:
            raise ConfigError("stages", "needs at least one stage")
        for i, row in enumerate(self.stages):
            spec = StageSpec(*row)
            if min(spec) < 1 or spec.kernel % 2 == 0 or spec.stride not in (1, 2):
                raise ConfigError(f"stages[{i}]", f"needs positive values, an odd kernel and stride 1 or 2, got {row}")

    def scaled_stages(self) -> list[StageSpec]:
        """The stages after compound scaling (eq. 3) with the Lite rules: width rounded to ``divisor``
        (never more than 10% down), repeats ``ceil(depth_mult * r)`` except the first and last stage."""
        last = len(self.stages) - 1
        out = []
        for i, row in enumerate(self.stages):
            spec = StageSpec(*row)
            repeats = spec.repeats if i in (0, last) else math.ceil(self.depth_mult * spec.repeats)
            out_chs = round_channels(spec.out_chs, self.width_mult, self.divisor)
            out.append(spec._replace(repeats=repeats, out_chs=out_chs))
        return out

    @property
    def reduction(self) -> int:
        """Stride of the final feature map with respect to the image (32 for the Lite stages)."""
        return 2 * math.prod(StageSpec(*row).stride for row in self.stages)


def round_channels(channels: int, mult: float, divisor: int = 8) -> int:
    """``channels * mult`` rounded to the nearest multiple of ``divisor``, but not below 90% of it
    (the reference code's ``round_filters``)."""
    scaled = channels * mult
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


# Architectures are data: name -> EfficientNetLiteConfig fields. Native resolutions: 224, 240, 260, 280, 300.
EFFICIENTNET_LITE_CONFIGS: dict[str, dict] = {
    "efficientnet_lite0": dict(width_mult=1.0, depth_mult=1.0, drop_rate=0.2),
    "efficientnet_lite1": dict(width_mult=1.0, depth_mult=1.1, drop_rate=0.2),
    "efficientnet_lite2": dict(width_mult=1.1, depth_mult=1.2, drop_rate=0.3),
    "efficientnet_lite3": dict(width_mult=1.2, depth_mult=1.4, drop_rate=0.3),
    "efficientnet_lite4": dict(width_mult=1.4, depth_mult=1.8, drop_rate=0.3),
}


def efficientnet_lite_config(name: str, **overrides) -> EfficientNetLiteConfig:
    """The registered architecture ``name`` with ``overrides`` applied (validated)."""
    if name not in EFFICIENTNET_LITE_CONFIGS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; registered: {', '.join(EFFICIENTNET_LITE_CONFIGS)}")
    return from_dict(EfficientNetLiteConfig, {**EFFICIENTNET_LITE_CONFIGS[name], **overrides})


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow ``SAME`` padding: output size ceil(H / stride), the extra pixel of an
    even total padding going bottom/right. Computed per input, so any image size works.
    Stride 1 with an odd kernel is symmetric and uses the built-in padding."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
        same_static = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2 if same_static else 0,
                         groups=groups, bias=False)
        self.dynamic_pad = not same_static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            pads = []
            for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]  # (left, right), then (top, bottom)
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (MobileNetV2 / EfficientNet MBConv, without SE for Lite)::

        x -> [conv_pw 1x1 expand, bn1, act] -> conv_dw kxk stride s, bn2, act -> conv_pwl 1x1, bn3 (linear)
          -> + x (drop path)  when stride 1 and in_chs == out_chs

    The expansion conv exists only when ``expand > 1``. forward(x (B, in_chs, H, W)) ->
    (B, out_chs, ceil(H / s), ceil(W / s)).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expand: int,
                 drop_path: float = 0.0, act_layer=nn.ReLU6, norm_layer=nn.BatchNorm2d):
        super().__init__()
        mid = in_chs * expand
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = Conv2dSame(in_chs, mid, 1) if expand != 1 else None
        self.bn1 = norm_layer(mid) if expand != 1 else None
        self.conv_dw = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self.bn2 = norm_layer(mid)
        self.conv_pwl = Conv2dSame(mid, out_chs, 1)
        self.bn3 = norm_layer(out_chs)
        self.act = act_layer()
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_pw is not None:
            x = self.act(self.bn1(self.conv_pw(x)))  # (B, mid, H, W)
        x = self.act(self.bn2(self.conv_dw(x)))  # (B, mid, H / s, W / s)
        x = self.bn3(self.conv_pwl(x))  # (B, out_chs, H / s, W / s)
        return self.drop_path(x) + shortcut if self.has_skip else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with timm's encoder interface (same method names as vlkit's ViT).

    forward(images (B, in_chans, H, W) in [0, 1]) -> logits (B, num_classes)
    (pooled features (B, feature_dim) if ``num_classes == 0``). ``forward_features`` gives the
    final feature map (B, feature_dim, h, w) after the head conv, stride ``reduction`` = 32:
    h = ceil(H / 32), w = ceil(W / 32); each position can serve as a token (ViT hybrid, VLM encoder).
    """

    def __init__(self, cfg: EfficientNetLiteConfig, act_layer=nn.ReLU6):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.feature_dim = self.num_features = cfg.head_chs
        self.reduction = cfg.reduction
        self.grad_checkpointing = False
        self.register_buffer("input_mean", _channel_buffer(cfg.input_mean), persistent=False)
        self.register_buffer("input_std", _channel_buffer(cfg.input_std), persistent=False)
        norm_layer = partial(nn.BatchNorm2d, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv_stem = Conv2dSame(cfg.in_chans, cfg.stem_chs, 3, stride=2)
        self.bn1 = norm_layer(cfg.stem_chs)
        self.blocks = self._build_stages(cfg, act_layer, norm_layer)
        self.stage_channels = [s.out_chs for s in cfg.scaled_stages()]  # of forward_intermediates' maps
        last_chs = self.stage_channels[-1]
        self.conv_head = Conv2dSame(last_chs, cfg.head_chs, 1)
        self.bn2 = norm_layer(cfg.head_chs)
        self.act = act_layer()
        self.head_drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(cfg.head_chs, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    @staticmethod
    def _build_stages(cfg: EfficientNetLiteConfig, act_layer, norm_layer) -> nn.Sequential:
        """``blocks[stage][i]``: MBConv blocks; drop path grows linearly with the global block index."""
        specs = cfg.scaled_stages()
        total = sum(s.repeats for s in specs)
        stages, in_chs, idx = [], cfg.stem_chs, 0
        for spec in specs:
            blocks = []
            for i in range(spec.repeats):
                blocks.append(MBConv(in_chs, spec.out_chs, spec.kernel, spec.stride if i == 0 else 1, spec.expand,
                                     drop_path=cfg.drop_connect_rate * idx / total,
                                     act_layer=act_layer, norm_layer=norm_layer))
                in_chs, idx = spec.out_chs, idx + 1
            stages.append(nn.Sequential(*blocks))
        return nn.Sequential(*stages)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference code's init (TF ``efficientnet_model.py``): convs normal(0, sqrt(2 / fan_out))
        with fan_out = k * k * out / groups (He et al. 2015); the classifier uniform(+-1/sqrt(out)),
        zero bias; BatchNorm ones/zeros and fresh running statistics."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                _init_classifier(m)

    def no_weight_decay(self) -> set[str]:
        """Names of the BatchNorm parameters (the reference code decays every other weight)."""
        bn = {name for name, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)}
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[0] in bn}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head (initialised as in :meth:`init_weights`) with ``num_classes`` outputs
        (0 = none); the backbone is kept. ``cfg`` becomes a new config with the new count."""
        p = self.conv_head.weight
        self.cfg = replace(self.cfg, num_classes=num_classes)
        self.num_classes = num_classes
        if num_classes:
            self.classifier = nn.Linear(self.feature_dim, num_classes, device=p.device, dtype=p.dtype)
            _init_classifier(self.classifier)
        else:
            self.classifier = nn.Identity()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] (B, C, H, W) -> the input scale the weights expect."""
        return (images - self.input_mean) / self.input_std

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if x.device.type == "cpu":  # oneDNN's convolutions on NHWC: 1.34x (inference) and 1.07x (training) faster
            x = x.contiguous(memory_format=torch.channels_last)  # (the layers keep the format)
        return self.act(self.bn1(self.conv_stem(x)))  # (B, stem_chs, H / 2, W / 2)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) in [0, 1] -> feature map (B, feature_dim, ceil(H/32), ceil(W/32)),
        after the head conv, BatchNorm and ReLU6."""
        x = self._stem(images)
        for stage in self.blocks:
            x = self._run_stage(stage, x)
        return self.act(self.bn2(self.conv_head(x))).contiguous()  # NCHW, as callers expect

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] = 1) -> list[torch.Tensor]:
        """Outputs of the stages ``indices`` (an int n = the last n; negatives count from the end)
        -> list of (B, C_s, h_s, w_s), in stage order (before the head conv)."""
        n = len(self.blocks)
        wanted = range(n - indices, n) if isinstance(indices, int) else indices
        for i in wanted:
            if not -n <= i < n:
                raise IndexError(f"stage index {i} out of range for {n} stages")
        take = {i % n for i in wanted}
        x, out = self._stem(images), []
        for i, stage in enumerate(self.blocks):
            x = self._run_stage(stage, x)
            if i in take:
                out.append(x.contiguous())
        return out

    def forward_head(self, fmap: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """fmap (B, feature_dim, h, w) -> logits (B, num_classes) (global average pool, dropout,
        linear), or the pooled features (B, feature_dim) if ``pre_logits`` or there is no head."""
        x = fmap.mean(dim=(2, 3))  # (B, feature_dim)
        if pre_logits:
            return x
        return self.classifier(self.head_drop(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _channel_buffer(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C or 1, 1, 1)


def _init_classifier(linear: nn.Linear) -> None:
    bound = 1.0 / math.sqrt(linear.out_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)


def create_efficientnet_lite(name: str = "efficientnet_lite0", **overrides) -> EfficientNetLite:
    """A fresh, initialised model of the registered architecture ``name`` (see
    :data:`EFFICIENTNET_LITE_CONFIGS`). Pretrained Lite0:
    :func:`vlkit.checkpoints.efficientnet.load_efficientnet_lite0`."""
    return EfficientNetLite(efficientnet_lite_config(name, **overrides))
