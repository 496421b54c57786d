"""Instance masks at inference: detectron2's `paste_masks_in_image`, RLE encoding, mask IoU.

A Mask R-CNN head predicts, per detection, an M x M probability map over the detection's box
(`models.detector.MaskHead`, sigmoid of its logits). detectron2 (`layers/mask_ops.py`) places it
into the image at the box, rescaled to the original image (`detector_postprocess`):

    for every image pixel (row r, column c), with centre (c + 0.5, r + 0.5):
      gx = (c + 0.5 - x0) / (x1 - x0) * 2 - 1,   gy = (r + 0.5 - y0) / (y1 - y0) * 2 - 1
      value = F.grid_sample(mask[None, None], (gx, gy), bilinear, zeros padding,
                            align_corners=False)
            = bilinear interpolation of the mask at (ix, iy) = ((gx + 1) * M - 1) / 2, ...,
              neighbours outside the M x M grid counting as 0
      pasted = value >= threshold (0.5)

all in float32. On CPU detectron2 evaluates only the pixels of the box grown by one pixel
(`skip_empty`); outside it the interpolated value is below 0.5 (its only non-zero neighbour weight
is < 0.5), so the thresholded result is the same as evaluating the whole image. Here the same
region is evaluated, with the bilinear interpolation written as two small interpolation matrices
(`Wy [h, M] @ mask @ Wx[w, M]^T`): separable, so it costs O(box area x M), not O(H x W).

Memory: `paste_masks_rle` encodes one detection at a time from a single reused H x W buffer, so
a whole evaluation set never holds more than one full-size mask (`paste_masks_in_image`, which
returns the `[N, H, W]` bitmaps, is for pictures and tests).

This lives in `eval` (host NumPy + pycocotools, like the COCO/LVIS evaluators that consume its RLE)
rather than `ops` (device JAX ops): pasting runs after the detections leave the device, at the
original image size, which differs per image and would recompile a jitted function per size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def _interp_matrix(lo: float, hi: float, start: int, stop: int, m: int) -> np.ndarray:
    """Bilinear weights `[stop - start, M]` of pixels start..stop-1 along one axis (float32).

    Mirrors `grid_sample(align_corners=False, padding_mode="zeros")` arithmetic in float32.
    """
    f32 = np.float32
    pix = np.arange(start, stop, dtype=f32) + f32(0.5)
    g = (pix - f32(lo)) / (f32(hi) - f32(lo)) * f32(2) - f32(1)
    coord = ((g + f32(1)) * f32(m) - f32(1)) / f32(2)
    i0 = np.floor(coord)
    w1 = coord - i0  # weight of i0 + 1 (torch: ix - ix_nw)
    w0 = (i0 + f32(1)) - coord  # weight of i0 (torch: ix_se - ix)
    out = np.zeros((stop - start, m), f32)
    rows = np.arange(stop - start)
    i0 = i0.astype(np.int64)
    for idx, wt in ((i0, w0), (i0 + 1, w1)):
        ok = (idx >= 0) & (idx < m)
        out[rows[ok], idx[ok]] += wt[ok]
    return out


def paste_region(
    mask: np.ndarray, box: Sequence[float], image_hw: tuple[int, int]
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Interpolated probabilities of one M x M map over its box region (module docstring).

    Args:
      mask: float `[M, M]` probabilities (rows = y).
      box: xyxy in the target image's pixels.
      image_hw: (H, W) of the target image.

    Returns:
      (float32 `[h, w]` values, (row slice, column slice)) of the region the mask can cover: the
      box grown by one pixel, clipped to the image (detectron2's `skip_empty` region). Empty
      (0 x 0) for a box of zero width or height or one outside the image.
    """
    h_img, w_img = int(image_hw[0]), int(image_hw[1])
    mask = np.asarray(mask, np.float32)
    m = mask.shape[-1]
    if mask.shape != (m, m):
        raise ValueError(f"mask must be square [M, M], got {mask.shape}")
    x0, y0, x1, y1 = (float(np.float32(v)) for v in box)
    empty = np.zeros((0, 0), np.float32), (slice(0, 0), slice(0, 0))
    if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
        return empty
    xs = max(int(np.floor(x0)) - 1, 0)
    ys = max(int(np.floor(y0)) - 1, 0)
    xe = min(int(np.ceil(x1)) + 1, w_img)
    ye = min(int(np.ceil(y1)) + 1, h_img)
    if xe <= xs or ye <= ys:
        return empty
    wy = _interp_matrix(y0, y1, ys, ye, m)
    wx = _interp_matrix(x0, x1, xs, xe, m)
    return (wy @ mask @ wx.T).astype(np.float32), (slice(ys, ye), slice(xs, xe))


def _check(masks: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"masks must be [N, M, M] with N = {boxes.shape[0]}, got {masks.shape}")
    return masks, boxes


def paste_masks_in_image(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
    """detectron2 `paste_masks_in_image`: bool `[N, H, W]` (value >= threshold).

    Args:
      masks: float `[N, M, M]` mask probabilities (sigmoid of the mask head's logits).
      boxes: float `[N, 4]` xyxy boxes in the target image's pixels (the detections' boxes
        rescaled to the original image).
      image_hw: (H, W).
      threshold: 0.5.
    """
    masks, boxes = _check(masks, boxes)
    h, w = int(image_hw[0]), int(image_hw[1])
    out = np.zeros((masks.shape[0], h, w), bool)
    for i in range(masks.shape[0]):
        vals, (rs, cs) = paste_region(masks[i], boxes[i], (h, w))
        out[i, rs, cs] = vals >= threshold
    return out


def paste_masks_rle(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5
) -> list[dict[str, Any]]:
    """`paste_masks_in_image`, each mask encoded as compressed COCO RLE, one full mask at a time.

    Returns:
      N dicts `{"size": [H, W], "counts": str}` (the COCO results `segmentation` format;
      `counts` decoded to str so the dict is JSON-serialisable; pycocotools accepts it as is).
    """
    masks, boxes = _check(masks, boxes)
    h, w = int(image_hw[0]), int(image_hw[1])
    buf = np.zeros((h, w), np.uint8, order="F")
    out = []
    for i in range(masks.shape[0]):
        vals, (rs, cs) = paste_region(masks[i], boxes[i], (h, w))
        buf[rs, cs] = vals >= threshold
        out.append(_as_json_rle(mask_utils.encode(buf)))
        buf[rs, cs] = 0
    return out


def _as_json_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode_masks(bitmaps: np.ndarray) -> list[dict[str, Any]]:
    """bool/uint8 `[N, H, W]` -> N compressed RLE dicts (str counts), pycocotools `mask.encode`."""
    bitmaps = np.asarray(bitmaps)
    return [
        _as_json_rle(r)
        for r in mask_utils.encode(np.asfortranarray(bitmaps.transpose(1, 2, 0).astype(np.uint8)))
    ]


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A compressed RLE dict (str or bytes counts) -> bool `[H, W]`."""
    return mask_utils.decode(rle).astype(bool)


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO/LVIS `segmentation` (polygons, uncompressed or compressed RLE) -> compressed RLE.

    pycocotools `COCO.annToRLE` / lvis-api `LVIS.ann_to_rle`: polygons are rasterised and merged.
    """
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def mask_iou(dt: Sequence[dict[str, Any]], gt: Sequence[dict[str, Any]]) -> np.ndarray:
    """float64 IoU `[D, G]` of RLE masks (pycocotools `mask.iou`, no crowd)."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    ious = mask_utils.iou(list(dt), list(gt), [0] * len(gt))
    return np.asarray(ious, np.float64).reshape(len(dt), len(gt))
