"""Image transforms written with PIL + torch (no torchvision).

Every transform is a callable ``t(x, generator) -> x'`` where ``x`` is a ``PIL.Image`` (before
:class:`ToTensor`) or a float ``Tensor (C, H, W)`` (after it), and *all* randomness is drawn
from ``generator`` (see ``vlkit.data.base``): the same generator state gives the same output.

Implemented papers:
- RandomResizedCrop: Szegedy et al. 2015, "Going deeper with convolutions" (Inception crop),
  with the scale/ratio defaults used by DeiT (Touvron et al. 2021);
- RandomErasing: Zhong et al. 2020, "Random Erasing Data Augmentation";
- RandAugment: Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a
  reduced search space", with timm's magnitude mapping (magnitude 0..10, every op's strength
  increasing with magnitude, magnitude 0 leaving geometric and colour ops as identity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from vlkit.config import ConfigError

Size = int | tuple[int, int]  # int: (for Resize) shorter side / (for crops) a square; else (H, W)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=g).item())


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=g).item() < p


def _box_size(g: torch.Generator, area: float, scale, ratio) -> tuple[int, int]:
    """(w, h) of a random box: area ``area * U(scale)``, aspect w / h = exp(U(log ratio))."""
    target = area * _uniform(g, *scale)
    aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
    return round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))


class Compose:
    """Apply ``transforms`` in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Callable[[Any, torch.Generator], Any]]):
        self.transforms = list(transforms)

    def __call__(self, x: Any, generator: torch.Generator) -> Any:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize a PIL image. ``size`` int: shorter side to ``size``, aspect kept; (H, W): exact."""

    def __init__(self, size: Size, interpolation: str = "bicubic"):
        self.size, self.resample = size, _RESAMPLE[interpolation]

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        w, h = image.size
        if isinstance(self.size, int):
            scale = self.size / min(w, h)
            out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
        else:
            out_h, out_w = _pair(self.size)
        return image if (out_w, out_h) == (w, h) else image.resize((out_w, out_h), self.resample)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """Crop the centre ``size`` (H, W) of a PIL image; a smaller image is padded with black."""

    def __init__(self, size: Size):
        self.size = _pair(size)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        w, h = image.size
        ch, cw = self.size
        top, left = round((h - ch) / 2), round((w - cw) / 2)
        return image.crop((left, top, left + cw, top + ch))


class RandomResizedCrop:
    """Inception crop: a random box of ``scale`` x area and aspect ``ratio``, resized to ``size``.

    Follows the reference sampling: 10 tries of (area ~ U(scale), log-ratio ~ U(log ratio));
    the first box that fits is used, else a centre crop with the ratio clamped.
    """

    def __init__(self, size: Size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
        self.size, self.scale, self.ratio = _pair(size), scale, ratio
        self.resample = _RESAMPLE[interpolation]

    def box(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height) for an image of ``width`` x ``height``."""
        for _ in range(10):
            w, h = _box_size(g, width * height, self.scale, self.ratio)
            if 0 < w <= width and 0 < h <= height:
                return _randint(g, 0, width - w), _randint(g, 0, height - h), w, h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        left, top, w, h = self.box(*image.size, generator)
        out_h, out_w = self.size
        return image.resize((out_w, out_h), self.resample, box=(left, top, left + w, top + h))


class RandomHorizontalFlip:
    """Mirror a PIL image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        return ImageOps.mirror(image) if _coin(generator, self.p) else image


class RandomCrop:
    """Pad a PIL image by ``padding`` pixels on each side, then crop ``size`` at random.

    ``padding_mode``: ``"constant"`` (pixels of value ``fill``) or ``"reflect"``. The CIFAR /
    MNIST recipe for small images: ``RandomCrop(32, padding=4)``.
    """

    def __init__(self, size: Size, padding: int = 0, fill: int = 0,
                 padding_mode: Literal["constant", "reflect"] = "constant"):
        self.size, self.padding, self.fill, self.padding_mode = _pair(size), padding, fill, padding_mode

    def _pad(self, image: Image.Image) -> Image.Image:
        p = self.padding
        if p <= 0:
            return image
        arr = np.asarray(image)
        pad = ((p, p), (p, p)) + ((0, 0),) * (arr.ndim - 2)
        kw = {"constant_values": self.fill} if self.padding_mode == "constant" else {}
        return Image.fromarray(np.pad(arr, pad, mode=self.padding_mode, **kw), mode=image.mode)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        image = self._pad(image)
        w, h = image.size
        ch, cw = self.size
        top = _randint(generator, 0, max(0, h - ch))
        left = _randint(generator, 0, max(0, w - cw))
        return image.crop((left, top, left + cw, top + ch))


class ToTensor:
    """PIL image -> float ``Tensor (C, H, W)`` in [0, 1] (C = number of bands)."""

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        arr = np.array(image, dtype=np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


class Normalize:
    """``(x - mean) / std`` per channel on a ``Tensor (C, H, W)``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(f"Normalize has {self.mean.shape[0]} channels, image has {x.shape[0]}")
        return (x - self.mean) / self.std


