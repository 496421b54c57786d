"""Per-example NumPy transforms of the pretraining pipeline (pure functions, no grain).

Images are uint8/float32 NHWC or HWC RGB; boxes are absolute xyxy float32 [N, 4] in the pixel
frame of the image they belong to (pixel (i, j) covers [j, j+1) x [i, i+1)).

Resize follows RegionCLIP's pretraining augmentation (spec §4.1: `Resize(800, max_size=1333)`
with bicubic interpolation, a copy of torchvision's `Resize`): the shorter side becomes
`min_size` and the longer side `int(min_size * long / short)`; if that exceeds `max_size` the
longer side becomes `max_size` and the shorter `int(max_size * short_new / long_new)` (both
truncated, as torchvision does). Pixels are resampled by PIL's bicubic filter, which is what
torchvision uses on PIL images, so images equal the original's bit for bit before normalisation.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from regionclip_jax.models.normalize import CLIP_MEAN, CLIP_STD


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8[H, W, 3] RGB (grey, palette and alpha images converted)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def resized_size(
    height: int, width: int, min_size: int, max_size: int | None = None
) -> tuple[int, int]:
    """(new_h, new_w) by the shortest-edge rule with a cap on the longest edge (torchvision).

    Unlike torchvision, `max_size == min_size` is allowed (it fits the longer side to the cap).
    """
    if max_size is not None and max_size < min_size:
        raise ValueError(f"max_size ({max_size}) must be >= min_size ({min_size})")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = min_size, int(min_size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return max(new_h, 1), max(new_w, 1)


def fit_to_canvas(
    height: int, width: int, new_h: int, new_w: int, canvas: tuple[int, int]
) -> tuple[int, int]:
    """Shrinks (new_h, new_w) to fit `canvas` (Hc, Wc), keeping the aspect ratio of the input.

    Only changes anything when the canvas is smaller than the resize rule's output (e.g. a
    1333 x 800 image on an 800 x 1344 landscape canvas); `make_pretrain_dataset` documents this.
    """
    hc, wc = canvas
    if new_h <= hc and new_w <= wc:
        return new_h, new_w
    s = min(hc / height, wc / width)
    return max(1, min(hc, math.floor(height * s))), max(1, min(wc, math.floor(width * s)))


def resize_image(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[new_h, new_w, 3], PIL bicubic (identity when the size is equal)."""
    if image.shape[:2] == (new_h, new_w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))


def scale_boxes(boxes: np.ndarray, scale_y: float, scale_x: float) -> np.ndarray:
    """boxes float32[N, 4] xyxy scaled by (scale_x, scale_y) (the resize's new/old size ratios)."""
    return (boxes * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)).astype(np.float32)


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirrors xyxy boxes [N, 4] in an image `width` pixels wide: x -> width - x."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([width - x2, y1, width - x1, y2], axis=1).astype(np.float32)


def pad_image(image: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """Zero-pads [h, w, C] at the bottom/right to [Hc, Wc, C]."""
    h, w = image.shape[:2]
    hc, wc = canvas
    if h > hc or w > wc:
        raise ValueError(f"image {h}x{w} does not fit the canvas {hc}x{wc}")
    out = np.zeros((hc, wc, image.shape[2]), image.dtype)
    out[:h, :w] = image
    return out


def pad_rows(x: np.ndarray, n: int, fill) -> np.ndarray:
    """Pads (or truncates) axis 0 of `x` to `n` rows with `fill`."""
    out = np.full((n, *x.shape[1:]), fill, x.dtype)
    k = min(n, len(x))
    out[:k] = x[:k]
    return out


def normalize_image(image: np.ndarray) -> np.ndarray:
    """CLIP normalisation of RGB pixel values in [0, 255]: (x / 255 - mean) / std, float32."""
    return ((image.astype(np.float32) / np.float32(255.0)) - CLIP_MEAN) / CLIP_STD


def normalize_padded(images: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
    """Normalises uint8[B, Hc, Wc, 3] canvases and keeps the padding at exactly 0.

    Equivalent to normalising each image and then zero-padding it (as the original pads after
    normalisation), but lets the pipeline carry 1-byte pixels until the batch is built.

    Args:
      images: uint8[B, Hc, Wc, 3], image i valid in [:h_i, :w_i].
      image_hw: int32[B, 2] valid (h, w) per image.

    Returns:
      float32[B, Hc, Wc, 3].
    """
    out = normalize_image(images)
    hc, wc = images.shape[1:3]
    valid = (np.arange(hc)[None, :, None] < image_hw[:, 0, None, None]) & (
        np.arange(wc)[None, None, :] < image_hw[:, 1, None, None]
    )
    return np.where(valid[..., None], out, np.float32(0.0))


def mask_shape(canvas: tuple[int, int], mask_scale: float) -> tuple[int, int]:
    """(Hm, Wm) = (ceil(Hc * mask_scale), ceil(Wc * mask_scale)) of the instance-mask canvas."""
    # The epsilon keeps e.g. 100 * 0.07 = 7.000000000000001 at 7, not 8.
    return tuple(max(1, math.ceil(c * mask_scale - 1e-9)) for c in canvas)


def mask_sample_indices(
    height: int,
    width: int,
    new_h: int,
    new_w: int,
    mask_scale: float,
    mask_hw: tuple[int, int],
    flip: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Source pixels of a mask resized with its image, flipped, and sampled at `mask_scale`.

    Nearest-neighbour point sampling: mask pixel (i, j) of the [Hm, Wm] mask canvas covers canvas
    pixels [j / s, (j + 1) / s) x [i / s, (i + 1) / s) (s = mask_scale); its centre
    ((j + 0.5) / s, (i + 0.5) / s) lies in the resized (and maybe mirrored) image when it is
    inside [0, new_w) x [0, new_h), and maps back to the stored image pixel
    (floor(y * height / new_h), floor(x' * width / new_w)) with x' = new_w - x when flipped (the
    inverse of `scale_boxes` / `hflip_boxes`). So a mask's extent follows its box: a box b in
    canvas pixels covers b * s in the mask canvas, to within a pixel.

    Args:
      height, width: the stored image (and its masks).
      new_h, new_w: the resized image in the canvas.
      mask_scale: s, mask-canvas pixels per canvas pixel.
      mask_hw: (Hm, Wm), `mask_shape(canvas, s)`.
      flip: whether the image was mirrored.

    Returns:
      (rows int64[nr], cols int64[nc]): mask[:nr, :nc] = stored_mask[rows][:, cols]; mask pixels
      beyond them lie outside the resized image (padding, zero).
    """
    yc = (np.arange(mask_hw[0]) + 0.5) / mask_scale
    xc = (np.arange(mask_hw[1]) + 0.5) / mask_scale
    yc, xc = yc[yc < new_h], xc[xc < new_w]
    if flip:
        xc = new_w - xc
    rows = np.clip(np.floor(yc * (height / new_h)).astype(np.int64), 0, height - 1)
    cols = np.clip(np.floor(xc * (width / new_w)).astype(np.int64), 0, width - 1)
    return rows, cols
