"""ShapesWorld: a procedural image-caption-detection data set small enough for a CPU.

Each scene (default 128x128 RGB) shows 2-5 flat-coloured shapes on a varied background; later
shapes are drawn over earlier ones. The data set carries what RegionCLIP needs:

  - image-text pairs whose captions name several (not all) objects with their attributes, but
    never where they are ("a red star and two small blue circles on a striped background"), so an
    image-level CLIP learns the words but not their location;
  - ground-truth boxes with categories (the 10 shapes, or shape x colour), with a base/novel split
    of the shapes for open-vocabulary detection (`NOVEL_SHAPES`).

Vocabulary: 10 shapes (`SHAPES`) x 8 colours (`COLORS`) x 2 sizes (small, large) on 4 background
kinds (plain, gradient, noisy, striped). The caption grammar, the split and the files written are
documented in docs/shapesworld.md.

Geometry conventions: continuous pixel coordinates, pixel (i, j) covers [j, j+1) x [i, i+1).
Each object is a polygon (circles and hearts are 48-gons) lying fully inside the image. A pixel
belongs to it when the pixel's centre lies inside the polygon (`rasterize_polygon`; no
anti-aliasing), and its ground-truth box is the tight extent of those pixels as if nothing covered
it ([x1, y1, x2, y2], x2/y2 exclusive). Objects with less than `min_visible` of their pixels
visible stay in the picture but are left out of the ground truth and of the captions. An
object's instance mask is its visible part only (its pixels not covered by later objects), as
COCO annotates occluded objects: the box is the unoccluded extent while the mask may be smaller
(COCO's `area` is the mask's). Masks are written as compressed RLE into the shards (`masks`) and
into the COCO json (`segmentation`, counts as a str).

Determinism: scene `index` of split `split` depends only on (seed, split, index, config), through
`np.random.default_rng([seed, split_code, index])`, so any subset can be regenerated alone and
parallel generation equals serial generation byte for byte.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from regionclip_jax.data.schema import encode_mask
from regionclip_jax.data.shards import ShardWriter

# Bump when a change alters the generated pixels, boxes or captions for the same arguments.
GENERATOR_VERSION = 1
SOURCE = "shapesworld"

SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "pentagon",
    "hexagon",
    "arrow",
    "star",
    "cross",
    "heart",
)
# Open-vocabulary split: detectors train on boxes of base shapes only; novel shapes appear in the
# pretraining captions (as rare concepts do in web captions) and in the evaluation ground truth.
NOVEL_SHAPES = ("star", "cross", "heart")
BASE_SHAPES = tuple(s for s in SHAPES if s not in NOVEL_SHAPES)

PLURALS = {s: s + "es" if s.endswith(("s", "x", "ch", "sh")) else s + "s" for s in SHAPES}

# Saturated object colours; backgrounds use the muted palette below, so objects always contrast.
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (45, 75, 220),
    "purple": (135, 55, 195),
    "pink": (245, 120, 190),
}
# Per-channel jitter applied to an object's colour (uniform in [-j, j]).
COLOR_JITTER = 12

SIZES = ("small", "large")
# The longer side of an object, as a fraction of the image size.
SIZE_RANGES = {"small": (0.14, 0.22), "large": (0.30, 0.42)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}

# Placement retries (up to 12) while a new object's box would cover more than this fraction of an
# earlier object's box. About 30% of objects end up partly hidden and 2% less than 30% visible.
MAX_COVER = 0.85

BACKGROUNDS = ("plain", "gradient", "noisy", "striped")
_BG_PALETTE = np.array(
    [
        (128, 128, 128),
        (92, 92, 98),
        (170, 170, 164),
        (200, 194, 184),
        (62, 66, 76),
        (116, 110, 100),
        (146, 152, 140),
        (42, 42, 48),
        (214, 214, 208),
        (100, 106, 122),
    ],
    dtype=np.float32,
)

NUMBER_WORDS = ("zero", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LEADS = ("a photo of", "a picture of", "an image of", "a drawing of")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# ---------------------------------------------------------------------------------------------
# Shapes: unit polygons spanning exactly [0, 1] x [0, 1] (x right, y down) and their aspect w/h.


def _regular(n: int, phase: float, inner: float | None = None) -> np.ndarray:
    k = 2 * n if inner else n
    ang = phase + np.arange(k) * (2 * np.pi / k)
    r = np.ones(k) if not inner else np.where(np.arange(k) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _build_shapes() -> dict[str, tuple[np.ndarray, float]]:
    a, b = 0.32, 0.68
    raw = {
        "circle": _regular(48, 0.0),
        "square": np.array([(0, 0), (1, 0), (1, 1), (0, 1)], float),
        # Equilateral, point up.
        "triangle": np.array([(0.5, 0), (1, math.sqrt(3) / 2), (0, math.sqrt(3) / 2)], float),
        "diamond": np.array([(0.35, 0), (0.7, 0.5), (0.35, 1), (0, 0.5)], float),
        "pentagon": _regular(5, -np.pi / 2),
        "hexagon": _regular(6, 0.0),  # flat top
        "arrow": np.array(
            [(0.375, 0), (0.75, 0.5), (0.51, 0.5), (0.51, 1), (0.24, 1), (0.24, 0.5), (0, 0.5)],
            float,
        ),
        "star": _regular(5, -np.pi / 2, inner=0.45),
        "cross": np.array(
            [
                (a, 0),
                (b, 0),
                (b, a),
                (1, a),
                (1, b),
                (b, b),
                (b, 1),
                (a, 1),
                (a, b),
                (0, b),
                (0, a),
                (a, a),
            ],
            float,
        ),
        "heart": _heart(),
    }
    out = {}
    for name in SHAPES:
        p = raw[name]
        lo, hi = p.min(axis=0), p.max(axis=0)
        out[name] = ((p - lo) / (hi - lo), float((hi - lo)[0] / (hi - lo)[1]))
    return out


UNIT_SHAPES = _build_shapes()


def rasterize_polygon(polygon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Pixels whose centre lies inside `polygon` (even-odd rule), as a crop of the image.

    A scanline fill: for each pixel row, the x where the edges cross the row's centre line toggle
    inside/outside for the pixel centres right of them. Exact, unlike PIL's polygon fill, which
    also paints pixels up to ~2 px outside the outline (its edges are drawn inclusively).

    Args:
      polygon: float[V, 2] vertices (x, y) in continuous pixel coordinates.
      height, width: image size; the result is clipped to it.

    Returns:
      (mask bool[h, w], top, left): the crop of the image's mask at rows top.., columns left..
    """
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    top = max(0, math.floor(y1.min() - 0.5))
    bottom = min(height, math.ceil(y1.max() - 0.5) + 1)
    left = max(0, math.floor(x1.min() - 0.5))
    right = min(width, math.ceil(x1.max() - 0.5) + 1)
    if bottom <= top or right <= left:
        return np.zeros((0, 0), bool), top, left
    yc = np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5  # row centres [H, 1]
    crosses = (y1 > yc) != (y2 > yc)  # [H, E], half-open so a vertex on the line counts once
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x1 + (yc - y1) * (x2 - x1) / (y2 - y1)
    rows, edges = np.nonzero(crosses)
    # First column whose centre j + 0.5 lies right of the crossing (clamped to the crop).
    first = np.clip(np.ceil(xc[rows, edges] - 0.5).astype(np.int64) - left, 0, right - left)
    toggles = np.zeros((bottom - top, right - left + 1), np.int32)
    np.add.at(toggles, (rows, first), 1)
    mask = (np.cumsum(toggles[:, :-1], axis=1) & 1).astype(bool)
    return mask, top, left


