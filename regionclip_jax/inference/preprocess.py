"""Inference preprocessing, as RegionCLIP's test-time pipeline (spec §2.1, §6.1, §10).

RGB image -> resize (shortest edge `min_size` = 800, longest <= `max_size` = 1333, PIL bicubic;
`regionclip_jax.data.transforms.resized_size`) -> CLIP normalisation -> zero padding at the
bottom/right to a static canvas. The default canvas is one of two buckets, landscape
`(ceil32(min_size), ceil32(max_size))` = 800 x 1344 or its transpose, so every image of that
orientation compiles to the same program (spec §10). `Prepared.pixels` keeps the resized RGB
0..255 canvas before normalisation (what an offline RPN takes). Boxes are absolute xyxy;
`to_canvas` / `to_original` map them between the original image and the resized canvas frames.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from regionclip_jax.data.transforms import normalize_image, pad_image, resize_image, resized_size


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def load_image(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A path (any format PIL reads; grey/alpha/palette converted) or an array -> uint8 [H, W, 3] RGB.

    Arrays may be uint8 [H, W, 3] or [H, W] (grey), or float in [0, 1].

    Raises:
      FileNotFoundError: no file at the path.
      ValueError: the file is not a readable image, or the array has a wrong shape.
    """
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4) or min(a.shape[:2]) < 1:
            raise ValueError(f"image array must be [H, W, 3] RGB, got shape {image.shape}")
        a = a[..., :3]
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
                a = a * 255.0
            a = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(a)
    path = os.fspath(image)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such image file", path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def default_canvas(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The orientation bucket for a resized image: (ceil32(min), ceil32(max)) or its transpose."""
    short, long = _ceil(min_size, 32), _ceil(max_size, 32)
    return (short, long) if width >= height else (long, short)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One preprocessed image.

    Attributes:
      image: float32 `[Hc, Wc, 3]` CLIP-normalised canvas (zeros outside the image).
      image_hw: (h, w) of the resized image inside the canvas.
      original_hw: (H, W) of the input image.
      pixels: uint8 `[Hc, Wc, 3]` the same canvas before normalisation: resized RGB 0..255, zeros
        outside the image (the input of an offline RPN); None when not kept.
    """

    image: np.ndarray
    image_hw: tuple[int, int]
    original_hw: tuple[int, int]
    pixels: np.ndarray | None = None

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(sx, sy): canvas pixels per original pixel."""
        return self.image_hw[1] / self.original_hw[1], self.image_hw[0] / self.original_hw[0]

    def to_canvas(self, boxes: np.ndarray) -> np.ndarray:
        """float [..., 4] xyxy in original pixels -> canvas pixels (float32)."""
        sx, sy = self.scale_xy
        return (np.asarray(boxes, np.float64) * [sx, sy, sx, sy]).astype(np.float32)

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """float [..., 4] xyxy in canvas pixels -> original pixels (float32)."""
        sx, sy = self.scale_xy
        return (np.asarray(boxes, np.float64) / [sx, sy, sx, sy]).astype(np.float32)


def preprocess(
    image: str | os.PathLike | np.ndarray,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    canvas: tuple[int, int] | None = None,
) -> Prepared:
    """Loads, resizes, normalises and pads one image (see the module docstring).

    Args:
      image: path or uint8 [H, W, 3] RGB array.
      min_size, max_size: the resize rule (RegionCLIP test: 800 / 1333).
      canvas: (Hc, Wc) to pad to; default `default_canvas`. Must hold the resized image.
    """
    pixels = load_image(image)
    h, w = pixels.shape[:2]
    new_h, new_w = resized_size(h, w, min_size, max_size)
    canvas = canvas or default_canvas(new_h, new_w, min_size, max_size)
    if new_h > canvas[0] or new_w > canvas[1]:
        raise ValueError(f"resized image {new_h}x{new_w} does not fit the canvas {canvas}")
    resized = resize_image(pixels, new_h, new_w)
    canvas = tuple(canvas)
    return Prepared(
        pad_image(normalize_image(resized), canvas),
        (new_h, new_w),
        (h, w),
        pixels=pad_image(resized, canvas),
    )


def validate_boxes(
    boxes: Sequence | np.ndarray, original_hw: tuple[int, int], *, clip: bool = False
) -> np.ndarray:
    """Checks user boxes (absolute xyxy in original pixels) and returns float32 [R, 4].

    Args:
      clip: clip boxes to the image instead of rejecting boxes that extend past it.

    Raises:
      ValueError: wrong shape, non-finite values, a degenerate box (x2 <= x1 or y2 <= y1, after
        clipping), or (without `clip`) a box outside the image; the message names the box.
    """
    b = np.asarray(boxes, np.float64)
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be [R, 4] xyxy, got shape {b.shape}")
    h, w = original_hw
    for i, box in enumerate(b):
        if not np.all(np.isfinite(box)):
            raise ValueError(f"box {i} {box.tolist()} has non-finite coordinates")
    if clip:
        b = np.clip(b, 0, [w, h, w, h])
    else:
        # Half a pixel of slack for rounding in annotation tools.
        out = (b[:, 0] < -0.5) | (b[:, 1] < -0.5) | (b[:, 2] > w + 0.5) | (b[:, 3] > h + 0.5)
        if out.any():
            i = int(np.argmax(out))
            raise ValueError(
                f"box {i} {b[i].tolist()} lies outside the {w}x{h} (WxH) image; boxes are "
                "absolute xyxy pixels of the original image (clip them, or pass clip_boxes=True)"
            )
    bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"box {i} {b[i].tolist()} is degenerate (need x2 > x1 and y2 > y1)")
    return b.astype(np.float32)


def bucket_size(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= max(n, minimum): the padded box count (few compiled shapes)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def pad_boxes(boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads [R, 4] to [size, 4] with zero boxes; returns (boxes, bool mask [size])."""
    out = np.zeros((size, 4), np.float32)
    out[: len(boxes)] = boxes
    mask = np.zeros(size, bool)
    mask[: len(boxes)] = True
    return out, mask
