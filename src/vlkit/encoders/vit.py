"""The Vision Transformer family: ViT, DeiT and CaiT, one model configured by :class:`ViTConfig`.

- ViT: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale", eqs. 1-4 (patch + position embedding, pre-LN blocks, class token head);
  §3.1 "Hybrid Architecture" (tokens from a convnet feature map, ``embed='hybrid'``).
- SigLIP's image tower (Zhai et al. 2023, big_vision): no class token, the tokens pooled by a
  multihead attention pooling head (``global_pool='map'``: a learned probe attends to them, then a
  residual MLP; Lee et al. 2019's pooling by multihead attention).
- DeiT: Touvron et al. 2021, "Training data-efficient image transformers & distillation through
  attention", §4: a distillation token with its own head (``num_dist_tokens=1``); the loss is
  :class:`vlkit.losses.distillation.DistillationLoss`.
- CaiT: Touvron et al. 2021, "Going deeper with Image Transformers": LayerScale (§2.1, eq. 4) and
  class attention (§3): self-attention over patches only, then the class token joins for
  ``class_attn_depth`` class-attention blocks. (CaiT's talking-heads attention is not included.)

Shapes: B batch, N patches (gh * gw), P prefix tokens (class + distillation), T = P + N tokens,
D embed_dim, H heads, L layers.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.config import ConfigError, from_dict
from vlkit.nn.attention import Attention, ClassAttention
from vlkit.nn.layers import DropPath, LayerScale, Linear, QuickGELU
from vlkit.nn.mlp import Mlp
from vlkit.nn.patch_embed import HybridEmbed, PatchEmbed
from vlkit.nn.pos_embed import bucket_pos_embed, resample_pos_embed, sincos_2d_pos_embed

ACT_LAYERS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU,
              "quick_gelu": QuickGELU}


@dataclass
class ViTConfig:
    """Architecture of a :class:`VisionTransformer` (ViT, DeiT, CaiT, hybrid)."""

    image_size: int = 224  # input side (pixels) the position embedding is built for; other sizes interpolate it
    patch_size: int = 16  # patch side in pixels (embed='patch'); with embed='hybrid' the backbone sets the grid
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # classifier outputs; 0 = no head (forward returns pooled features (B, D))
    embed_dim: int = 768  # token width D
    depth: int = 12  # self-attention blocks
    num_heads: int = 12  # attention heads; embed_dim must be divisible by it
    mlp_ratio: float = 4.0  # MLP hidden width = int(embed_dim * mlp_ratio)
    qkv_bias: bool = True  # bias in the query/key/value projections
    act: Literal["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"] = "gelu"  # MLP activation (gelu: exact erf;
    # quick_gelu: OpenAI CLIP's x * sigmoid(1.702 x))
    pre_norm: bool = False  # LayerNorm on the embedded tokens before the blocks (CLIP's ln_pre)
    patch_bias: bool = True  # bias in the patch-embedding convolution (CLIP has none)
    pos_embed: Literal["learned", "sincos"] = "learned"  # learned absolute, or fixed 2D sin-cos (MAE)
    drop_remainder: bool = False  # image sides not a multiple of patch_size: ignore the last pixels (as HF SigLIP's
    # 384 px / patch 14 -> 27 x 27) instead of refusing them
    pos_resize: Literal["bicubic", "bucket"] = "bicubic"  # another grid: interpolate the learned grid, or
    # give each patch the row of the cell its fractional coordinates fall in (NaViT / Idefics2)
    class_token: bool = True  # prepend a learned class token
    num_dist_tokens: int = 0  # 0 = ViT; 1 = DeiT distillation token
    dist_head: bool = True  # with a distillation token: a second head on it (DeiT); False = CLS head only
    class_attn_depth: int = 0  # 0 = ViT/DeiT; > 0 = CaiT: class token joins after `depth` blocks, in this many CA blocks
    layer_scale_init: float | None = None  # LayerScale initial value (CaiT uses 1e-5 / 1e-6); None = off
    drop_rate: float = 0.0  # dropout after the position embedding and on attention/MLP outputs
    attn_drop_rate: float = 0.0  # dropout on the attention weights
    drop_path_rate: float = 0.0  # stochastic depth of the last block, linear from 0 (class-attention blocks: 0)
    norm_eps: float = 1e-6  # LayerNorm epsilon (HF ViT/DeiT checkpoints use 1e-12)
    global_pool: Literal["token", "avg", "map"] = "token"  # head input: the class token, the mean of patch
    # tokens, or attention pooling by a learned probe (SigLIP's MAP head)
    embed: Literal["patch", "hybrid"] = "patch"  # patch: conv patchify; hybrid: a convnet backbone given to the model
    fc_norm: bool = False  # the final LayerNorm after pooling instead of on the tokens (timm's avg-pooled ViTs,
    # e.g. MAE fine-tuning): forward_features then returns the blocks' tokens unnormalised

    def __post_init__(self):
        self._check_literals()
        self._check_sizes()
        self._check_tokens()
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.layer_scale_init is not None and self.layer_scale_init <= 0:
            raise ConfigError("layer_scale_init", f"must be > 0 or None, got {self.layer_scale_init}")
        if self.norm_eps <= 0:
            raise ConfigError("norm_eps", f"must be > 0, got {self.norm_eps}")

    def _check_literals(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            tp, value = hints[f.name], getattr(self, f.name)
            if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
                raise ConfigError(f.name, f"must be one of {list(typing.get_args(tp))}, got {value!r}")

    def _check_sizes(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if self.embed == "patch" and self.image_size % self.patch_size and not self.drop_remainder:
            raise ConfigError("image_size", f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError("num_heads", f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ConfigError("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ConfigError("embed_dim", f"must be a multiple of 4 for pos_embed='sincos', got {self.embed_dim}")

    def _check_tokens(self) -> None:
        if self.num_dist_tokens not in (0, 1):
            raise ConfigError("num_dist_tokens", f"must be 0 (ViT) or 1 (DeiT), got {self.num_dist_tokens}")
        if self.num_dist_tokens and not self.class_token:
            raise ConfigError("num_dist_tokens", "a distillation token needs class_token=True")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool", "'token' pooling needs class_token=True (or use 'avg')")
        if self.class_attn_depth < 0:
            raise ConfigError("class_attn_depth", f"must be >= 0, got {self.class_attn_depth}")
        if self.class_attn_depth and (not self.class_token or self.num_dist_tokens or self.global_pool != "token"):
            raise ConfigError("class_attn_depth", "CaiT needs class_token=True, num_dist_tokens=0, global_pool='token'")

    @property
    def num_prefix_tokens(self) -> int:
        """Class + distillation tokens in front of the patch tokens of the output sequence."""
        return int(self.class_token) + self.num_dist_tokens


# Architectures are data: name -> ViTConfig fields (ViT-Ti/S/B /16 at 224, DeiT-Ti distilled, CaiT-XXS24).
VIT_CONFIGS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "deit_tiny_distilled": dict(embed_dim=192, depth=12, num_heads=3, num_dist_tokens=1),
    "cait_xxs24": dict(embed_dim=192, depth=24, num_heads=4, class_attn_depth=2, layer_scale_init=1e-5),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """The registered architecture ``name`` with ``overrides`` applied (validated)."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT architecture {name!r}; registered: {', '.join(VIT_CONFIGS)}")
    return from_dict(ViTConfig, {**VIT_CONFIGS[name], **overrides})


