"""Detection post-processing: RegionCLIP's `fast_rcnn_inference_single_image`, batched, static shapes
(spec §6.1 steps 4-7, §10).

Per image, from class probabilities `p [R, K + 1]` (background last) and class-agnostic boxes
`[R, 4]` of R proposals:
  4. RPN-score fusion (optional, `MULTIPLY_RPN_SCORE`): s_ik = (p_ik · o_i) ** 0.5 with o_i the
     RAW objectness logit. A negative logit gives NaN, and the original's `isfinite` row filter
     (over all K + 1 columns and the box) then drops the proposal; logits above 1 can give
     scores above 1. Both are reproduced exactly.
  5. Drop the background column; keep the (i, k) pairs with s_ik > score_thresh.
  6. Class-aware greedy NMS (`batched_nms`, IoU > nms_thresh suppresses), or class-wise Gaussian
     soft-NMS (decay exp(-IoU² / sigma), prune scores <= soft_nms_prune; the decayed scores
     replace the scores).
  7. Keep the `topk` best (COCO 100, LVIS 300); `rescale_to_original` then maps the boxes back
     to the stored image (detectron2 `detector_postprocess`).

Static-shape approximation (the only one): the original runs NMS over every (i, k) pair above the
threshold (up to R·K = 1000 x 1203); we keep the `max_candidates` highest-scoring pairs first.
This is exact whenever at most `max_candidates` pairs pass the threshold. Otherwise the
outputs still equal the original's up to the first one whose (soft-NMS: decayed) score is not
above the best dropped candidate's score s_drop: greedy NMS and soft-NMS only let a candidate
act on lower-scored ones, so candidates scored <= s_drop cannot change picks made above s_drop.

Classes are separated by masking cross-class IoUs to 0 (`ops.nms`), which equals the original's
coordinate offsets except for the offsets' float rounding.

`detections_numpy` is the same selection for one image on the host (NumPy, exact, nothing to
compile): the zero-shot recognizer's post-processing (`inference.recognizer`), whose inputs
(one image, a vocabulary of any size, user thresholds) would otherwise compile a program per
setting. Its docstring lists the corner cases where the two differ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from regionclip_jax.ops.boxes import clip_boxes
from regionclip_jax.ops.nms import batched_nms
from regionclip_jax.ops.nms import soft_nms as _soft_nms


@functools.partial(
    jax.jit,
    static_argnames=(
        "score_thresh",
        "nms_thresh",
        "soft_nms",
        "soft_nms_sigma",
        "soft_nms_prune",
        "topk",
        "max_candidates",
        "tile_size",
    ),
)
def detections_from_scores(
    probs: jax.Array,
    boxes: jax.Array,
    valid: jax.Array,
    image_hw: jax.Array,
    *,
    objectness: jax.Array | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    soft_nms: bool = False,
    soft_nms_sigma: float = 0.5,
    soft_nms_prune: float = 0.001,
    topk: int = 100,
    max_candidates: int = 2000,
    tile_size: int = 256,
) -> dict[str, jax.Array]:
    """Final detections of a batch (module docstring).

    Args:
      probs: `[B, R, K + 1]` softmax probabilities, background last.
      boxes: `[B, R, 4]` class-agnostic xyxy boxes (clipped to `image_hw` here again).
      valid: bool `[B, R]` real proposals.
      image_hw: `[B, 2]` true (h, w) of the (resized) input images.
      objectness: optional `[B, R]` raw RPN logits for the sqrt fusion (None: no fusion).
      score_thresh: keep s > score_thresh (COCO 0.001, LVIS 0.02).
      nms_thresh: IoU threshold of hard NMS (0.5); unused by the Gaussian soft-NMS.
      soft_nms: Gaussian soft-NMS instead of hard NMS (the OVD test scripts).
      soft_nms_sigma, soft_nms_prune: 0.5 and 0.001 (detectron2 defaults).
      topk: detections per image (static).
      max_candidates: (proposal, class) pairs kept before NMS (static).
      tile_size: hard-NMS tile (`ops.nms`).

    Returns:
      dict with `boxes [B, topk, 4]` float32 xyxy, `scores [B, topk]` float32, `classes
      [B, topk]` int32 (0-based index into the class embeddings; -1 in padding), `valid
      [B, topk]` bool; detections by decreasing score, padding (zeros) last.
    """
    num_classes = probs.shape[-1] - 1
    num_cand = min(int(max_candidates), probs.shape[1] * num_classes)

    def one(p, bx, ok, hw, o):
        s = p.astype(jnp.float32)
        if o is not None:
            s = jnp.sqrt(s * o.astype(jnp.float32)[:, None])
        bx = bx.astype(jnp.float32)
        row_ok = ok & jnp.all(jnp.isfinite(s), axis=-1) & jnp.all(jnp.isfinite(bx), axis=-1)
        bx = clip_boxes(bx, hw)
        s = s[:, :-1]
        keep = row_ok[:, None] & (s > score_thresh)
        flat = jnp.where(keep, s, -jnp.inf).reshape(-1)
        cand_s, cand_i = jax.lax.top_k(flat, num_cand)
        cand_ok = cand_s > -jnp.inf
        cand_cls = (cand_i % num_classes).astype(jnp.int32)
        cand_boxes = bx[cand_i // num_classes]
        if soft_nms:
            idx, out_s, out_ok = _soft_nms(
                cand_boxes,
                cand_s,
                cand_cls,
                soft_nms_sigma,
                soft_nms_prune,
                topk,
                valid=cand_ok,
            )
        else:
            idx, out_ok = batched_nms(
                cand_boxes,
                cand_s,
                cand_cls,
                nms_thresh,
                topk,
                valid=cand_ok,
                tile_size=tile_size,
            )
            out_s = cand_s[jnp.maximum(idx, 0)]
        safe = jnp.maximum(idx, 0)
        return dict(
            boxes=jnp.where(out_ok[:, None], cand_boxes[safe], 0.0),
            scores=jnp.where(out_ok, out_s, 0.0),
            classes=jnp.where(out_ok, cand_cls[safe], -1),
            valid=out_ok,
        )

    image_hw = jnp.asarray(image_hw)
    if objectness is None:
        return jax.vmap(lambda p, b, v, hw: one(p, b, v, hw, None))(probs, boxes, valid, image_hw)
    return jax.vmap(one)(probs, boxes, valid, image_hw, objectness)


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on the host (torchvision semantics: suppress IoU > threshold, IoU in float64),
    indices by descending score (ties: lower index first).

    Args:
      boxes: float `[N, 4]` xyxy; scores: float `[N]`.

    Returns:
      int64 `[M]` indices of the kept boxes.
    """
    order = np.argsort(-scores, kind="stable")
    b = boxes.astype(np.float64)
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def detections_numpy(
    probs: np.ndarray,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    *,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections on the host, exact: the zero-shot recognizer's post-processing
    (steps 5-7 without fusion; no candidate cap, no compilation per shape or setting).

    Clip the boxes to the image, keep the (box, class) pairs with probability > score_thresh,
    per-class greedy NMS (`nms_numpy`), the `max_detections` best. The same selection as
    `detections_from_scores` with every pair a candidate, except in three corner cases: IoU is
    computed in float64 here (float32 there), so an IoU within rounding of `nms_thresh` may
    differ; equal scores of different classes are ordered by (class, box) here, by (box, class)
    there, which matters only at the `max_detections` cut; two zero-area boxes (IoU 0/0) suppress
    each other here and not there.

    Args:
      probs: float `[R, K]` class probabilities, background column already dropped.
      boxes: float `[R, 4]` xyxy; image_hw: (H, W) of the image the boxes are in.
      score_thresh, nms_thresh, max_detections: as `detections_from_scores`'s `score_thresh`,
        `nms_thresh`, `topk`.

    Returns:
      (boxes float32 `[N, 4]`, scores float32 `[N]`, labels int32 `[N]`), scores descending,
      N <= max_detections.
    """
    h, w = image_hw
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    r_idx, k_idx = np.nonzero(probs > score_thresh)
    scores = probs[r_idx, k_idx]
    keep_all = []
    for k in np.unique(k_idx):
        sel = np.nonzero(k_idx == k)[0]
        keep_all.append(sel[nms_numpy(boxes[r_idx[sel]], scores[sel], nms_thresh)])
    keep = np.concatenate(keep_all) if keep_all else np.zeros(0, np.int64)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_detections]
    return boxes[r_idx[keep]], scores[keep].astype(np.float32), k_idx[keep].astype(np.int32)


def rescale_to_original(boxes: jax.Array, scale: jax.Array, orig_hw: jax.Array) -> jax.Array:
    """Boxes of the resized input back on the stored image (detectron2 `detector_postprocess`).

    Divides x by the width scale and y by the height scale, then clips to the original size.
    detectron2 then also drops boxes that became empty (`nonempty()`); callers that want that
    AND their validity mask with `ops.nonempty(result)`.

    Args:
      boxes: `[B, N, 4]` xyxy in resized-input pixels.
      scale: `[B, 2]` (new_h / height, new_w / width) of the resize.
      orig_hw: `[B, 2]` (height, width) of the stored images.

    Returns:
      float32 `[B, N, 4]` xyxy in original-image pixels.
    """
    scale = jnp.asarray(scale, jnp.float32)
    sxy = jnp.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], axis=-1)[:, None]
    return clip_boxes(jnp.asarray(boxes, jnp.float32) / sxy, jnp.asarray(orig_hw, jnp.float32))