class RandomErasing:
    """Random Erasing (Zhong et al. 2020) on a ``Tensor (C, H, W)``, usually after Normalize.

    With probability ``p`` a box of area fraction ~ U(``scale``) and aspect with log ~
    U(log ``ratio``) is filled with per-pixel N(0, 1) noise (``value="random"``, timm's
    "pixel" mode, which matches normalised statistics) or with the constant ``value``.
    """

    def __init__(self, p: float = 0.5, scale=(0.02, 1 / 3), ratio=(0.3, 3.3),
                 value: float | Literal["random"] = "random"):
        self.p, self.scale, self.ratio, self.value = p, scale, ratio, value

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not _coin(generator, self.p):
            return x
        c, height, width = x.shape
        for _ in range(10):
            w, h = _box_size(generator, height * width, self.scale, self.ratio)
            if 0 < h < height and 0 < w < width:
                top, left = _randint(generator, 0, height - h), _randint(generator, 0, width - w)
                x = x.clone()
                if self.value == "random":
                    fill = torch.randn((c, h, w), generator=generator, dtype=x.dtype)
                else:
                    fill = torch.full((c, h, w), float(self.value), dtype=x.dtype)
                x[:, top:top + h, left:left + w] = fill
                return x
        return x


# ----------------------------------------------------------------------------- RandAugment
# Each op: (apply(image, value, fill, resample), level -> value, value gets a random sign).
# ``level`` = magnitude / 10 in [0, 1]; the value ranges follow timm's "increasing" ops.


def _affine(image, data, fill, resample):
    return image.transform(image.size, Image.Transform.AFFINE, data, resample, fillcolor=fill)


def _solarize(image, threshold, fill, resample):
    return ImageOps.solarize(image, threshold) if threshold < 256 else image


def _enhance(kind):
    return lambda image, factor, fill, resample: getattr(ImageEnhance, kind)(image).enhance(factor)


_RANDAUGMENT_OPS = {
    "Identity": (lambda im, v, f, r: im, lambda level: 0.0, False),
    "AutoContrast": (lambda im, v, f, r: ImageOps.autocontrast(im), lambda level: 0.0, False),
    "Equalize": (lambda im, v, f, r: ImageOps.equalize(im), lambda level: 0.0, False),
    "Rotate": (lambda im, v, f, r: im.rotate(v, r, fillcolor=f), lambda level: 30.0 * level, True),
    "Solarize": (_solarize, lambda level: 256 - int(256 * level), False),
    "Posterize": (lambda im, v, f, r: ImageOps.posterize(im, v), lambda level: 8 - int(4 * level), False),
    "Color": (_enhance("Color"), lambda level: 0.9 * level, True),
    "Contrast": (_enhance("Contrast"), lambda level: 0.9 * level, True),
    "Brightness": (_enhance("Brightness"), lambda level: 0.9 * level, True),
    "Sharpness": (_enhance("Sharpness"), lambda level: 0.9 * level, True),
    "ShearX": (lambda im, v, f, r: _affine(im, (1, v, 0, 0, 1, 0), f, r), lambda level: 0.3 * level, True),
    "ShearY": (lambda im, v, f, r: _affine(im, (1, 0, 0, v, 1, 0), f, r), lambda level: 0.3 * level, True),
    "TranslateX": (lambda im, v, f, r: _affine(im, (1, 0, v * im.size[0], 0, 1, 0), f, r),
                   lambda level: 0.45 * level, True),
    "TranslateY": (lambda im, v, f, r: _affine(im, (1, 0, 0, 0, 1, v * im.size[1]), f, r),
                   lambda level: 0.45 * level, True),
}
_ENHANCE_OPS = ("Color", "Contrast", "Brightness", "Sharpness")  # value is a factor around 1


class RandAugment:
    """RandAugment (Cubuk et al. 2020) on a PIL RGB or L image.

    ``num_ops`` ops are drawn uniformly with replacement from :attr:`ops` and applied in turn,
    each with probability ``prob`` (1.0 in the paper, 0.5 in DeiT's timm recipe) at magnitude
    ``magnitude`` in [0, 10], optionally jittered by N(0, ``magnitude_std``) per op and clipped.
    Mapping at magnitude m (level = m / 10): Rotate +-30 level degrees, Shear +-0.3 level,
    Translate +-0.45 level of the side, Color/Contrast/Brightness/Sharpness factor
    1 +- 0.9 level, Solarize threshold 256 - 256 level, Posterize 8 - int(4 level) bits.
    Geometric ops fill with ``fill`` (grey by default).
    """

    ops = tuple(_RANDAUGMENT_OPS)

    def __init__(self, num_ops: int = 2, magnitude: float = 9, magnitude_std: float = 0.0,
                 prob: float = 1.0, fill: tuple[int, int, int] = (128, 128, 128),
                 interpolation: str = "bilinear", ops: Sequence[str] | None = None):
        unknown = set(ops or ()) - set(_RANDAUGMENT_OPS)
        if unknown:
            raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {list(_RANDAUGMENT_OPS)}")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill, self.resample = fill, _RESAMPLE[interpolation]
        self.ops = tuple(ops) if ops is not None else RandAugment.ops

    def apply_op(self, image: Image.Image, name: str, magnitude: float, negate: bool = False) -> Image.Image:
        """Apply op ``name`` at ``magnitude`` (0..10); ``negate`` flips the sign of signed ops."""
        fn, level_to_value, signed = _RANDAUGMENT_OPS[name]
        value = level_to_value(min(max(magnitude, 0.0), 10.0) / 10.0)
        value = -value if (signed and negate) else value
        if name in _ENHANCE_OPS:
            value = 1.0 + value
        fill = self.fill[0] if len(image.getbands()) == 1 else tuple(self.fill)
        return fn(image, value, fill, self.resample)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        choices = torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist()
        for index in choices:
            if self.prob < 1.0 and not _coin(generator, self.prob):
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude += self.magnitude_std * torch.randn((), generator=generator).item()
            negate = _coin(generator, 0.5)
            image = self.apply_op(image, self.ops[index], magnitude, negate)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, prob={self.prob})"