class Block(nn.Module):
    """Pre-LN transformer block (ViT eqs. 2-3) with optional LayerScale (CaiT eq. 4) and DropPath::

        x = x + drop_path(ls1(attn(norm1(x))))
        x = x + drop_path(ls2(mlp(norm2(x))))

    forward(x (B, T, D)) -> (B, T, D). With ``context`` (CaiT class attention, ``attn_layer=
    ClassAttention``), x is the class token (B, 1, D) and keys/values come from norm1(context)
    (B, 1 + N, D). ``return_attn`` also returns the attention weights (B, H, T, S).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: float | None = None, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 attn_layer=Attention):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_attn: bool = False):
        ctx = None if context is None else self.norm1(context)
        out = self.attn(self.norm1(x), ctx, return_attn=return_attn)
        out, attn = out if return_attn else (out, None)
        x = x + self.drop_path1(self.ls1(out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attn else x


class AttentionPool(nn.Module):
    """Multihead attention pooling (SigLIP's MAP head): a learned probe (1, 1, D) attends to the tokens,
    then a residual MLP on its normalised output. forward(tokens (B, T, D)) -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU, eps: float = 1e-6):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = Attention(dim, num_heads, qkv_bias=True, kv_dim=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.probe.expand(tokens.shape[0], -1, -1), tokens)  # (B, 1, D)
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionTransformer(nn.Module):
    """ViT / DeiT / CaiT / hybrid ViT with timm's encoder interface.

    forward(images (B, C, H, W)) -> logits (B, num_classes) (pooled features (B, D) if no head).
    A DeiT model (with a distillation head) in training mode with ``distilled_training`` returns
    ``(logits_cls, logits_dist)``; otherwise their average. Images may have another size than
    ``cfg.image_size`` (a multiple of the patch size): the position embedding is interpolated.
    ``backbone``: the convnet for ``cfg.embed='hybrid'`` (``forward_features`` -> (B, C, h, w)).
    """

    def __init__(self, cfg: ViTConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_features = self.embed_dim = D = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.num_pos_prefix = 0 if cfg.class_attn_depth else cfg.num_prefix_tokens  # CaiT: patches only
        self.grad_checkpointing = False
        self.distilled_training = True
        self.patch_embed = self._build_embed(cfg, backbone)
        self.grid_size = self.patch_embed.grid_size((cfg.image_size, cfg.image_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, cfg.num_dist_tokens, D)) if cfg.num_dist_tokens else None
        num_pos = self.num_pos_prefix + self.grid_size[0] * self.grid_size[1]
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, D))
        else:
            self.register_buffer("pos_embed", sincos_2d_pos_embed(D, self.grid_size, self.num_pos_prefix),
                                 persistent=False)
        self.pos_drop = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        block = partial(Block, dim=D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                        proj_drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, init_values=cfg.layer_scale_init,
                        act_layer=ACT_LAYERS[cfg.act], norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()  # stochastic depth rule
        self.blocks = nn.ModuleList([block(drop_path=dpr[i]) for i in range(cfg.depth)])
        self.class_attn = nn.ModuleList([block(attn_layer=ClassAttention) for _ in range(cfg.class_attn_depth)])
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        self.attn_pool = AttentionPool(D, cfg.num_heads, cfg.mlp_ratio, ACT_LAYERS[cfg.act], cfg.norm_eps) \
            if cfg.global_pool == "map" else None
        self.head = Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        has_dist_head = cfg.num_dist_tokens and cfg.dist_head and cfg.num_classes
        self.head_dist = Linear(D, cfg.num_classes) if has_dist_head else None
        self.init_weights()

    @staticmethod
    def _build_embed(cfg: ViTConfig, backbone: nn.Module | None) -> nn.Module:
        if cfg.embed == "hybrid":
            if backbone is None:
                raise ValueError("embed='hybrid' needs the convnet: VisionTransformer(cfg, backbone=...)")
            return HybridEmbed(backbone, None, cfg.embed_dim, cfg.in_chans, cfg.image_size)
        if backbone is not None:
            raise ValueError("a backbone was given but cfg.embed is 'patch'; set embed='hybrid'")
        return PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, bias=cfg.patch_bias,
                          drop_remainder=cfg.drop_remainder)

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc_normal(0.02) for Linear weights, position embedding and tokens; zero biases;
        LayerNorm ones/zeros; embeddings and LayerScale their own rule. A hybrid backbone keeps its weights."""
        backbone = self.patch_embed.backbone if isinstance(self.patch_embed, HybridEmbed) else nn.Identity()
        skip = {id(m) for m in backbone.modules()}
        for m in self.modules():
            if id(m) in skip:
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (PatchEmbed, HybridEmbed, LayerScale)):
                m.reset_parameters()
        for p in (self.pos_embed, self.cls_token, self.dist_token, getattr(self.attn_pool, "probe", None)):
            if isinstance(p, nn.Parameter):
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay (position embedding and tokens)."""
        names = {"pos_embed", "cls_token", "dist_token", "attn_pool.probe"}
        return {n for n, _ in self.named_parameters() if n in names}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each self-attention block in the backward pass instead of storing activations."""
        self.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """DeiT: in training mode return (logits_cls, logits_dist) instead of their average."""
        self.distilled_training = enable

    def _prefix_tokens(self, B: int) -> list[torch.Tensor]:
        return [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (B, C, H, W) -> (tokens (B, T, D) with position embedding, grid (gh, gw)).

        CaiT: T = N (the class token joins later, without position embedding)."""
        x = self.patch_embed(images)  # (B, gh, gw, D)
        B, gh, gw, D = x.shape
        x = x.reshape(B, gh * gw, D)  # (B, N, D)
        if self.num_pos_prefix:
            x = torch.cat([*self._prefix_tokens(B), x], dim=1)  # (B, P + N, D)
        resize = bucket_pos_embed if self.cfg.pos_resize == "bucket" else resample_pos_embed
        x = x + resize(self.pos_embed, (gh, gw), self.grid_size, self.num_pos_prefix)
        return self.norm_pre(self.pos_drop(x)), (gh, gw)

    def _run_block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """CaiT: patch tokens (B, N, D) -> (B, 1 + N, D) with the class token updated by class attention."""
        if not len(self.class_attn):
            return x
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        for blk in self.class_attn:
            cls = blk(cls, context=torch.cat([cls, x], dim=1))
        return torch.cat([cls, x], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> final normalised tokens (B, P + N, D), class token first (``cfg.fc_norm``:
        not normalised; the norm follows the pooling)."""
        x, _ = self._embed(images)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(self._class_attention(x))

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False):
        """tokens (B, T, D) -> logits (B, num_classes), or the pooled features (B, D) if ``pre_logits``.

        DeiT in training mode with ``distilled_training``: ``(logits_cls, logits_dist)``."""
        if self.cfg.global_pool == "avg":
            x = tokens[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        elif self.attn_pool is not None:
            x = self.attn_pool(tokens)  # (B, D)
        else:
            x = tokens[:, 0]  # (B, D)
        x = self.fc_norm(x)
        if pre_logits:
            return x
        logits = self.head(x)
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(tokens[:, 1])
        if self.training and self.distilled_training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, images: torch.Tensor):
        return self.forward_head(self.forward_features(images))

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] = 1,
                              norm: bool = False) -> list[torch.Tensor]:
        """Tokens after the self-attention blocks ``indices`` (an int n = the last n; negatives
        count from the end) -> list of (B, T, D), in block order; ``norm`` applies the final norm.
        CaiT: these are patch tokens only (T = N)."""
        n = len(self.blocks)
        wanted = range(n - indices, n) if isinstance(indices, int) else indices
        take = set()
        for i in wanted:
            if not -n <= i < n:
                raise IndexError(f"block index {i} out of range for depth {n}")
            take.add(i % n)
        x, _ = self._embed(images)
        out = []
        for i, blk in enumerate(self.blocks):
            x = self._run_block(blk, x)
            if i in take:
                out.append(self.norm(x) if norm else x)
        return out

    def attention_maps(self, images: torch.Tensor) -> dict:
        """Class-token attention over the patches, per layer and head (the manual attention path).

        Returns ``{"attn": (B, L, H, N), "grid": (gh, gw), "layers": [L names]}``: for ViT/DeiT one
        map per self-attention block (the class token's row, prefix columns dropped); for CaiT the
        class-attention blocks. Each row sums to 1 over all keys (prefix included). Call under
        ``torch.no_grad()`` when only viewing them.
        """
        if self.cls_token is None:
            raise ValueError("attention_maps needs a class token (cfg.class_token=True)")
        x, grid = self._embed(images)
        maps, names = [], []
        for i, blk in enumerate(self.blocks):
            if len(self.class_attn):
                x = blk(x)
                continue
            x, attn = blk(x, return_attn=True)  # attn (B, H, T, T)
            maps.append(attn[:, :, 0, self.num_prefix_tokens:])
            names.append(f"blocks.{i}")
        cls = self.cls_token.expand(x.shape[0], -1, -1) if len(self.class_attn) else None
        for i, blk in enumerate(self.class_attn):
            context = torch.cat([cls, x], dim=1)
            cls, attn = blk(cls, context=context, return_attn=True)  # attn (B, H, 1, 1 + N)
            maps.append(attn[:, :, 0, 1:])
            names.append(f"class_attn.{i}")
        return {"attn": torch.stack(maps, dim=1), "grid": grid, "layers": names}


def create_vit(name: str, backbone: nn.Module | None = None, **overrides) -> VisionTransformer:
    """A fresh, initialised model of the registered architecture ``name`` (see :data:`VIT_CONFIGS`)."""
    return VisionTransformer(vit_config(name, **overrides), backbone=backbone)
