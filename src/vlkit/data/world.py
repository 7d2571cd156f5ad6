"""The synthetic world: procedurally rendered scenes of shapes carrying every label the field needs.

A *scene* is ``min_objects..max_objects`` shapes (circle, square, triangle, diamond, star,
hexagon, cross, heart by default) in named colours, each *small* or *large*, placed on a square
canvas. Everything is a pure function of ``(seed, split, index)`` through ``numpy`` Generators
(no global RNG): the same scene, pixels and texts come back in any process, any order.

Main object and class label
    Every scene has exactly one *large* object, the *main object*, always ``scene.objects[0]``;
    every other object (a *distractor*) is small. The class label is the main object's shape
    (its index in :attr:`World.class_names`). The main shape is drawn uniformly, so labels are
    balanced, and the label is unambiguous: "the shape of the large object".

Splits
    ``'train'``, ``'val'``, ``'test'`` are independent seed streams. A fixed set of
    (colour, shape) pairs, :attr:`World.heldout_pairs`, never appears in them (neither as main
    object nor as distractor). In ``'compositional'`` the main object always has a held-out pair
    (uniform over them) and the distractors have seen pairs: the only novelty is the combination.
    Held-out pairs: ``round(heldout_fraction * num_colours)`` colours per shape (at least one when
    the fraction is > 0), chosen from ``seed`` so that each colour is held out about equally often
    and every colour and every shape still appears in training.

Geometry
    Shapes are polygons rasterised once per (shape, pixel side) into coverage templates (4x4
    supersampled when ``antialias``); a pixel belongs to an object when its coverage is >= 0.5.
    Objects are placed at integer pixels by rejection sampling: the bounding squares of two objects
    share at most ``max_overlap`` (< 1/4) of the smaller square, so the centre of every object stays
    visible. Objects are painted in list order (later on top); instance and semantic masks respect
    that occlusion and boxes are tight to the visible mask.

Text
    Captions name every object with size, colour and shape, and relate each distractor to the main
    object ("a large red circle to the left of a small blue star"). Spatial relations compare object
    centres: "left of" / "right of" / "above" / "below" along the axis of larger separation. Questions
    refer to objects only by unique descriptions ("the star", "the red object", "the small blue
    square") and ask about a relation only when the separation along its axis is at least
    ``RELATION_MARGIN`` of the image side. Yes/no questions ask about a true or a false fact with
    equal probability. Answers are single words from :attr:`World.answer_vocab`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Collection, Literal, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlkit.config import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "compositional")
SIZES = ("small", "large")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATION_MARGIN = 0.1  # centre separation (fraction of the image side) needed to ask about a relation
_MAX_TRIES = 50  # placement attempts per distractor
_MAX_RESTARTS = 20  # whole-scene attempts before giving up (never reached with a valid config)
_STREAM_SCENE, _STREAM_RENDER, _STREAM_CAPTION, _STREAM_QA = range(4)


# ---------------------------------------------------------------------------------------------
# Shapes: polygons in a unit frame (x right, y down), centred, largest half-extent 1.


def _fit(vertices: np.ndarray) -> np.ndarray:
    """Centre the bounding box of ``vertices`` (K, 2) at 0 and scale its larger half-side to 1."""
    lo, hi = vertices.min(0), vertices.max(0)
    return ((vertices - (lo + hi) / 2) / ((hi - lo).max() / 2)).astype(np.float64)


def _regular(n: int, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], 1)


def _cross(arm: float = 0.36) -> np.ndarray:
    a = arm
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                     [-a, a], [-1, a], [-1, -a], [-a, -a]])


#: name -> polygon (K, 2). Add an entry to offer a new shape to ``WorldConfig.shapes``.
SHAPE_POLYGONS: dict[str, np.ndarray] = {name: _fit(v) for name, v in {
    "circle": _regular(64),
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]),
    "triangle": _regular(3),
    "diamond": np.array([[0, -1], [0.75, 0], [0, 1], [-0.75, 0]]),
    "star": _star(),
    "hexagon": _regular(6, phase=0.0),
    "cross": _cross(),
    "heart": _heart(),
    "pentagon": _regular(5),
    "arrow": np.array([[-1, -0.3], [0.1, -0.3], [0.1, -0.8], [1, 0], [0.1, 0.8], [0.1, 0.3], [-1, 0.3]]),
}.items()}

DEFAULT_SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "heart")
DEFAULT_COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (230, 200, 20), "green": (40, 160, 60),
    "cyan": (30, 190, 210), "blue": (40, 80, 215), "purple": (135, 60, 190), "pink": (240, 120, 190),
}
_RESERVED = {"yes", "no", "nothing", "object", *SIZES, *NUMBER_WORDS}


def _inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test. ``points`` (P, 2), ``polygon`` (K, 2) -> bool (P,)."""
    x, y = points[:, :1], points[:, 1:]  # (P, 1)
    x0, y0 = polygon[:, 0], polygon[:, 1]  # (K,)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    straddles = (y0 > y) != (y1 > y)  # (P, K)
    dy = np.where(y1 == y0, 1.0, y1 - y0)
    x_cross = x0 + (y - y0) * (x1 - x0) / dy
    return ((straddles & (x < x_cross)).sum(1) % 2).astype(bool)


