"""Drawing detections / region labels on an image (PIL), saved as PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from regionclip_jax.eval.masks import decode_rle

# Distinct, readable colours (Tableau 10), cycled by class index.
_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float] | None = None,
    *,
    class_ids: Sequence[int] | None = None,
    out: str | os.PathLike | None = None,
    width: int | None = None,
    masks: Sequence | np.ndarray | None = None,
    mask_alpha: float = 0.45,
):
    """Draws boxes with "label score" captions (and instance masks, semi-transparent).

    Args:
      image: uint8 `[H, W, 3]` RGB (original image).
      boxes: `[N, 4]` xyxy in the image's pixels.
      labels: N caption labels; scores: N scores (shown with 2 decimals) or None.
      class_ids: N ints choosing the colour (default: by label).
      out: if given, the PNG path to write.
      width: line width (default scales with the image size).
      masks: N instance masks drawn under the boxes in the box colour at `mask_alpha`
        opacity: compressed COCO RLE dicts (`Detections.masks`) or bool `[N, H, W]`.

    Returns:
      the `PIL.Image.Image`.
    """
    if class_ids is None:
        order = {n: i for i, n in enumerate(dict.fromkeys(labels))}
        class_ids = [order[n] for n in labels]
    rgb = np.asarray(image, np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if masks is not None and len(masks):
        rgb = _blend_masks(rgb[..., :3], masks, class_ids, mask_alpha)
    im = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(im)
    width = width or max(1, round(max(im.size) / 400))
    font = ImageFont.load_default()
    for i, box in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        colour = _COLOURS[int(class_ids[i]) % len(_COLOURS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = labels[i] if scores is None else f"{labels[i]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 2, ty), text, fill=(255, 255, 255), font=font)
    if out is not None:
        im.save(os.fspath(out), format="PNG")
    return im


def _blend_masks(
    rgb: np.ndarray, masks: Sequence | np.ndarray, class_ids: Sequence[int], alpha: float
) -> np.ndarray:
    """`rgb` with each mask painted in its class colour at opacity `alpha` (later masks on top)."""
    out = rgb.astype(np.float32)
    for i, m in enumerate(masks):
        if isinstance(m, dict):
            m = decode_rle(m)
        m = np.asarray(m, bool)
        if m.shape != rgb.shape[:2]:
            raise ValueError(f"mask {i} has shape {m.shape}, the image {rgb.shape[:2]}")
        colour = np.asarray(_COLOURS[int(class_ids[i]) % len(_COLOURS)], np.float32)
        out[m] = (1.0 - alpha) * out[m] + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_detections(image: np.ndarray, detections, *, out=None):
    """`draw_boxes` for a `recognizer.Detections` (with its masks, if it has any)."""
    labels = [detections.names[int(k)] for k in detections.labels]
    return draw_boxes(
        image,
        detections.boxes,
        labels,
        detections.scores,
        class_ids=[int(k) for k in detections.labels],
        out=out,
        masks=getattr(detections, "masks", None),
    )
