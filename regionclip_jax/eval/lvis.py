"""LVIS v1 box and mask evaluation (federated protocol), standalone NumPy (+ pycocotools mask IoU).

RegionCLIP evaluates LVIS with the `lvis` package (lvis-api 0.5.3) through detectron2's
`LVISEvaluator` (spec §5.5: box AP, APr/APc/APf, max 300 detections per image, main metric APr).
lvis-api 0.5.3 fails on NumPy >= 1.24 (`np.float`), so the protocol is re-implemented here from
its definition (Gupta et al., LVIS, CVPR 2019, and the lvis-api documentation); a test compares it
with the official package number for number where that package can be imported.

Protocol:
  1. Per image, keep the `max_dets` (300) highest-scoring detections over all categories (stable:
     equal scores keep input order).
  2. Federated filtering: a detection of category c on image i is evaluated only if c is
     positive on i (i has a GT box of c) or verified negative (c in i's `neg_category_ids`). All
     other detections are dropped: the image says nothing about c.
  3. Matching per (image, category), per IoU threshold t in {.50, .55, ..., .95} and area range
     (all [0, 1e10], small [0, 32^2], medium [32^2, 96^2], large [96^2, 1e10], bounds inclusive):
     detections in decreasing score; each takes the unmatched GT with the highest box IoU >= t,
     preferring GT inside the area range (GT outside it is "ignored"; equal IoUs go to the later
     GT). A detection matched to an ignored GT is ignored. An unmatched detection is ignored if
     its box area is outside the range or if c is in i's `not_exhaustive_category_ids` (missing
     annotations must not count as false positives); otherwise it is a false positive. There is
     no crowd handling (LVIS has no crowd boxes). GT area is the json `area` (the mask area in
     LVIS; w * h if the field is absent), detection area is w * h, IoU is the box IoU.
  4. Per category and area: detections of all images sorted by score (stable), precision/recall
     from cumulative TP/FP over non-ignored detections, precision made monotone from the right
     and sampled at 101 recall points (0 beyond the largest recall); recall = final recall.
     Categories (or areas) with no non-ignored GT get -1 and stay out of every mean.
  5. AP = mean of the valid precision samples over IoUs, recall points and categories (area all);
     AP50/AP75 at one IoU; APs/APm/APl per area; APr/APc/APf over categories of `frequency`
     r/c/f; AR (AR@max_dets) the mean recall, ARs/ARm/ARl per area.

Masks (`iou_type="segm"`, LVIS mask AP): the same protocol with the IoU of step 3 the mask IoU
(pycocotools `mask.iou`, as lvis-api's `LVISEval` with iou_type segm) between the detections'
compressed RLE masks and the GT `segmentation` (polygons or RLE, rasterised as lvis-api's
`ann_to_rle`). Areas are unchanged: GT area the json `area`, detection area its box w * h (lvis-api's
`LVISResults` sets `area = w * h` for results that have a `bbox`, as detectron2's do).

Numbers are in percent (detectron2's `LVISEvaluator` multiplies by 100); a metric with no valid
entry (lvis-api's -1) is nan. Only the per-(image, category) greedy matching loops in Python, over
pairs that have both GT and detections; everything else is vectorised, and memory grows with the
number of annotations and detections, not with images x categories.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from regionclip_jax.eval.masks import mask_iou, segmentation_to_rle
from regionclip_jax.eval.results import DETECTION_DTYPE

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = np.array([[0.0, 1e10], [0.0, 32.0**2], [32.0**2, 96.0**2], [96.0**2, 1e10]])
FREQUENCIES = ("r", "c", "f")
METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AR",
    "ARs",
    "ARm",
    "ARl",
)


def _load(gt: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(gt, str | os.PathLike):
        with open(gt) as f:
            return json.load(f)
    return gt


def box_iou_xywh(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU [D, G] of xywh boxes in float64, with pycocotools' `bbIou` arithmetic (no crowd)."""
    dt = np.asarray(dt, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    w = np.minimum(dt[:, None, 2] + dt[:, None, 0], gt[None, :, 2] + gt[None, :, 0]) - np.maximum(
        dt[:, None, 0], gt[None, :, 0]
    )
    h = np.minimum(dt[:, None, 3] + dt[:, None, 1], gt[None, :, 3] + gt[None, :, 1]) - np.maximum(
        dt[:, None, 1], gt[None, :, 1]
    )
    inter = w * h
    union = (dt[:, 2] * dt[:, 3])[:, None] + (gt[:, 2] * gt[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _match(ious: np.ndarray, gt_ig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of score-sorted detections to GT for every (area, IoU threshold).

    Args:
      ious: float[D, G], detections in decreasing score.
      gt_ig: bool[A, G], GT ignored in area range a.

    Returns:
      matched bool[A, T, D], matched_to_ignored bool[A, T, D].
    """
    num_d, num_g = ious.shape
    num_a, num_t = gt_ig.shape[0], IOU_THRESHOLDS.shape[0]
    gt_taken = np.zeros((num_a, num_t, num_g), bool)
    matched = np.zeros((num_a, num_t, num_d), bool)
    to_ignored = np.zeros((num_a, num_t, num_d), bool)
    thr = IOU_THRESHOLDS[None, :, None]
    ig = gt_ig[:, None, :]
    a_idx, t_idx = np.meshgrid(np.arange(num_a), np.arange(num_t), indexing="ij")
    for d in range(num_d):
        cand = ~gt_taken & (ious[d][None, None, :] >= thr)
        regular = cand & ~ig
        # GT inside the area range wins over ignored GT whatever the IoU.
        pool = np.where(regular.any(-1, keepdims=True), regular, cand & ig)
        found = pool.any(-1)
        if not found.any():
            continue
        val = np.where(pool, ious[d][None, None, :], -1.0)
        m = num_g - 1 - np.argmax(val[..., ::-1], axis=-1)  # the last GT among equal IoUs
        matched[..., d] = found
        to_ignored[..., d] = found & gt_ig[a_idx, m]
        gt_taken[a_idx[found], t_idx[found], m[found]] = True
    return matched, to_ignored


def _precision_recall(
    scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, num_gt: int
) -> tuple[np.ndarray, np.ndarray]:
    """Precision [T, R] at the recall points and recall [T] of one (category, area).

    scores float[D] in image order; matched/ignored bool[T, D].
    """
    order = np.argsort(-scores, kind="mergesort")
    matched, ignored = matched[:, order], ignored[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    num_t, num_d = tp.shape
    precision = np.zeros((num_t, RECALL_POINTS.shape[0]))
    if num_d == 0:
        return precision, np.zeros((num_t,))
    rc = tp / num_gt
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    for t in range(num_t):
        inds = np.searchsorted(rc[t], RECALL_POINTS, side="left")
        ok = inds < num_d
        precision[t, ok] = pr[t, inds[ok]]
    return precision, rc[:, -1]


def _mean_valid(s: np.ndarray) -> float:
    s = s[s > -1]
    return 100.0 * float(np.mean(s)) if s.size else math.nan


def evaluate_lvis(
    gt: str | os.PathLike | Mapping[str, Any],
    detections: np.ndarray,
    max_dets: int = 300,
    *,
    return_arrays: bool = False,
    iou_type: str = "bbox",
    masks: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """LVIS box or mask AP of `detections` on `gt` (module docstring for the protocol), percent.

    Args:
      gt: LVIS v1 json (path or parsed dict): images with `neg_category_ids` and
        `not_exhaustive_category_ids` (missing = empty), categories with `frequency`,
        annotations with `bbox` (xywh) and `area`.
      detections: `results.DETECTION_DTYPE` array [K]; boxes xywh in original image pixels,
        LVIS category ids. Detections of categories not in `gt` are dropped.
      max_dets: detections kept per image (top scores over all categories); < 0 keeps all.
      iou_type: "bbox" or "segm" (mask AP: needs `masks` and GT `segmentation`).
      masks: one compressed RLE dict per detection (`results.read_masks`), for "segm".
      return_arrays: also return "precision" float[T=10, R=101, K, A=4], "recall" [T, K, A] and
        "cat_ids" [K] (sorted) for per-category analysis.

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR", "ARs", "ARm", "ARl"}.

    Raises:
      ValueError: a detection on an image missing from `gt` (as lvis-api).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    segm = iou_type == "segm"
    if segm and masks is None:
        raise ValueError("iou_type 'segm' needs the detections' masks")
    data = _load(gt)
    dets = np.asarray(detections)
    if dets.dtype != DETECTION_DTYPE:
        raise TypeError(f"detections must have DETECTION_DTYPE, got {dets.dtype}")
    if segm and len(masks) != dets.shape[0]:
        raise ValueError(f"{len(masks)} masks for {dets.shape[0]} detections")
    # Detection masks travel with the detections as an index into `masks`.
    d_mask = np.arange(dets.shape[0])
    if dets.shape[0] == 0:
        warnings.warn("evaluate_lvis: no detections; AP is 0", stacklevel=2)

    img_ids = np.array(sorted(int(im["id"]) for im in data["images"]), np.int64)
    cat_ids = np.array(sorted(int(c["id"]) for c in data["categories"]), np.int64)
    num_k, num_a, num_t = len(cat_ids), len(AREA_RANGES), len(IOU_THRESHOLDS)
    img_index = lambda ids: np.searchsorted(img_ids, ids)
    cat_index = lambda ids: np.searchsorted(cat_ids, ids)

    def pair_keys(pairs: list[tuple[int, int]]) -> np.ndarray:
        if not pairs:
            return np.zeros((0,), np.int64)
        p = np.asarray(pairs, np.int64)
        known = np.isin(p[:, 1], cat_ids)
        p = p[known]
        return img_index(p[:, 0]) * num_k + cat_index(p[:, 1])

    neg_keys = pair_keys(
        [(im["id"], c) for im in data["images"] for c in im.get("neg_category_ids", [])]
    )
    nel_keys = pair_keys(
        [(im["id"], c) for im in data["images"] for c in im.get("not_exhaustive_category_ids", [])]
    )

    # Ground truth, sorted by (category, image) with json order kept inside a pair.
    known_cats = set(cat_ids.tolist())
    anns = [a for a in data["annotations"] if a["category_id"] in known_cats]
    g_img = img_index(np.array([a["image_id"] for a in anns], np.int64))
    g_cat = cat_index(np.array([a["category_id"] for a in anns], np.int64))
    g_box = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    g_area = np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float64)
    g_flag = np.array([bool(a.get("ignore", 0)) for a in anns], bool)
    g_ig = g_flag[None, :] | (g_area < AREA_RANGES[:, :1]) | (g_area > AREA_RANGES[:, 1:])
    g_order = np.lexsort((g_img, g_cat))
    g_key = (g_img * num_k + g_cat)[g_order]
    g_box, g_ig = g_box[g_order], g_ig[:, g_order]
    g_rle: list[Any] = []
    if segm:
        hw = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
        if not all(a.get("segmentation") for a in anns):
            raise ValueError("iou_type 'segm': some ground-truth annotations have no segmentation")
        g_rle = [
            segmentation_to_rle(anns[i]["segmentation"], *hw[int(anns[i]["image_id"])])
            for i in g_order.tolist()
        ]

    # Detections: known image (checked), known category, top max_dets per image, federated.
    unknown = np.setdiff1d(np.unique(dets["image_id"]), img_ids)
    if unknown.size:
        raise ValueError(f"detections on images missing from the ground truth: {unknown[:5]}")
    score = dets["score"].astype(np.float64)
    if max_dets >= 0 and dets.shape[0]:
        order = np.lexsort((-score, dets["image_id"]))  # stable: ties keep input order
        sorted_img = dets["image_id"][order]
        first = np.searchsorted(sorted_img, sorted_img, side="left")
        keep = np.zeros(dets.shape[0], bool)
        keep[order] = (np.arange(order.shape[0]) - first) < max_dets
        dets, score, d_mask = dets[keep], score[keep], d_mask[keep]
    known = np.isin(dets["category_id"], cat_ids)
    dets, score, d_mask = dets[known], score[known], d_mask[known]
    d_key = img_index(dets["image_id"]) * num_k + cat_index(dets["category_id"])
    evaluable = np.isin(d_key, np.unique(np.concatenate([g_key, neg_keys])))
    dets, score, d_key = dets[evaluable], score[evaluable], d_key[evaluable]
    d_mask = d_mask[evaluable]
    # By (category, image, decreasing score), input order among ties: lvis-api's concatenation
    # order (images ascending, each image's detections score-sorted) before its final sort.
    d_order = np.lexsort((-score, d_key // num_k, d_key % num_k))
    dets, score, d_key = dets[d_order], score[d_order], d_key[d_order]
    d_mask = d_mask[d_order]
    d_box = np.stack([dets[k].astype(np.float64) for k in "xywh"], axis=1)
    d_area = d_box[:, 2] * d_box[:, 3]
    d_out = (d_area < AREA_RANGES[:, :1]) | (d_area > AREA_RANGES[:, 1:])  # [A, D]
    d_nel = np.isin(d_key, nel_keys)

    precision = -np.ones((num_t, RECALL_POINTS.shape[0], num_k, num_a))
    recall = -np.ones((num_t, num_k, num_a))
    g_cat_sorted, d_cat = g_key % num_k, d_key % num_k
    for k in np.unique(g_cat_sorted):
        gs, ge = np.searchsorted(g_cat_sorted, [k, k + 1])
        ds, de = np.searchsorted(d_cat, [k, k + 1])
        num_gt = (~g_ig[:, gs:ge]).sum(axis=1)  # [A]
        # Unmatched until proven otherwise: ignored if out of the area range or not exhaustive.
        matched = np.zeros((num_a, num_t, de - ds), bool)
        ignored = np.repeat((d_out[:, ds:de] | d_nel[None, ds:de])[:, None, :], num_t, axis=1)
        gk, dk = g_key[gs:ge], d_key[ds:de]
        for key in np.intersect1d(gk, dk):
            g0, g1 = np.searchsorted(gk, [key, key + 1])
            d0, d1 = np.searchsorted(dk, [key, key + 1])
            if segm:
                ious = mask_iou(
                    [masks[i] for i in d_mask[ds + d0 : ds + d1].tolist()],
                    g_rle[gs + g0 : gs + g1],
                )
            else:
                ious = box_iou_xywh(d_box[ds + d0 : ds + d1], g_box[gs + g0 : gs + g1])
            m, to_ig = _match(ious, g_ig[:, gs + g0 : gs + g1])
            matched[..., d0:d1] = m
            ignored[..., d0:d1] = to_ig | (~m & ignored[..., d0:d1])
        for a in range(num_a):
            if num_gt[a] == 0:
                continue
            precision[:, :, k, a], recall[:, k, a] = _precision_recall(
                score[ds:de], matched[a], ignored[a], int(num_gt[a])
            )

    freq = {int(c["id"]): c.get("frequency") for c in data["categories"]}
    groups = {f: np.array([freq[int(c)] == f for c in cat_ids], bool) for f in FREQUENCIES}
    out = {
        "AP": _mean_valid(precision[..., 0]),
        "AP50": _mean_valid(precision[0, ..., 0]),
        "AP75": _mean_valid(precision[5, ..., 0]),
        "APs": _mean_valid(precision[..., 1]),
        "APm": _mean_valid(precision[..., 2]),
        "APl": _mean_valid(precision[..., 3]),
        **{f"AP{f}": _mean_valid(precision[:, :, groups[f], 0]) for f in FREQUENCIES},
        "AR": _mean_valid(recall[..., 0]),
        "ARs": _mean_valid(recall[..., 1]),
        "ARm": _mean_valid(recall[..., 2]),
        "ARl": _mean_valid(recall[..., 3]),
    }
    if return_arrays:
        out.update(precision=precision, recall=recall, cat_ids=cat_ids)
    return out
