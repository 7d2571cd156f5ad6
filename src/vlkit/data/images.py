"""Robust image loading: any file PIL can decode becomes an RGB ``PIL.Image``; anything else
raises :class:`BadImageError`, which datasets turn into a skipped (``None``) sample.

What :func:`load_image` handles:

- modes ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``... converted to RGB;
- transparency (``LA``, ``RGBA``, ``PA``, ``P``/``L``/``RGB`` with a ``transparency`` key)
  alpha-composited on a fixed background (white by default), so a transparent pixel never
  turns into whatever colour happened to be stored under it;
- high bit depth (``I;16*``, ``I``, ``F``) rescaled to 8 bits from the value range of the
  type (PIL's own ``convert`` clips everything above 255 to white);
- EXIF orientation (phone photos) applied;
- corrupt, truncated, empty, missing or non-image files, and decompression bombs, rejected
  with the path and the reason. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone.
"""
from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

#: Default pixel budget: PIL's own decompression-bomb threshold (about 89.5 megapixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
#: Background that transparent pixels are composited on.
BACKGROUND = (255, 255, 255)

# What decoders raise on broken data (PIL has no single exception type for it).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class BadImageError(ValueError):
    """An image file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")


def _value_range(arr: np.ndarray, mode: str) -> tuple[float, float]:
    """The range mapped onto 0..255 for a high-depth image.

    ``I;16*`` uses its type's full range 0..65535. For ``I`` and ``F`` (whose range PIL does
    not record) the smallest standard range holding the data is used: 0..1 (``F`` only),
    0..255, 0..65535; data outside all of them is min-max scaled.
    """
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    standard = ([1.0] if mode == "F" else []) + [255.0, 65535.0]
    for top in standard:
        if lo >= 0.0 and hi <= top:
            return 0.0, top
    return lo, hi


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` / ``F`` -> 8-bit ``L``, rescaled (not clipped) to 0..255."""
    arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = _value_range(arr, image.mode)
    if hi <= lo:
        return Image.new("L", image.size, 0)
    scaled = np.clip((arr - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL image -> mode ``RGB`` (alpha composited on ``background``, high depth rescaled)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(path: Path, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """Open ``path`` (or ``data``, the file's bytes), check its pixel count from the header, then decode it fully."""
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise BadImageError(path, "empty file")
    with warnings.catch_warnings():  # we apply our own pixel budget below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data) if data is not None else path)
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(
                path, f"decompression bomb: {width}x{height} = {width * height} pixels "
                f"exceeds max_pixels={max_pixels}")
        image.load()
    except BaseException:
        image.close()  # a failed load leaves the file open
        raise
    return image


def _open_checked(path: Path, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """:func:`_decode`, with every PIL / OS failure turned into a :class:`BadImageError`."""
    try:
        return _decode(path, max_pixels, data)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise BadImageError(path, "not an image file PIL can identify") from e
    except FileNotFoundError as e:
        raise BadImageError(path, "file not found") from e
    except IsADirectoryError as e:
        raise BadImageError(path, "is a directory") from e
    except _DECODE_ERRORS as e:
        raise BadImageError(path, f"corrupt or truncated ({type(e).__name__}: {e})") from e


def load_image(
    path: str | Path,
    background: tuple[int, int, int] = BACKGROUND,
    max_pixels: int = MAX_PIXELS,
    data: bytes | None = None,
) -> Image.Image:
    """Load ``path`` as an RGB ``PIL.Image`` with EXIF orientation applied (``data``: the file's bytes,
    read elsewhere, e.g. from a tar shard; ``path`` then only names it in errors).

    Raises :class:`BadImageError` (a ``ValueError``) naming the path and the reason for files
    that are missing, empty, not images, corrupt, truncated, or larger than ``max_pixels``.
    """
    path = Path(path)
    with _open_checked(path, max_pixels, data) as raw:  # closes multi-frame files too
        try:
            return to_rgb(ImageOps.exif_transpose(raw), background)  # exif_transpose copies
        except _DECODE_ERRORS as e:
            reason = f"cannot convert mode {raw.mode} ({type(e).__name__}: {e})"
            raise BadImageError(path, reason) from e
