"""Segmenter: Transformer for Semantic Segmentation (Strudel et al. 2021).

A ViT encodes the image into patch tokens; the decoder maps them to per-pixel class scores:

- :class:`LinearDecoder` (§3.2, "Decoder", the baseline): a linear layer on each patch token,
  giving a (K, h, w) map bilinearly upsampled to the image;
- :class:`MaskTransformer` (§3.2, Fig. 2): K learned class embeddings are processed jointly with
  the patch tokens by M transformer layers; masks are the scalar products of the L2-normalised
  patch embeddings with the L2-normalised class embeddings (B, K, h, w), normalised by a
  LayerNorm over classes, then upsampled.

Here the class embeddings are the "output query array" of the task: K of them, one per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.encoders.vit import Block
from vlkit.nn.layers import Linear


class LinearDecoder(nn.Module):
    """forward(patch tokens (B, N, D), grid (h, w)) -> class scores (B, K, h, w)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.head(x).transpose(1, 2).reshape(x.shape[0], -1, *grid)


class MaskTransformer(nn.Module):
    """forward(patch tokens (B, N, D_enc), grid (h, w)) -> class masks (B, K, h, w)."""

    def __init__(self, enc_dim: int, num_classes: int, dim: int = 192, depth: int = 2, num_heads: int = 3,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.proj_in = Linear(enc_dim, dim)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([self.proj_in(x), self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)  # (B, N + K, dim)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches, classes = x[:, :-self.num_classes], x[:, -self.num_classes:]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        return masks.transpose(1, 2).reshape(x.shape[0], self.num_classes, *grid)


class Segmenter(nn.Module):
    """forward(images (B, 3, H, W)) -> per-pixel class logits (B, K, H, W).

    ``encoder`` is a vlkit :class:`~vlkit.encoders.vit.VisionTransformer` (``num_classes=0``);
    ``decoder`` a :class:`LinearDecoder` or :class:`MaskTransformer`."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        H, W = images.shape[-2:]
        p = self.encoder.cfg.patch_size
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        masks = self.decoder(tokens, (H // p, W // p))
        return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
