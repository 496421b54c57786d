"""Non-maximum suppression with static shapes: hard (torchvision), class-aware, Gaussian soft-NMS
(detectron2), and detectron2's RPN proposal selection.

Outputs are fixed-size: `max_output_size` slots of indices into the input, in selection order,
plus a validity mask; unused slots hold index -1. Entries with NaN or -inf scores, or masked out
by `valid`, are never selected.

Hard NMS is blocked: boxes are sorted by score and visited in tiles of `tile_size`; a tile is
first suppressed by the boxes kept in earlier tiles (one `[T, T]` IoU block per earlier tile),
then resolved internally by iterating "j survives iff no surviving earlier box of the tile
overlaps it" to its fixed point. The fixed point of that triangular system is unique and equals
the sequential greedy result (by induction along the score order), so the output is exactly
torchvision's. Memory is `O(T^2)`, never `N x N`; the loop stops as soon as `max_output_size`
boxes are kept.

Class-aware NMS masks the IoU of boxes of different classes to 0. torchvision's `batched_nms`
and detectron2's `batched_soft_nms` instead shift each class's boxes by `class * (max_coord + 1)`;
the two are the same computation except that the shift rounds coordinates (e.g. to 1/8 px for
class 1,202 at 1,333 px in fp32), which ours does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from regionclip_jax.ops import boxes as box_ops


def _selectable(scores, valid):
    ok = ~jnp.isnan(scores) & (scores > -jnp.inf)
    if valid is not None:
        ok = ok & valid
    return ok


def _suppression_iou(a, b):
    """torchvision's NMS overlap `inter / (area_a + area_b - inter)`: `[T, 4]`, `[S, 4]` -> `[T, S]`.

    No `inter > 0` guard (unlike `pairwise_iou`): two empty boxes give NaN, which compares False
    against the threshold exactly as in torchvision's kernel.
    """
    inter = box_ops.pairwise_intersection(a, b)
    return inter / (box_ops.box_area(a)[:, None] + box_ops.box_area(b)[None, :] - inter)


def nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: float,
    max_output_size: int,
    *,
    classes: jax.Array | None = None,
    valid: jax.Array | None = None,
    tile_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Greedy hard NMS, torchvision `nms` semantics, padded output.

    Boxes are visited by decreasing score (ties: lower index first, a stable sort); a box is
    kept unless a kept box has IoU > `iou_threshold` with it.

    Args:
      boxes: `[N, 4]` xyxy.
      scores: `[N]` float.
      iou_threshold: suppress when IoU is strictly greater.
      max_output_size: static number of output slots.
      classes: optional `[N]` int class ids; boxes of different classes never suppress each other.
      valid: optional `[N]` bool; False entries are ignored.
      tile_size: boxes per tile (static).

    Returns:
      indices: `[max_output_size]` int32 indices into `boxes`, by decreasing score; -1 padding.
      valid: `[max_output_size]` bool.
    """
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    n = boxes.shape[0]
    t = int(max(1, min(tile_size, n)))
    n_tiles = -(-n // t)
    pad = n_tiles * t - n
    ok = _selectable(scores, valid)
    key = jnp.where(ok, scores, -jnp.inf)
    order = jnp.argsort(-key, stable=True).astype(jnp.int32)
    sboxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    sok = jnp.pad(ok[order], (0, pad))
    if classes is not None:
        scls = jnp.pad(jnp.asarray(classes)[order], (0, pad))
    else:
        scls = jnp.zeros((n_tiles * t,), jnp.int32)
    upper = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # i before j within a tile

    def tile(x, i):
        return jax.lax.dynamic_slice_in_dim(x, i * t, t)

    def overlaps(bi, ci, bj, cj):
        """`[T, T]` bool: box a of tile i overlaps box b of tile j (same class, IoU > thr)."""
        return (_suppression_iou(bi, bj) > iou_threshold) & (ci[:, None] == cj[None, :])

    def visit(state):
        i, keep, n_kept = state
        bi, ci = tile(sboxes, i), tile(scls, i)

        # Suppression by boxes kept in earlier tiles.
        def by_earlier(j, alive):
            hit = overlaps(tile(sboxes, j), tile(scls, j), bi, ci) & tile(keep, j)[:, None]
            return alive & ~hit.any(axis=0)

        cand = jax.lax.fori_loop(0, i, by_earlier, tile(sok, i))
        within = overlaps(bi, ci, bi, ci) & upper

        def not_done(s):
            return s[1]

        def relax(s):
            k, _ = s
            new = cand & ~(within & k[:, None]).any(axis=0)
            return new, (new != k).any()

        k, _ = jax.lax.while_loop(not_done, relax, (cand, jnp.array(True)))
        keep = jax.lax.dynamic_update_slice_in_dim(keep, k, i * t, axis=0)
        return i + 1, keep, n_kept + k.sum(dtype=jnp.int32)

    def more(state):
        i, _, n_kept = state
        return (i < n_tiles) & (n_kept < max_output_size)

    keep0 = jnp.zeros((n_tiles * t,), bool)
    _, keep, n_kept = jax.lax.while_loop(more, visit, (jnp.int32(0), keep0, jnp.int32(0)))
    (pos,) = jnp.nonzero(keep, size=max_output_size, fill_value=0)
    out_valid = jnp.arange(max_output_size) < n_kept
    indices = jnp.where(out_valid, order[jnp.minimum(pos, n - 1)], -1)
    return indices.astype(jnp.int32), out_valid


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    iou_threshold: float,
    max_output_size: int,
    *,
    valid: jax.Array | None = None,
    tile_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Class-aware NMS (torchvision `batched_nms`): NMS within each class, merged by score.

    Args and returns as `nms`, with `classes: [N]` int class ids.
    """
    return nms(
        boxes,
        scores,
        iou_threshold,
        max_output_size,
        classes=classes,
        valid=valid,
        tile_size=tile_size,
    )


def soft_nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array | None,
    sigma: float,
    score_threshold: float,
    max_output_size: int,
    *,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gaussian soft-NMS, detectron2 `batched_soft_nms(method="gaussian")` semantics (spec §6).

    Repeatedly: take the highest remaining score (ties: lowest index), record it, multiply the
    scores of the remaining boxes of the same class by exp(-IoU^2 / sigma) (detectron2
    `pairwise_iou`), then drop every remaining box whose score is <= `score_threshold`. The first
    pick is made before any pruning, as in detectron2. Runs `max_output_size` fixed steps.

    Args:
      boxes: `[N, 4]` xyxy.
      scores: `[N]` float.
      classes: `[N]` int or None (class-agnostic).
      sigma: Gaussian sigma (RegionCLIP: 0.5).
      score_threshold: prune threshold (RegionCLIP: 0.001).
      max_output_size: static number of steps / output slots.
      valid: optional `[N]` bool mask of candidates.

    Returns:
      indices: `[max_output_size]` int32 in pick order, -1 padding.
      new_scores: `[max_output_size]` the decayed score of each pick at the time it was picked
        (detectron2 replaces the detection scores with these), 0 in padding.
      valid: `[max_output_size]` bool.
    """
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    n = boxes.shape[0]
    alive0 = _selectable(scores, valid)
    cls = jnp.zeros((n,), jnp.int32) if classes is None else jnp.asarray(classes)
    scores = scores.astype(jnp.float32)

    def step(k, state):
        s, alive, idx, out_s, out_v = state
        cur = jnp.where(alive, s, -jnp.inf)
        top = jnp.argmax(cur)
        ok = alive[top]
        iou = box_ops.pairwise_iou(boxes[top][None], boxes)[0]
        iou = jnp.where(cls == cls[top], iou, 0.0)
        decayed = s * jnp.exp(-(iou * iou) / sigma)
        s = jnp.where(ok, decayed, s)
        alive = alive & (s > score_threshold) & (jnp.arange(n) != top)
        idx = idx.at[k].set(jnp.where(ok, top, -1).astype(jnp.int32))
        out_s = out_s.at[k].set(jnp.where(ok, cur[top], 0.0))
        out_v = out_v.at[k].set(ok)
        return s, alive, idx, out_s, out_v

    init = (
        scores,
        alive0,
        jnp.full((max_output_size,), -1, jnp.int32),
        jnp.zeros((max_output_size,), jnp.float32),
        jnp.zeros((max_output_size,), bool),
    )
    _, _, idx, out_s, out_v = jax.lax.fori_loop(0, max_output_size, step, init)
    return idx, out_s, out_v


def find_top_rpn_proposals(
    proposals: Sequence[jax.Array],
    objectness_logits: Sequence[jax.Array],
    image_hw: jax.Array,
    nms_threshold: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float = 0.0,
    *,
    tile_size: int = 256,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """detectron2 `find_top_rpn_proposals` (inference semantics) with padded outputs.

    Per image: keep the `min(pre_nms_topk, N_l)` highest-logit proposals of every level, drop
    non-finite ones, clip to the image, drop boxes with width or height <= `min_box_size`, run
    NMS per level (levels never suppress each other), keep the `post_nms_topk` best overall.

    Args:
      proposals: per level `[B, N_l, 4]` decoded xyxy boxes.
      objectness_logits: per level `[B, N_l]` raw logits.
      image_hw: `[B, 2]` true (h, w) of each image (clip target, not the padded canvas).
      nms_threshold: IoU threshold (0.7 in detectron2 RPNs).
      pre_nms_topk: per-level candidates (C4: 6000 at test; FPN: 1000).
      post_nms_topk: output slots per image (1000).
      min_box_size: detectron2 `MIN_SIZE` (0).

    Returns:
      boxes: `[B, post_nms_topk, 4]` xyxy, zeros in padding.
      logits: `[B, post_nms_topk]` objectness logits by decreasing value, -inf in padding.
      valid: `[B, post_nms_topk]` bool.
    """
    image_hw = jnp.asarray(image_hw)

    def one_image(props, logits, hw):
        cand_boxes, cand_scores, cand_level = [], [], []
        for level, (p, s) in enumerate(zip(props, logits)):
            k = min(pre_nms_topk, s.shape[0])
            top_s, top_i = jax.lax.top_k(s, k)
            cand_boxes.append(p[top_i])
            cand_scores.append(top_s)
            cand_level.append(jnp.full((k,), level, jnp.int32))
        bx = jnp.concatenate(cand_boxes)
        sc = jnp.concatenate(cand_scores)
        lv = jnp.concatenate(cand_level)
        ok = jnp.isfinite(bx).all(axis=1) & jnp.isfinite(sc)
        bx = box_ops.clip_boxes(bx, hw)
        ok = ok & box_ops.nonempty(bx, min_box_size)
        idx, keep = nms(
            bx, sc, nms_threshold, post_nms_topk, classes=lv, valid=ok, tile_size=tile_size
        )
        safe = jnp.maximum(idx, 0)
        out_boxes = jnp.where(keep[:, None], bx[safe], 0.0)
        out_scores = jnp.where(keep, sc[safe], -jnp.inf)
        return out_boxes, out_scores, keep

    return jax.vmap(one_image)(list(proposals), list(objectness_logits), image_hw)
