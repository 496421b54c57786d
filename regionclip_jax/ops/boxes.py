"""Box utilities: areas, pairwise IoU, clipping, format conversion, detectron2's box coding.

Boxes are absolute pixel coordinates; `xyxy` = (x1, y1, x2, y2) unless a name says otherwise.
All functions broadcast over leading dimensions and are jit/vmap-safe.

Rounding note: XLA fuses `a * b + c` into a fused multiply-add, which rounds differently from
PyTorch's separate multiply and add. Where an IoU is compared with a threshold (NMS, matching),
we add a data-dependent zero (`x * 0`) to products so they are rounded on their own, like
torchvision/detectron2, and borderline boxes are decided the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# detectron2 `_DEFAULT_SCALE_CLAMP`: exp(dw) never exceeds 1000/16 (a 1000-px box from a 16-px one).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _rounded_product(a, b):
    """`a * b` rounded to the dtype before any following addition (no FMA contraction)."""
    return a * b + a * 0.0


def box_area(boxes: jax.Array) -> jax.Array:
    """`[..., 4]` xyxy -> `[...]` area `(x2 - x1) * (y2 - y1)` (negative for inverted boxes, as in
    torchvision/detectron2)."""
    return _rounded_product(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """`[..., N, 4]`, `[..., M, 4]` xyxy -> `[..., N, M]` intersection areas (>= 0)."""
    b1 = boxes1[..., :, None, :]
    b2 = boxes2[..., None, :, :]
    w = jnp.maximum(jnp.minimum(b1[..., 2], b2[..., 2]) - jnp.maximum(b1[..., 0], b2[..., 0]), 0.0)
    h = jnp.maximum(jnp.minimum(b1[..., 3], b2[..., 3]) - jnp.maximum(b1[..., 1], b2[..., 1]), 0.0)
    return _rounded_product(w, h)


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """IoU of every pair, detectron2 `pairwise_iou` semantics.

    Args:
      boxes1: `[..., N, 4]` xyxy.
      boxes2: `[..., M, 4]` xyxy.

    Returns:
      `[..., N, M]` float: `inter / (area1 + area2 - inter)` where `inter > 0`, else 0 (so empty
      or disjoint boxes give 0, never NaN; torchvision's `box_iou` gives NaN for two empty boxes).
    """
    inter = pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return jnp.where(inter > 0, inter / jnp.where(inter > 0, union, 1.0), 0.0)


def clip_boxes(boxes: jax.Array, image_hw) -> jax.Array:
    """Clamp xyxy boxes to `[0, w] x [0, h]` (detectron2 `Boxes.clip`).

    Args:
      boxes: `[..., R, 4]` xyxy.
      image_hw: `(h, w)` or an array `[..., 2]` of per-image `(h, w)` (true sizes, not the padded
        canvas), broadcast against the boxes' leading dimensions.

    Returns:
      `[..., R, 4]` clipped boxes.
    """
    hw = jnp.asarray(image_hw, boxes.dtype)
    h = hw[..., 0, None]
    w = hw[..., 1, None]
    x1 = jnp.clip(boxes[..., 0], 0.0, w)
    y1 = jnp.clip(boxes[..., 1], 0.0, h)
    x2 = jnp.clip(boxes[..., 2], 0.0, w)
    y2 = jnp.clip(boxes[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonempty(boxes: jax.Array, threshold: float = 0.0) -> jax.Array:
    """`[..., 4]` xyxy -> `[...]` bool: width > threshold and height > threshold (detectron2)."""
    return ((boxes[..., 2] - boxes[..., 0]) > threshold) & (
        (boxes[..., 3] - boxes[..., 1]) > threshold
    )


def xyxy_to_xywh(boxes: jax.Array) -> jax.Array:
    """(x1, y1, x2, y2) -> (x1, y1, w, h) (COCO format)."""
    return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(x1, y1, w, h) -> (x1, y1, x2, y2)."""
    return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return jnp.concatenate([boxes[..., :2] + 0.5 * wh, wh], axis=-1)


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    half = 0.5 * boxes[..., 2:]
    return jnp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


class Box2BoxTransform:
    """detectron2 `Box2BoxTransform`: (dx, dy, dw, dh) deltas between xyxy boxes.

    get_deltas: dx = wx * (tcx - scx) / sw, dy = wy * (tcy - scy) / sh, dw = ww * log(tw / sw),
    dh = wh * log(th / sh), with centres `x1 + 0.5 * w`. apply_deltas inverts it after clamping
    dw, dh at `scale_clamp` (default log(1000 / 16)).

    Attributes:
      weights: `(wx, wy, ww, wh)`, e.g. (10, 10, 5, 5) for Fast R-CNN heads, (1, 1, 1, 1) for RPN.
      scale_clamp: upper clamp on dw, dh before exp.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"want 4 weights, got {weights}")
        self.weights = tuple(float(x) for x in weights)
        self.scale_clamp = float(scale_clamp)

    def get_deltas(self, src_boxes: jax.Array, target_boxes: jax.Array) -> jax.Array:
        """`[..., 4]` xyxy sources and targets (positive sizes) -> `[..., 4]` deltas."""
        wx, wy, ww, wh = self.weights
        src_w = src_boxes[..., 2] - src_boxes[..., 0]
        src_h = src_boxes[..., 3] - src_boxes[..., 1]
        src_cx = src_boxes[..., 0] + 0.5 * src_w
        src_cy = src_boxes[..., 1] + 0.5 * src_h
        tgt_w = target_boxes[..., 2] - target_boxes[..., 0]
        tgt_h = target_boxes[..., 3] - target_boxes[..., 1]
        tgt_cx = target_boxes[..., 0] + 0.5 * tgt_w
        tgt_cy = target_boxes[..., 1] + 0.5 * tgt_h
        dx = wx * (tgt_cx - src_cx) / src_w
        dy = wy * (tgt_cy - src_cy) / src_h
        dw = ww * jnp.log(tgt_w / src_w)
        dh = wh * jnp.log(tgt_h / src_h)
        return jnp.stack([dx, dy, dw, dh], axis=-1)

    def apply_deltas(self, deltas: jax.Array, boxes: jax.Array) -> jax.Array:
        """Decode deltas onto boxes.

        Args:
          deltas: `[..., K * 4]` (K = 1 class-agnostic, or one set per class).
          boxes: `[..., 4]` xyxy reference boxes (leading dims broadcast with `deltas`).

        Returns:
          `[..., K * 4]` xyxy boxes, in `deltas.dtype`.
        """
        boxes = boxes.astype(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (boxes[..., 2] - boxes[..., 0])[..., None]
        heights = (boxes[..., 3] - boxes[..., 1])[..., None]
        ctr_x = boxes[..., 0, None] + 0.5 * widths
        ctr_y = boxes[..., 1, None] + 0.5 * heights
        dx = deltas[..., 0::4] / wx
        dy = deltas[..., 1::4] / wy
        dw = jnp.minimum(deltas[..., 2::4] / ww, self.scale_clamp)
        dh = jnp.minimum(deltas[..., 3::4] / wh, self.scale_clamp)
        pred_cx = dx * widths + ctr_x
        pred_cy = dy * heights + ctr_y
        pred_w = jnp.exp(dw) * widths
        pred_h = jnp.exp(dh) * heights
        out = jnp.stack(
            [
                pred_cx - 0.5 * pred_w,
                pred_cy - 0.5 * pred_h,
                pred_cx + 0.5 * pred_w,
                pred_cy + 0.5 * pred_h,
            ],
            axis=-1,
        )
        return out.reshape(deltas.shape)