# ---------------------------------------------------------------------------------------------
# Configuration, categories.


@dataclasses.dataclass(frozen=True)
class ShapesWorldConfig:
    """What a scene may contain.

    Attributes:
      image_size: side of the square image in pixels (>= 32).
      min_objects, max_objects: objects drawn per scene (uniform; before occlusion drops).
      min_visible: objects with a smaller visible fraction are left out of GT and captions.
      captions_per_image: captions written per image.
      max_mentions: most objects one caption mentions (each caption mentions 1..this).
      categories: "shape" (10 categories) or "shape_color" (80, "red circle", ...).
      novel_shapes: shapes whose categories are `split: "novel"`.
      image_format: "png" (lossless; default) or "jpeg" (quality 95).
      small_size, large_size: (min, max) object side as a fraction of the image side for the
        "small" and "large" size classes (defaults: SIZE_RANGES).
      color_mention, size_mention: probability that a caption's noun phrase names the object's
        colour / size. Captions that name shapes only (0, 0) make an image-level CLIP learn shapes
        rather than colours (the ShapesWorld teacher recipe, configs/pretrain_shapesworld.py).
      train_novel_weight: how likely each novel shape is, relative to a base shape, in the
        "train" split only (1: all shapes equally likely). Held-out splits keep every shape
        equally likely, and their scenes do not depend on this field. Below 1 it makes an
        open-vocabulary training set in which novel objects are present, unlabelled, but rarer
        than base ones, as in COCO's (configs/detect_shapesworld.py).
    """

    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 5
    min_visible: float = 0.3
    captions_per_image: int = 5
    max_mentions: int = 3
    categories: str = "shape"
    novel_shapes: tuple[str, ...] = NOVEL_SHAPES
    image_format: str = "png"
    small_size: tuple[float, float] = SIZE_RANGES["small"]
    large_size: tuple[float, float] = SIZE_RANGES["large"]
    color_mention: float = 0.75
    size_mention: float = 0.35
    train_novel_weight: float = 1.0

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")
        if self.categories not in ("shape", "shape_color"):
            raise ValueError(
                f"categories must be 'shape' or 'shape_color', got {self.categories!r}"
            )
        unknown = set(self.novel_shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown novel shapes {sorted(unknown)}; shapes are {SHAPES}")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {self.image_format!r}")
        if self.captions_per_image < 1 or self.max_mentions < 1:
            raise ValueError("captions_per_image and max_mentions must be >= 1")
        for name in ("small_size", "large_size"):
            lo, hi = (float(x) for x in getattr(self, name))
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(
                    f"{name} must be (min, max) with 0 < min <= max <= 1, got {(lo, hi)}"
                )
        for name in ("color_mention", "size_mention"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if not self.train_novel_weight >= 0.0:
            raise ValueError(f"train_novel_weight must be >= 0, got {self.train_novel_weight}")

    def size_range(self, size: str) -> tuple[float, float]:
        return tuple(self.small_size if size == "small" else self.large_size)

    def shape_probabilities(self, split: str) -> np.ndarray | None:
        """float64[len(SHAPES)] sampling probabilities of the shapes in `split`; None: uniform."""
        if split != "train" or self.train_novel_weight == 1.0:
            return None
        weights = np.array(
            [self.train_novel_weight if s in self.novel_shapes else 1.0 for s in SHAPES]
        )
        return weights / weights.sum()


def categories(config: ShapesWorldConfig = ShapesWorldConfig()) -> list[dict[str, Any]]:
    """COCO `categories` entries (ids from 1) with the open-vocabulary `split` of each."""
    cats = []
    for si, shape in enumerate(SHAPES):
        split = "novel" if shape in config.novel_shapes else "base"
        if config.categories == "shape":
            cats.append({"id": si + 1, "name": shape, "supercategory": "shape", "split": split})
        else:
            for ci, color in enumerate(COLORS):
                cats.append(
                    {
                        "id": si * len(COLORS) + ci + 1,
                        "name": f"{color} {shape}",
                        "supercategory": shape,
                        "split": split,
                    }
                )
    return cats


def category_id(shape: str, color: str, config: ShapesWorldConfig) -> int:
    si = SHAPES.index(shape)
    if config.categories == "shape":
        return si + 1
    return si * len(COLORS) + list(COLORS).index(color) + 1


# ---------------------------------------------------------------------------------------------
# One scene.


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    Attributes:
      shape, color, size: its attributes (names from SHAPES, COLORS, SIZES).
      rgb: the exact colour drawn (the named colour plus jitter).
      polygon: float64[V, 2] vertices (x, y) in continuous pixel coordinates.
      box: float32[4] xyxy, the tight extent of its drawn pixels (x2, y2 exclusive).
      area: pixels it covers when unoccluded.
      visible_area: pixels of it left visible by the objects drawn after it.
      kept: visible_area / area >= min_visible (in the ground truth and captions).
    """

    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    polygon: np.ndarray
    box: np.ndarray
    area: int
    visible_area: int
    kept: bool

    @property
    def visible_fraction(self) -> float:
        return self.visible_area / self.area


@dataclasses.dataclass(frozen=True)
class Scene:
    """A rendered scene: image uint8[S, S, 3], background kind, objects in drawing order, captions,
    and `labels` uint8[S, S]: 1 + the index in `objects` of the topmost object at each pixel
    (0: background)."""

    image: np.ndarray
    background: str
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]
    labels: np.ndarray

    @property
    def kept(self) -> tuple[SceneObject, ...]:
        return tuple(o for o in self.objects if o.kept)

    @property
    def kept_indices(self) -> tuple[int, ...]:
        """Indices in `objects` of the kept objects (the ground truth), in drawing order."""
        return tuple(i for i, o in enumerate(self.objects) if o.kept)

    def visible_mask(self, i: int) -> np.ndarray:
        """bool[S, S]: the pixels of object `i` left visible by the objects drawn after it.

        The instance mask of the ground truth, as COCO annotates occluded objects (visible part
        only); its area is the object's `visible_area`.
        """
        return self.labels == i + 1


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


def _two_bg_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.choice(len(_BG_PALETTE), 2, replace=False)
    return _BG_PALETTE[i], _BG_PALETTE[j]


@functools.lru_cache(maxsize=8)
def _pixel_centres(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _background(kind: str, s: int, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = _two_bg_colors(rng)
    if kind == "plain":
        return np.broadcast_to(c1.astype(np.uint8), (s, s, 3)).copy()
    yy, xx = _pixel_centres(s)
    if kind == "gradient":
        th = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(th) + yy * np.sin(th)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        return img.astype(np.uint8)
    if kind == "noisy":
        # Grey (luminance) noise over a muted base colour.
        noise = rng.integers(-30, 31, size=(s, s, 1), dtype=np.int16)
        return np.clip(c1.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    if kind == "striped":
        th = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
        period = rng.uniform(6, 16) * s / 128
        t = xx * np.cos(th) + yy * np.sin(th)
        stripe = (np.floor(t / (period / 2)).astype(np.int64) % 2).astype(bool)
        return np.where(stripe[..., None], c2, c1).astype(np.uint8)
    raise ValueError(kind)


def _place(
    s: int, w: float, h: float, boxes: list[np.ndarray], rng: np.random.Generator
) -> tuple[float, float]:
    """Top-left corner of a w x h object inside the image, avoiding heavy cover of earlier ones."""
    x0 = y0 = 0.0
    for _ in range(12):
        x0 = rng.uniform(1.0, s - 1.0 - w)
        y0 = rng.uniform(1.0, s - 1.0 - h)
        ok = True
        for b in boxes:
            iw = min(b[2], x0 + w) - max(b[0], x0)
            ih = min(b[3], y0 + h) - max(b[1], y0)
            if iw > 0 and ih > 0 and iw * ih > MAX_COVER * (b[2] - b[0]) * (b[3] - b[1]):
                ok = False
                break
        if ok:
            break
    return x0, y0


def _noun_phrase(
    desc: tuple[str | None, str | None, str], count: int, rng: np.random.Generator
) -> str:
    size, color, shape = desc
    words = []
    if size is not None:
        options = SIZE_WORDS[size]
        words.append(options[rng.integers(len(options))])
    if color is not None:
        words.append(color)
    words.append(shape if count == 1 else PLURALS[shape])
    if count == 1:
        det = "an" if words[0][0] in "aeiou" else "a"
    else:
        det = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    return " ".join([det, *words])


def make_captions(
    kept: Sequence[tuple[str, str, str]],
    background: str,
    rng: np.random.Generator,
    num: int = 5,
    max_mentions: int = 3,
    color_mention: float = 0.75,
    size_mention: float = 0.35,
) -> list[str]:
    """Captions for a scene (grammar in docs/shapesworld.md).

    Args:
      kept: (shape, color, size) of each object in the ground truth.
      background: background kind (a name in BACKGROUNDS).
      rng: random generator.
      num: captions to make.
      max_mentions: most objects mentioned by one caption.
      color_mention, size_mention: probability that a noun phrase names the colour / size.

    Returns:
      `num` captions. Every noun phrase "[count] [size] [colour] shape" is true of the scene:
      `count` is the number of kept objects with all the attributes it names.
    """
    if not kept:
        return [f"a {background} background"] * num
    out = []
    for _ in range(num):
        k = int(rng.integers(1, min(max_mentions, len(kept)) + 1))
        focus = rng.choice(len(kept), k, replace=False)
        descs: list[tuple[str | None, str | None, str]] = []
        counts: list[int] = []
        covered: set[int] = set()
        for f in focus:
            shape, color, size = kept[f]
            d = (
                size if rng.random() < size_mention else None,
                color if rng.random() < color_mention else None,
                shape,
            )
            matched = {
                j
                for j, (js, jc, jz) in enumerate(kept)
                if js == d[2] and d[1] in (None, jc) and d[0] in (None, jz)
            }
            # Mentions describe disjoint sets of objects: no "two stars and a red star".
            if matched & covered:
                continue
            covered |= matched
            descs.append(d)
            counts.append(len(matched))
        nps = [_noun_phrase(d, c, rng) for d, c in zip(descs, counts)]
        objects = nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
        form = rng.random()
        mention_bg = rng.random() < 0.35
        if mention_bg and form < 0.3:
            text = f"a {background} background with {objects}"
        else:
            if form < 0.5:
                body = objects
            elif form < 0.8:
                body = f"{LEADS[rng.integers(len(LEADS))]} {objects}"
            else:
                body = f"there {'is' if counts[0] == 1 else 'are'} {objects}"
            text = f"{body} on a {background} background" if mention_bg else body
        out.append(text)
    return out


def render_scene(
    index: int,
    *,
    seed: int = 0,
    split: str = "train",
    config: ShapesWorldConfig = ShapesWorldConfig(),
) -> Scene:
    """Renders scene `index` of `split` ("train", "val" or "test") for `seed`.

    Deterministic: depends only on (seed, split, index, config). Returns a `Scene` whose image is
    uint8[S, S, 3] and whose objects carry their polygons, boxes and visibility.
    """
    rng = _scene_rng(seed, split, index)
    s = config.image_size
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _background(background, s, rng)
    # Label map: 1 + index of the topmost object at each pixel (0 = background).
    labels = np.zeros((s, s), np.uint8)

    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    shape_p = config.shape_probabilities(split)
    drawn: list[dict[str, Any]] = []
    placed: list[np.ndarray] = []
    for _ in range(n):
        # Uniform draws stay `integers` so that scenes of earlier data sets are reproduced exactly.
        if shape_p is None:
            shape = SHAPES[rng.integers(len(SHAPES))]
        else:
            shape = SHAPES[rng.choice(len(SHAPES), p=shape_p)]
        color = list(COLORS)[rng.integers(len(COLORS))]
        size = SIZES[rng.integers(len(SIZES))]
        unit, aspect = UNIT_SHAPES[shape]
        side = rng.uniform(*config.size_range(size)) * s
        w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
        x0, y0 = _place(s, w, h, placed, rng)
        polygon = unit * np.array([w, h]) + np.array([x0, y0])
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        mask, top, left = rasterize_polygon(polygon, s, s)
        rows, cols = np.nonzero(mask)
        if rows.size == 0:  # too thin to cover a pixel centre: not drawn at all
            continue
        region = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
        image[region][mask] = rgb
        labels[region][mask] = len(drawn) + 1
        placed.append(np.array([x0, y0, x0 + w, y0 + h]))
        box = [left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1]
        drawn.append(
            dict(
                shape=shape,
                color=color,
                size=size,
                rgb=rgb,
                polygon=polygon,
                box=np.array(box, np.float32),
                area=int(rows.size),
            )
        )
    visible = np.bincount(labels.ravel(), minlength=len(drawn) + 1)
    objects = []
    for i, d in enumerate(drawn):
        vis = int(visible[i + 1])
        objects.append(
            SceneObject(**d, visible_area=vis, kept=vis >= config.min_visible * d["area"])
        )
    kept = [(o.shape, o.color, o.size) for o in objects if o.kept]
    captions = make_captions(
        kept,
        background,
        rng,
        config.captions_per_image,
        config.max_mentions,
        config.color_mention,
        config.size_mention,
    )
    return Scene(image, background, tuple(objects), tuple(captions), labels)


def encode_image(image: np.ndarray, image_format: str = "png") -> bytes:
    """PNG (compress_level 1: fast, still lossless) or JPEG (quality 95) bytes of uint8[H, W, 3]."""
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def scene_record(
    index: int,
    *,
    seed: int = 0,
    split: str = "train",
    config: ShapesWorldConfig = ShapesWorldConfig(),
) -> tuple[dict[str, Any], Scene]:
    """The shard record (schema.py) of one scene, and the scene.

    `masks` holds each kept object's visible mask (`Scene.visible_mask`) as a compressed RLE.
    """
    scene = render_scene(index, seed=seed, split=split, config=config)
    kept = scene.kept
    masks = [encode_mask(scene.visible_mask(i)) for i in scene.kept_indices]
    record = {
        "id": f"{SOURCE}-{split}-{index:08d}",
        "source": SOURCE,
        "image": encode_image(scene.image, config.image_format),
        "image_format": config.image_format,
        "height": config.image_size,
        "width": config.image_size,
        "captions": list(scene.captions),
        "boxes": np.array([o.box for o in kept], np.float32).reshape(-1, 4),
        "category_ids": np.array([category_id(o.shape, o.color, config) for o in kept], np.int32),
        "iscrowd": np.zeros(len(kept), bool),
        "masks": masks,
        "proposals": None,
        "objectness": None,
    }
    return record, scene


def _coco_entries(
    index: int, record: dict[str, Any], scene: Scene, split: str, config: ShapesWorldConfig
) -> tuple[dict, list[dict]]:
    ext = "png" if config.image_format == "png" else "jpg"
    image = {
        "id": index + 1,
        "file_name": f"{split}/{index:08d}.{ext}",
        "height": config.image_size,
        "width": config.image_size,
        "background": scene.background,
        "record_id": record["id"],
        "num_occluded_dropped": sum(1 for o in scene.objects if not o.kept),
    }
    anns = []
    for o, rle in zip(scene.kept, record["masks"]):
        x1, y1, x2, y2 = (float(v) for v in o.box)
        anns.append(
            {
                "image_id": index + 1,
                "category_id": category_id(o.shape, o.color, config),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                # COCO's area is that of the visible region (as for occluded COCO masks).
                "area": float(o.visible_area),
                # The visible mask as COCO's compressed RLE (counts as a str, as in its json).
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "iscrowd": 0,
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "visible_fraction": round(o.visible_fraction, 4),
            }
        )
    return image, anns


def _render_chunk(args: tuple) -> list[tuple[dict, dict, list[dict]]]:
    """Worker: records and COCO entries of scene indices [start, stop)."""
    start, stop, seed, split, config = args
    out = []
    for i in range(start, stop):
        record, scene = scene_record(i, seed=seed, split=split, config=config)
        image, anns = _coco_entries(i, record, scene, split, config)
        out.append((record, image, anns))
    return out


def _iter_scenes(num: int, seed: int, split: str, config: ShapesWorldConfig, num_workers: int):
    chunk = 64
    jobs = [(a, min(num, a + chunk), seed, split, config) for a in range(0, num, chunk)]
    if num_workers <= 0:
        for job in jobs:
            yield from _render_chunk(job)
        return
    # spawn: the parent may hold JAX/grain threads, which fork would copy in a broken state.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        for result in pool.map(_render_chunk, jobs):
            yield from result


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        # dumps, not dump: json.dump streams through the pure-Python encoder (5x slower).
        f.write(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def generate(
    out_dir: str | os.PathLike,
    num_train: int = 1000,
    num_val: int = 200,
    seed: int = 0,
    image_size: int | None = None,
    *,
    records_per_shard: int = 5000,
    num_workers: int = 0,
    write_images: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    config: ShapesWorldConfig | None = None,
    **config_kwargs: Any,
) -> dict[str, Any]:
    """Generates ShapesWorld train/val splits.

    Writes:
      out_dir/train/, out_dir/val/: ArrayRecord shards + manifest.json (shards.py), one record per
        image with its captions, GT boxes and category ids (all categories, base and novel);
      out_dir/annotations/instances_{split}.json: COCO instances (categories carry "split");
      out_dir/annotations/captions_{split}.json: COCO captions;
      out_dir/images/{split}/XXXXXXXX.png when `write_images`;
      out_dir/shapesworld.json: arguments, categories, split lists and counts.

    Args:
      out_dir: output directory.
      num_train, num_val: images per split (a split with 0 images is not written).
      seed: data set seed.
      image_size: image side in pixels (None: `config.image_size`, default 128).
      records_per_shard: records per ArrayRecord file.
      num_workers: processes rendering in parallel (0: in this process). Output is identical.
      write_images: also write the image files the COCO json names.
      overwrite: replace an existing data set in `out_dir`.
      progress: called with the number of images finished since the last call.
      config: scene configuration; `config_kwargs` override its fields.

    Returns:
      The summary also written to shapesworld.json (plus "seconds" and "images_per_second").
    """
    # Imported here: keeps `render_scene` importable without array_record (worker processes).
    config = config or ShapesWorldConfig()
    if image_size is not None:
        config_kwargs["image_size"] = image_size
    config = dataclasses.replace(config, **config_kwargs)
    out_dir = os.fspath(out_dir)
    summary_path = os.path.join(out_dir, "shapesworld.json")
    if os.path.exists(summary_path) and not overwrite:
        raise FileExistsError(f"{summary_path} exists: a data set is already there (use overwrite)")
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    cats = categories(config)
    started = time.perf_counter()
    splits: dict[str, Any] = {}
    for split, num in (("train", num_train), ("val", num_val)):
        if num <= 0:
            continue
        images, anns, caps = [], [], []
        if write_images:
            os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        writer = ShardWriter(
            os.path.join(out_dir, split),
            f"{SOURCE}_{split}",
            records_per_shard,
            require_captions=True,
            require_boxes=False,
            # Our own encoder wrote the bytes: parse the header only (a full decode costs 25%).
            check_images=False,
            overwrite=overwrite,
            metadata={
                "generator": SOURCE,
                "generator_version": GENERATOR_VERSION,
                "split": split,
                "seed": seed,
            },
        )
        with writer:
            for record, image, image_anns in _iter_scenes(num, seed, split, config, num_workers):
                if not writer.write(record):
                    raise RuntimeError(
                        f"ShapesWorld record {record['id']} was rejected: {writer.summary()}"
                    )
                images.append(image)
                for a in image_anns:
                    anns.append(dict(a, id=len(anns) + 1))
                for c in record["captions"]:
                    caps.append({"id": len(caps) + 1, "image_id": image["id"], "caption": c})
                if write_images:
                    with open(os.path.join(out_dir, "images", image["file_name"]), "wb") as f:
                        f.write(record["image"])
                if progress is not None:
                    progress(1)
        info = {
            "description": "ShapesWorld (regionclip_jax procedural data set)",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
        }
        _write_json(
            os.path.join(out_dir, "annotations", f"instances_{split}.json"),
            {"info": info, "images": images, "annotations": anns, "categories": cats},
        )
        _write_json(
            os.path.join(out_dir, "annotations", f"captions_{split}.json"),
            {"info": info, "images": images, "annotations": caps},
        )
        splits[split] = {
            "images": num,
            "objects": len(anns),
            "captions": len(caps),
            "shards": os.path.join(split),
            "instances": os.path.join("annotations", f"instances_{split}.json"),
            "captions_json": os.path.join("annotations", f"captions_{split}.json"),
        }
    seconds = time.perf_counter() - started
    summary = {
        "generator": SOURCE,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "categories": cats,
        "base_categories": [c["name"] for c in cats if c["split"] == "base"],
        "novel_categories": [c["name"] for c in cats if c["split"] == "novel"],
        "splits": splits,
    }
    _write_json(summary_path, summary)
    total = sum(v["images"] for v in splits.values())
    return dict(summary, seconds=seconds, images_per_second=total / max(seconds, 1e-9))