def shape_template(shape: str, side: int, antialias: bool = True) -> np.ndarray:
    """Coverage of ``shape`` filling a ``side`` x ``side`` pixel square: float32 (side, side) in [0, 1].

    With ``antialias`` each pixel averages a 4x4 grid of sub-samples, else its centre decides.
    """
    ss = 4 if antialias else 1
    u = (np.arange(side * ss) + 0.5) / (side * ss) * 2 - 1  # sub-sample centres in [-1, 1]
    yy, xx = np.meshgrid(u, u, indexing="ij")
    hit = _inside(np.stack([xx.ravel(), yy.ravel()], 1), SHAPE_POLYGONS[shape])
    return hit.reshape(side, ss, side, ss).mean((1, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Configuration


def _rgb(value, name: str) -> tuple[int, int, int]:
    if len(value) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        raise ConfigError(name, f"must be 3 ints in 0..255, got {value!r}")
    return tuple(value)


@dataclass
class WorldConfig:
    """The synthetic world: canvas, vocabulary, object sizes, splits and seed."""

    image_size: int = 64  # canvas side in pixels (square images), >= 8
    min_objects: int = 1  # fewest objects per scene (the main object counts)
    max_objects: int = 4  # most objects per scene, <= 10
    shapes: tuple[str, ...] = DEFAULT_SHAPES  # shape names (keys of SHAPE_POLYGONS); class k = shapes[k]
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))  # name -> RGB
    small_size: float = 0.22  # side of a small object's bounding square, fraction of image_size
    large_size: float = 0.4  # side of the (one) large object's bounding square, fraction of image_size
    max_overlap: float = 0.15  # max shared area of two bounding squares, fraction of the smaller (< 0.25)
    heldout_fraction: float = 0.25  # fraction of colours held out per shape for the compositional split
    seed: int = 0  # seeds scenes, renders, texts and the choice of held-out pairs
    background: Literal["plain", "noise", "texture"] = "plain"  # plain; + per-pixel noise; + low-frequency blotches
    background_colour: tuple[int, int, int] = (240, 240, 240)  # RGB of the canvas
    noise_std: float = 8.0  # amplitude (grey levels) of background='noise' or 'texture'
    antialias: bool = True  # 4x4 supersampled shape edges (masks always use coverage >= 0.5)
    train_length: int = 10000  # scenes in the 'train' split
    val_length: int = 1000  # scenes in the 'val' split
    test_length: int = 1000  # scenes in the 'test' split
    compositional_length: int = 1000  # scenes in the 'compositional' split

    def __post_init__(self):
        self._check_counts()
        self._check_vocabulary()
        self._check_geometry()
        self._check_rest()

    def _check_counts(self) -> None:
        if self.image_size < 8:
            raise ConfigError("image_size", f"must be >= 8, got {self.image_size}")
        if self.min_objects < 1:
            raise ConfigError("min_objects", f"must be >= 1, got {self.min_objects}")
        if not self.min_objects <= self.max_objects <= len(NUMBER_WORDS) - 1:
            raise ConfigError("max_objects", f"must be in [min_objects, 10], got {self.max_objects}")
        for split in SPLITS:
            if getattr(self, f"{split}_length") < 0:
                raise ConfigError(f"{split}_length", f"must be >= 0, got {getattr(self, f'{split}_length')}")

    def _check_vocabulary(self) -> None:
        self.shapes = tuple(self.shapes)
        unknown = [s for s in self.shapes if s not in SHAPE_POLYGONS]
        if unknown or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            raise ConfigError("shapes", f"need >= 2 distinct names from {sorted(SHAPE_POLYGONS)}, got {self.shapes!r}")
        if len(self.colours) < 2:
            raise ConfigError("colours", f"need >= 2 colours, got {len(self.colours)}")
        self.colours = {name: _rgb(rgb, f"colours.{name}") for name, rgb in self.colours.items()}
        clash = (set(self.colours) & (set(self.shapes) | _RESERVED)) | (set(self.shapes) & _RESERVED)
        if clash:
            raise ConfigError("colours", f"names used twice or reserved: {sorted(clash)}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError("heldout_fraction", f"must be in [0, 1), got {self.heldout_fraction}")
        k, n_shapes, n_colours = self.heldout_colours_per_shape, len(self.shapes), len(self.colours)
        if k >= n_colours or -(-n_shapes * k // n_colours) >= n_shapes:
            raise ConfigError("heldout_fraction", f"{self.heldout_fraction} would hold out every colour of a "
                                                  "shape or every shape of a colour")

    def _check_geometry(self) -> None:
        if not 0.0 < self.small_size < self.large_size <= 0.9:
            raise ConfigError("large_size", f"need 0 < small_size < large_size <= 0.9, "
                                            f"got {self.small_size}, {self.large_size}")
        if not 0.0 <= self.max_overlap < 0.25:
            raise ConfigError("max_overlap", f"must be in [0, 0.25) so every object stays visible, "
                                             f"got {self.max_overlap}")
        filled = (self.side("large") ** 2 + (self.max_objects - 1) * self.side("small") ** 2) / self.image_size**2
        if filled > 0.6:
            raise ConfigError("max_objects", f"{self.max_objects} objects would cover {filled:.0%} of the "
                                             "canvas (max 60%): lower it or the sizes")

    def _check_rest(self) -> None:
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        if self.background not in ("plain", "noise", "texture"):
            raise ConfigError("background", f"must be 'plain', 'noise' or 'texture', got {self.background!r}")
        self.background_colour = _rgb(self.background_colour, "background_colour")
        if self.noise_std < 0:
            raise ConfigError("noise_std", f"must be >= 0, got {self.noise_std}")

    @property
    def heldout_colours_per_shape(self) -> int:
        """Held-out colours per shape: ``round(heldout_fraction * C)``, at least 1 when the fraction > 0."""
        if self.heldout_fraction == 0:
            return 0
        return max(1, round(self.heldout_fraction * len(self.colours)))

    def side(self, size: str) -> int:
        """Pixel side of the bounding square of a ``'small'`` or ``'large'`` object (small >= 3 px)."""
        small = max(3, round(self.small_size * self.image_size))
        if size == "small":
            return small
        return min(self.image_size, max(small + 1, round(self.large_size * self.image_size)))


# ---------------------------------------------------------------------------------------------
# Scenes


def _box(x0: float, y0: float, x1: float, y1: float, image_size: int) -> tuple[float, float, float, float]:
    """Pixel corners (x1, y1 exclusive) -> normalised (cx, cy, w, h)."""
    s = float(image_size)
    return ((x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s)


@dataclass(frozen=True)
class WorldObject:
    """One shape of a scene.

    ``box``: normalised (cx, cy, w, h) of the un-occluded shape (its pixels with coverage >= 0.5);
    ``centre``: normalised (cx, cy) of its bounding square, used for spatial relations;
    ``x``, ``y``, ``side``: top-left pixel and side of that bounding square.
    """

    shape: str
    colour: str
    size: str  # 'small' | 'large'
    box: tuple[float, float, float, float]
    centre: tuple[float, float]
    x: int
    y: int
    side: int

    def to_dict(self) -> dict:
        """Keys: shape, colour, size (str), box (4 floats), centre (2 floats)."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "box": list(self.box), "centre": list(self.centre)}


@dataclass(frozen=True)
class Scene:
    """The objects of scene ``index`` of ``split``, in painting order; ``objects[0]`` is the main object."""

    split: str
    index: int
    objects: tuple[WorldObject, ...]

    @property
    def main(self) -> WorldObject:
        return self.objects[0]


class Rendering(NamedTuple):
    """``image``: uint8 (H, W, 3) RGB; ``instance_mask``: int64 (H, W), 0 = background, i = objects[i - 1];
    ``semantic_mask``: int64 (H, W), 0 = background, 1 + shape index. Masks are None when not asked for."""

    image: np.ndarray
    instance_mask: Optional[np.ndarray]
    semantic_mask: Optional[np.ndarray]


class QA(NamedTuple):
    """A question about a scene; ``type`` is 'colour', 'shape', 'count', 'exists' or 'relation'."""

    type: str
    question: str
    answer: str


class _Template(NamedTuple):
    coverage: np.ndarray  # float32 (side, side, 1), for blending
    hard: np.ndarray  # bool (side, side): coverage >= 0.5
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of `hard` inside the square


def _choose_heldout(cfg: WorldConfig) -> list[tuple[str, str]]:
    """(colour, shape) pairs held out of train/val/test: k colours per shape, colours balanced."""
    k = cfg.heldout_colours_per_shape
    colours = list(cfg.colours)
    rng = np.random.default_rng([cfg.seed, 1 + len(SPLITS)])  # a stream no scene uses
    counts = np.zeros(len(colours))
    held = []
    for s in rng.permutation(len(cfg.shapes)):
        chosen = np.lexsort((rng.random(len(colours)), counts))[:k]  # least held-out colours, random ties
        counts[chosen] += 1
        held += [(colours[c], cfg.shapes[s]) for c in chosen]
    return sorted(held, key=lambda p: (cfg.shapes.index(p[1]), colours.index(p[0])))


def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Linear interpolation weights (out_size, in_size) from a coarse grid to pixel centres."""
    pos = (np.arange(out_size) + 0.5) / out_size * (in_size - 1)
    eye = np.eye(in_size)
    return np.stack([np.interp(pos, np.arange(in_size), eye[j]) for j in range(in_size)], 1).astype(np.float32)


class World:
    """Scenes, renders and texts of a :class:`WorldConfig`; every method is deterministic.

    ``class_names``: shape names (class k = shape k); ``colour_names``; ``heldout_pairs``: sorted
    (colour, shape) pairs of the compositional split; ``seen_pairs``: all others;
    ``answer_vocab``: every possible answer (yes, no, nothing, number words, colours, shapes).
    """

    def __init__(self, cfg: Optional[WorldConfig] = None):
        self.cfg = cfg = cfg if cfg is not None else WorldConfig()
        self.class_names = list(cfg.shapes)
        self.colour_names = list(cfg.colours)
        self.heldout_pairs = _choose_heldout(cfg)
        held = set(self.heldout_pairs)
        self.seen_pairs = [(c, s) for s in cfg.shapes for c in cfg.colours if (c, s) not in held]
        self._seen_colours = {s: [c for c, t in self.seen_pairs if t == s] for s in cfg.shapes}
        self.answer_vocab = ["yes", "no", "nothing", *NUMBER_WORDS[: cfg.max_objects + 1],
                             *self.colour_names, *self.class_names]
        self._shape_index = {s: i for i, s in enumerate(cfg.shapes)}
        self._palette = {name: np.array(rgb, np.float32) for name, rgb in cfg.colours.items()}
        self._sides = {size: cfg.side(size) for size in SIZES}
        self._templates: dict[tuple[str, int], _Template] = {}
        self._texture = _interp_matrix(cfg.image_size, 5) if cfg.background == "texture" else None

    def __repr__(self) -> str:
        return f"World(image_size={self.cfg.image_size}, shapes={len(self.class_names)}, seed={self.cfg.seed})"

    def length(self, split: str) -> int:
        """Number of scenes of ``split`` (``WorldConfig.<split>_length``)."""
        self._check_split(split)
        return getattr(self.cfg, f"{split}_length")

    def label(self, scene: Scene) -> int:
        """Class label: the shape index of the main (only large) object."""
        return self._shape_index[scene.main.shape]

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split == "compositional" and not self.heldout_pairs:
            raise ValueError("the compositional split needs heldout_fraction > 0")

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, SPLITS.index(split), index, stream])

    def _template(self, shape: str, side: int) -> _Template:
        key = (shape, side)
        if key not in self._templates:
            cov = shape_template(shape, side, self.cfg.antialias)
            hard = cov >= 0.5
            rows, cols = np.flatnonzero(hard.any(1)), np.flatnonzero(hard.any(0))
            bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            self._templates[key] = _Template(cov[..., None], hard, bbox)
        return self._templates[key]

    # -- scenes -----------------------------------------------------------------------------

    def scene(self, split: str, index: int) -> Scene:
        """Scene ``index`` (any int >= 0) of ``split``: a function of (seed, split, index) only."""
        self._check_split(split)
        if index < 0:
            raise IndexError(f"scene index must be >= 0, got {index}")
        rng = self._rng(split, index, _STREAM_SCENE)
        n = int(rng.integers(self.cfg.min_objects, self.cfg.max_objects + 1))
        for _ in range(_MAX_RESTARTS):
            pairs = [self._main_pair(split, rng)] + [self._seen_pair(rng) for _ in range(n - 1)]
            objects = self._place(pairs, rng)
            if len(objects) >= self.cfg.min_objects:
                return Scene(split, index, tuple(objects))
        raise RuntimeError(f"could not place {self.cfg.min_objects} objects in scene {split}/{index}: "
                           "lower min_objects or the object sizes")

    def _main_pair(self, split: str, rng: np.random.Generator) -> tuple[str, str]:
        if split == "compositional":
            return self.heldout_pairs[int(rng.integers(len(self.heldout_pairs)))]
        shape = self.class_names[int(rng.integers(len(self.class_names)))]
        colours = self._seen_colours[shape]
        return colours[int(rng.integers(len(colours)))], shape

    def _seen_pair(self, rng: np.random.Generator) -> tuple[str, str]:
        return self.seen_pairs[int(rng.integers(len(self.seen_pairs)))]

    def _place(self, pairs: list[tuple[str, str]], rng: np.random.Generator) -> list[WorldObject]:
        """Rejection-sample positions; the first pair is the large object; unplaceable ones are dropped."""
        squares: list[tuple[int, int, int]] = []
        objects = []
        for k, (colour, shape) in enumerate(pairs):
            size = "large" if k == 0 else "small"
            side = self._sides[size]
            for _ in range(_MAX_TRIES):
                x, y = (int(v) for v in rng.integers(0, self.cfg.image_size - side + 1, size=2))
                if all(_shared_area((x, y, side), sq) <= self.cfg.max_overlap * min(side, sq[2]) ** 2
                       for sq in squares):
                    break
            else:
                log.debug("dropped a %s %s: no free place after %d tries", colour, shape, _MAX_TRIES)
                continue
            squares.append((x, y, side))
            objects.append(self._make_object(shape, colour, size, x, y, side))
        return objects

    def _make_object(self, shape: str, colour: str, size: str, x: int, y: int, side: int) -> WorldObject:
        x0, y0, x1, y1 = self._template(shape, side).bbox
        s = self.cfg.image_size
        box = _box(x + x0, y + y0, x + x1, y + y1, s)
        return WorldObject(shape, colour, size, box, ((x + side / 2) / s, (y + side / 2) / s), x, y, side)

    # -- pixels -----------------------------------------------------------------------------

    def render(self, scene: Scene, masks: bool = True) -> Rendering:
        """Paint ``scene`` (objects in order, later on top); masks only when ``masks``."""
        cfg = self.cfg
        rng = self._rng(scene.split, scene.index, _STREAM_RENDER) if cfg.background != "plain" else None
        canvas = self._background(rng)  # (H, W, 3) float32
        instance = np.zeros((cfg.image_size,) * 2, np.int64) if masks else None
        for k, obj in enumerate(scene.objects, 1):
            tpl = self._template(obj.shape, obj.side)
            win = (slice(obj.y, obj.y + obj.side), slice(obj.x, obj.x + obj.side))
            region = canvas[win]
            region += (self._palette[obj.colour] - region) * tpl.coverage
            if masks:
                instance[win][tpl.hard] = k
        if cfg.background == "noise":
            canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * cfg.noise_std
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        if not masks:
            return Rendering(image, None, None)
        lut = np.array([0] + [1 + self._shape_index[o.shape] for o in scene.objects], np.int64)
        return Rendering(image, instance, lut[instance])

    def _background(self, rng: Optional[np.random.Generator]) -> np.ndarray:
        s = self.cfg.image_size
        canvas = np.empty((s, s, 3), np.float32)
        canvas[:] = self.cfg.background_colour
        if self._texture is not None:  # low-frequency grey blotches: a 5x5 grid, bilinear
            coarse = rng.standard_normal((5, 5), dtype=np.float32) * self.cfg.noise_std
            canvas += (self._texture @ coarse @ self._texture.T)[..., None]
        return canvas

    def visible_boxes(self, scene: Scene, instance_mask: np.ndarray) -> np.ndarray:
        """Boxes tight to each object's visible pixels: float32 (N, 4) normalised (cx, cy, w, h)."""
        boxes = np.zeros((len(scene.objects), 4), np.float32)
        for k, obj in enumerate(scene.objects, 1):
            hit = instance_mask[obj.y: obj.y + obj.side, obj.x: obj.x + obj.side] == k
            rows, cols = np.flatnonzero(hit.any(1)), np.flatnonzero(hit.any(0))
            if not rows.size:
                raise ValueError(f"object {k - 1} ({obj.colour} {obj.shape}) is hidden by the objects above it")
            boxes[k - 1] = _box(obj.x + cols[0], obj.y + rows[0], obj.x + cols[-1] + 1,
                                obj.y + rows[-1] + 1, self.cfg.image_size)
        return boxes

    # -- text -------------------------------------------------------------------------------

    def caption(self, scene: Scene) -> str:
        """A caption naming every object (size, colour, shape) and where each distractor is."""
        return make_caption(scene.objects, self._rng(scene.split, scene.index, _STREAM_CAPTION))

    def questions(self, scene: Scene) -> list[QA]:
        """Question/answer pairs: colour, shape, counts, existence (yes/no), relations (what / yes/no)."""
        rng = self._rng(scene.split, scene.index, _STREAM_QA)
        absent_pool = self.seen_pairs if scene.split != "compositional" else [
            (c, s) for s in self.class_names for c in self.colour_names]
        qas = [ask(scene.objects, rng) for ask in _ASK_ABOUT_OBJECTS]
        qas.append(_ask_exists(scene.objects, rng, absent_pool))
        qas.append(_ask_count_of(scene.objects, rng, "shape", self.class_names))
        qas.append(_ask_count_of(scene.objects, rng, "colour", self.colour_names))
        return [qa for qa in qas if qa is not None]


def _shared_area(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    """Overlap area of two squares given as (x, y, side)."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


# ---------------------------------------------------------------------------------------------
# Text: relations, referring expressions, captions, questions

_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_REL_PRONOUN = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
_REL_AXIS = {"left": (0, -1.0), "right": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}  # axis, sign
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Attribute combinations tried, shortest first, to name an object uniquely.
_REFER_ANY = (("shape",), ("colour", "shape"), ("size", "colour", "shape"))
_REFER_NO_COLOUR = (("shape",), ("size", "shape"))
_REFER_NO_SHAPE = (("colour",), ("size", "colour"))


def relation(a: WorldObject, b: WorldObject) -> str:
    """Where ``a`` is relative to ``b`` ('left', 'right', 'above', 'below') along the axis of larger separation."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _holds(a: WorldObject, b: WorldObject, rel: str) -> Optional[bool]:
    """Whether ``a`` is ``rel`` of ``b`` along that relation's axis; None when too close to call."""
    axis, sign = _REL_AXIS[rel]
    d = sign * (a.centre[axis] - b.centre[axis])
    return None if abs(d) < RELATION_MARGIN else d > 0


def _refer(objects: tuple[WorldObject, ...], i: int, combos: tuple[tuple[str, ...], ...]) -> Optional[str]:
    """The shortest unique description of ``objects[i]`` ("the star", "the red object"), or None."""
    for combo in combos:
        key = [getattr(objects[i], a) for a in combo]
        if sum(all(getattr(o, a) == v for a, v in zip(combo, key)) for o in objects) == 1:
            return " ".join(["the", *key] + ([] if "shape" in combo else ["object"]))
    return None


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _noun_phrase(o: WorldObject) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


_OPENINGS = ("{}", "a picture of {}", "an image of {}", "there is {}")


def make_caption(objects: tuple[WorldObject, ...], rng: np.random.Generator) -> str:
    """Describe every object, relating each distractor to the main object ``objects[0]``.

    e.g. "a large red circle to the left of a small blue star", "an image of a large green heart
    with a small red cross above it and a small blue star to its right".
    """
    main, others = objects[0], objects[1:]
    m = _noun_phrase(main)
    opening = _pick(rng, _OPENINGS)
    if not others:
        return opening.format(m)
    if len(others) == 1 and rng.random() < 2 / 3:
        d = others[0]
        if rng.random() < 0.5:
            return f"{m} {_REL_PHRASE[relation(main, d)]} {_noun_phrase(d)}"
        return f"{_noun_phrase(d)} {_REL_PHRASE[relation(d, main)]} {m}"
    clauses = [f"{_noun_phrase(d)} {_REL_PRONOUN[relation(d, main)]}" for d in others]
    return f"{opening.format(m)} with {_join(clauses)}"


def _ask_attribute(objects, rng, combos, attribute: str, templates: tuple[str, ...]) -> Optional[QA]:
    named = [(i, ref) for i in range(len(objects)) if (ref := _refer(objects, i, combos))]
    if not named:
        return None
    i, ref = _pick(rng, named)
    return QA(attribute, _pick(rng, templates).format(ref), getattr(objects[i], attribute))


def _ask_colour(objects, rng) -> Optional[QA]:
    templates = ("what colour is {}?", "what is the colour of {}?", "which colour does {} have?")
    return _ask_attribute(objects, rng, _REFER_NO_COLOUR, "colour", templates)


def _ask_shape(objects, rng) -> Optional[QA]:
    templates = ("what shape is {}?", "what kind of shape is {}?", "which shape is {}?")
    return _ask_attribute(objects, rng, _REFER_NO_SHAPE, "shape", templates)


def _ask_count(objects, rng) -> QA:
    templates = ("how many shapes are there?", "how many objects are in the image?", "how many shapes can you see?")
    return QA("count", _pick(rng, templates), NUMBER_WORDS[len(objects)])


def _ask_count_of(objects, rng, attribute: str, names: list[str]) -> QA:
    """How many objects have a given shape / colour: a present value or (half the time) any value."""
    value = getattr(_pick(rng, objects), attribute) if rng.random() < 0.5 else _pick(rng, names)
    noun = _plural(value) if attribute == "shape" else f"{value} {_pick(rng, ('shapes', 'objects'))}"
    question = _pick(rng, ("how many {} are there?", "how many {} are in the image?")).format(noun)
    return QA("count", question, NUMBER_WORDS[sum(getattr(o, attribute) == value for o in objects)])


def _ask_exists(objects, rng, absent_pool: list[tuple[str, str]]) -> QA:
    """Yes/no: a present (colour, shape) or one from ``absent_pool`` not in the scene, 50/50."""
    present = {(o.colour, o.shape) for o in objects}
    absent = [p for p in absent_pool if p not in present]
    if rng.random() < 0.5 or not absent:
        o = _pick(rng, objects)
        (colour, shape), answer = (o.colour, o.shape), "yes"
    else:
        (colour, shape), answer = _pick(rng, absent), "no"
    templates = ("is there a {} {}?", "is there a {} {} in the image?", "can you see a {} {}?")
    return QA("exists", _pick(rng, templates).format(colour, shape), answer)


def _ask_relation(objects, rng) -> Optional[QA]:
    """"What is to the left of the blue square?": the shape of the one object there, or 'nothing'."""
    hits, empty = [], []
    for i in range(len(objects)):
        ref = _refer(objects, i, _REFER_ANY)
        for rel in _REL_PHRASE if ref else ():
            verdicts = [(o, _holds(o, objects[i], rel)) for j, o in enumerate(objects) if j != i]
            there = [o for o, v in verdicts if v]
            if all(v is not None for _, v in verdicts) and len(there) <= 1:
                (hits if there else empty).append((ref, rel, there[0].shape if there else "nothing"))
    if not hits and not empty:
        return None
    ref, rel, answer = _pick(rng, hits if hits and (rng.random() < 0.75 or not empty) else empty)
    return QA("relation", f"what is {_REL_PHRASE[rel]} {ref}?", answer)


def _ask_relation_yesno(objects, rng) -> Optional[QA]:
    """"Is the circle above the star?": a true relation or its opposite, 50/50."""
    refs = [_refer(objects, i, _REFER_ANY) for i in range(len(objects))]
    facts = [(refs[i], refs[j], rel) for i, a in enumerate(objects) for j, b in enumerate(objects)
             if i != j and refs[i] and refs[j] for rel in _REL_PHRASE if _holds(a, b, rel)]
    if not facts:
        return None
    ref_a, ref_b, rel = _pick(rng, facts)
    answer = "yes" if rng.random() < 0.5 else "no"
    asked = rel if answer == "yes" else _OPPOSITE[rel]
    return QA("relation", f"is {ref_a} {_REL_PHRASE[asked]} {ref_b}?", answer)


_ASK_ABOUT_OBJECTS = (_ask_colour, _ask_shape, _ask_count, _ask_relation, _ask_relation_yesno)


# ---------------------------------------------------------------------------------------------
# Dataset

#: Optional label groups of a sample ("image", "label" and "objects" are always there).
LABEL_GROUPS = ("caption", "qa", "boxes", "masks")
#: Task name -> the label groups it needs.
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "all": LABEL_GROUPS, "classification": (), "captioning": ("caption",), "retrieval": ("caption",),
    "vqa": ("qa",), "detection": ("boxes",), "segmentation": ("masks",), "instance": ("boxes", "masks"),
}


class WorldDataset(Dataset):
    """Scenes ``0..length-1`` of one split of a :class:`World` as sample dicts (see ``data/base.py``).

    Keys: "image" (PIL RGB, image_size x image_size), "label" (int, main shape), "objects" (list of
    :meth:`WorldObject.to_dict`, objects[0] is the main object), and by label group:
    caption -> "caption" (str); qa -> "questions", "answers", "question_types" (list[str]);
    boxes -> "boxes" (float32 (N, 4) visible (cx, cy, w, h) in [0, 1]), "box_labels" (int64 (N,)
    shape index); masks -> "instance_mask", "semantic_mask" (int64 (H, W), see :class:`Rendering`).

    ``task`` picks the groups from :data:`TASK_LABELS`; ``labels`` lists them explicitly instead.
    ``length`` defaults to the config's length of ``split``.
    """

    def __init__(self, world: World | WorldConfig | None = None, split: str = "train",
                 length: Optional[int] = None, task: str = "all", labels: Optional[Collection[str]] = None):
        self.world = world if isinstance(world, World) else World(world)
        self.split = split
        self.length = self.world.length(split) if length is None else length
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if task not in TASK_LABELS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_LABELS)}")
        if labels is not None and task != "all":
            raise ValueError("give either task or labels, not both")
        self.labels = frozenset(TASK_LABELS[task] if labels is None else labels)
        if not self.labels <= set(LABEL_GROUPS):
            raise ValueError(f"unknown label groups {sorted(self.labels - set(LABEL_GROUPS))}; expected {LABEL_GROUPS}")
        self.classes = self.world.class_names

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        world, labels = self.world, self.labels
        scene = world.scene(self.split, int(index))
        image, instance, semantic = world.render(scene, masks=bool(labels & {"boxes", "masks"}))
        sample = {"image": Image.fromarray(image), "label": world.label(scene),
                  "objects": [o.to_dict() for o in scene.objects]}
        if "caption" in labels:
            sample["caption"] = world.caption(scene)
        if "qa" in labels:
            qas = world.questions(scene)
            sample.update(questions=[q.question for q in qas], answers=[q.answer for q in qas],
                          question_types=[q.type for q in qas])
        if "boxes" in labels:
            sample["boxes"] = torch.from_numpy(world.visible_boxes(scene, instance))
            sample["box_labels"] = torch.tensor([world.class_names.index(o.shape) for o in scene.objects])
        if "masks" in labels:
            sample["instance_mask"] = torch.from_numpy(instance)
            sample["semantic_mask"] = torch.from_numpy(semantic)
        return sample