# ----------------------------------------------------------------------------- config


@dataclass
class TransformConfig:
    """Image preprocessing and train-time augmentation (DeiT-style by default)."""

    image_size: int = 224  # side of the square model input, pixels
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per-channel mean subtracted after ToTensor
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # per-channel std divided by after ToTensor
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bicubic"  # resampling filter
    crop_pct: float = 0.875  # eval: resize shorter side to image_size / crop_pct, centre-crop
    eval_squash: bool = False  # eval: resize to a square image_size / crop_pct, aspect not kept, then the centre crop
    # (SigLIP's processor with crop_pct 1; timm's crop_mode='squash')
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # train RandomResizedCrop area fraction range
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # train RandomResizedCrop aspect ratio range
    crop_padding: int = 0  # >0: small-image recipe, resize + pad-and-random-crop instead of RRC
    hflip: float = 0.5  # train horizontal flip probability (0 for data where left/right matters)
    randaugment_num_ops: int = 2  # RandAugment ops per image; 0 disables RandAugment
    randaugment_magnitude: float = 9.0  # RandAugment magnitude in [0, 10]
    random_erasing: float = 0.0  # Random Erasing probability; 0 disables

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ConfigError("image_size", f"must be positive, got {self.image_size}")
        if len(self.mean) != len(self.std):
            raise ConfigError("std", f"has {len(self.std)} values but mean has {len(self.mean)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError("std", f"values must be positive, got {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError("crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ConfigError("rrc_scale", f"need 0 < low <= high <= 1, got {self.rrc_scale}")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ConfigError("rrc_ratio", f"need 0 < low <= high, got {self.rrc_ratio}")
        for name in ("crop_padding", "randaugment_num_ops"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.randaugment_magnitude <= 10:
            raise ConfigError("randaugment_magnitude", f"must be in [0, 10], got {self.randaugment_magnitude}")
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"is a probability, got {getattr(self, name)}")


def _train_ops(cfg: TransformConfig) -> list:
    size = cfg.image_size
    if cfg.crop_padding > 0:
        ops = [Resize((size, size), cfg.interpolation), RandomCrop(size, padding=cfg.crop_padding)]
    else:
        ops = [RandomResizedCrop(size, cfg.rrc_scale, cfg.rrc_ratio, cfg.interpolation)]
    if cfg.hflip > 0:
        ops.append(RandomHorizontalFlip(cfg.hflip))
    if cfg.randaugment_num_ops > 0:
        ops.append(RandAugment(cfg.randaugment_num_ops, cfg.randaugment_magnitude))
    return ops


def build_transform(cfg: TransformConfig, train: bool) -> Compose:
    """PIL RGB image -> normalised ``Tensor (C, image_size, image_size)``.

    train: (RandomResizedCrop | Resize + RandomCrop(padding)) -> flip -> RandAugment ->
    ToTensor -> Normalize -> RandomErasing, each stage only when enabled in ``cfg``.
    eval: Resize(image_size / crop_pct) -> CenterCrop(image_size) -> ToTensor -> Normalize
    (with ``crop_padding`` > 0, small images: Resize((image_size, image_size)) only; with ``eval_squash``:
    Resize((s, s)), s = image_size / crop_pct, aspect not kept, then the centre crop).
    """
    size = cfg.image_size
    if train:
        ops = _train_ops(cfg)
    elif cfg.crop_padding > 0:
        ops = [Resize((size, size), cfg.interpolation)]
    elif cfg.eval_squash:  # timm's crop_mode='squash': both sides to size / crop_pct, then the centre
        side = int(math.floor(size / cfg.crop_pct))
        ops = [Resize((side, side), cfg.interpolation)] + ([CenterCrop(size)] if side != size else [])
    else:
        ops = [Resize(int(math.floor(size / cfg.crop_pct)), cfg.interpolation), CenterCrop(size)]
    ops += [ToTensor(), Normalize(cfg.mean, cfg.std)]
    if train and cfg.random_erasing > 0:
        ops.append(RandomErasing(cfg.random_erasing))
    return Compose(ops)
