"""Image -> token grid: patch embedding and ViT's hybrid (convnet feature map) embedding.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", §3.1 (eq. 1 and "Hybrid Architecture").
:class:`ConvStem`: the small convolutional stem of Xiao et al. 2021, "Early Convolutions Help
Transformers See Better" (stride-2 3x3 convs + BatchNorm + ReLU; the hybrid embedding's 1x1
projection is their final 1x1 conv), a backbone for the hybrid embedding.
Both embeddings return a channels-last grid (B, gh, gw, D) so the caller knows the grid size at
any input resolution.
"""
from __future__ import annotations

import torch
from torch import nn


def init_conv_as_linear(conv: nn.Conv2d) -> None:
    """Xavier-uniform on the (out, in * k * k) view, zero bias (MAE's patch-embedding init)."""
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvStem(nn.Module):
    """Stride-2 3x3 conv + BatchNorm + ReLU per entry of ``channels``: a 2^len(channels) downsampling.

    forward_features(images (B, C, H, W)) -> (B, channels[-1], H / 2^n, W / 2^n) (rounded up)."""

    def __init__(self, in_chans: int = 3, channels: tuple[int, ...] = (32, 64)):
        super().__init__()
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        layers, width = [], in_chans
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        self.stem = nn.Sequential(*layers)
        self.num_features = width

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem(images)


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly projected: a conv with kernel = stride = ``patch_size``.

    forward(images (B, C, H, W)) -> (B, H / p, W / p, D). H and W must be multiples of p, unless
    ``drop_remainder`` (the last H % p rows and W % p columns are then not read).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True,
                 drop_remainder: bool = False):
        super().__init__()
        self.patch_size, self.drop_remainder = patch_size, drop_remainder
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_conv_as_linear(self.proj)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return image_size[0] // self.patch_size, image_size[1] // self.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        H, W = images.shape[-2:]
        if (H % self.patch_size or W % self.patch_size) and not self.drop_remainder:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(images).permute(0, 2, 3, 1)  # (B, gh, gw, D)


class HybridEmbed(nn.Module):
    """Tokens from a convnet feature map, projected to ``embed_dim`` by a 1x1 conv (ViT hybrid mode).

    ``backbone`` is any module whose ``forward_features(images)`` returns (B, feature_dim, h, w);
    each of the h * w positions becomes one token. ``feature_dim=None`` reads it from the backbone
    (``num_features`` attribute, else a dummy forward at ``img_size``). The backbone keeps its own weights.
    forward(images (B, C, H, W)) -> (B, h, w, D).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int | None, embed_dim: int, in_chans: int = 3,
                 img_size: int = 224):
        super().__init__()
        if not callable(getattr(backbone, "forward_features", None)):
            raise TypeError(f"{type(backbone).__name__} has no forward_features(images) -> (B, C, h, w)")
        self.backbone = backbone
        self.in_chans = in_chans
        feature_dim = feature_dim or getattr(backbone, "num_features", None)
        self.feature_dim = feature_dim or self._probe((img_size, img_size))[0]
        self.proj = nn.Conv2d(self.feature_dim, embed_dim, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_conv_as_linear(self.proj)

    @torch.no_grad()
    def _probe(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the backbone's feature map for one blank image of ``image_size``."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            p = next(self.backbone.parameters(), None)
            dummy = torch.zeros(1, self.in_chans, *image_size, device=p.device if p is not None else None)
            return tuple(self.backbone.forward_features(dummy).shape[1:])
        finally:
            self.backbone.train(was_training)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self._probe(image_size)[1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(images)  # (B, C, h, w)
        if feats.ndim != 4 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"backbone.forward_features gave {tuple(feats.shape)}, "
                             f"expected (B, {self.feature_dim}, h, w)")
        return self.proj(feats).permute(0, 2, 3, 1)  # (B, h, w, D)
