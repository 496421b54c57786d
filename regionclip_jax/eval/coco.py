"""COCO box evaluation with pycocotools, plus the open-vocabulary AP50 splits (spec §5.5).

`evaluate_coco` runs one `COCOeval` (bbox, or segm with the detections' masks) over the
ground-truth json and the detections read by `results.read_detections` (and `results.read_masks`),
and reports:

  - the 12 standard numbers under plain names, in percent as detectron2 prints them: AP, AP50,
    AP75, APs, APm, APl (maxDets = `max_dets`), AR1, AR10, AR{max_dets} (AR100 by default), ARs,
    ARm, ARl. A number pycocotools reports as -1 (no ground truth in that slice) becomes nan.
  - the open-vocabulary split numbers of RegionCLIP's `coco_evaluation.py` (`AP50_split_target`,
    `AP50_split_base`, `AP50_split_all`), here named AP50/novel, AP50/base, AP50/all. With
    `P = coco_eval.eval["precision"]` of shape [T=10 IoUs, R=101 recall points, K categories,
    A=4 areas, M=3 maxDets]:

        AP50_k   = mean(P[0, :, k, 0, -1][P[0, :, k, 0, -1] > -1])   (IoU 0.5, area all, maxDets[-1])
        AP50/s   = 100 * mean over {k in split s with AP50_k defined} of AP50_k

    AP50_k is undefined (all entries -1) exactly when category k has no ground truth in the
    evaluated images; RegionCLIP's mean would then be nan, here the category is left out (on the
    COCO OVD val json every category has ground truth, so the two agree). "all" averages every
    category whose split is not "excluded" (`data.ov_splits.coco_ovd_split` labels the 15 COCO
    classes outside the 65 "excluded"); other split names (any string) get their own AP50/name.

Masks (`iou_type="segm"`): the detections' compressed RLE masks (`eval.masks.paste_masks_rle`)
are evaluated as pycocotools evaluates detectron2's `instances_to_coco_json` output (results with
both `bbox` and `segmentation`): mask IoU, and, as `COCO.loadRes` sets it when a result has a
bbox, the detection's area for the small/medium/large ranges is its box area w * h. The ground
truth needs `segmentation` on every annotation. Same metric names; callers prefix them (the
`detect` trainer reports `segm/AP`, `segm/AP50/novel`, ...).

Ground truth: the evaluated categories are those of the json. RegionCLIP evaluates COCO OVD on the
65-category `ovd_ins_val2017_all.json`; pass that json (or one like it), not the 80-class one, to
get its 12-number table.

Memory: pycocotools holds one Python dict per detection plus per-(image, category) match records;
on 5,000 images x 100 detections the evaluation peaks at ~2.2 GB RSS (benchmarks/eval_memory.py),
while streaming and reading the packed detections stays under 100 MB.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip_jax.eval.results import DETECTION_DTYPE

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_AR_AREA_NAMES = ("ARs", "ARm", "ARl")


def metric_names(max_dets: int = 100) -> tuple[str, ...]:
    """Names of `COCOeval.stats[0:12]` for maxDets (1, 10, max_dets)."""
    return (*_STAT_NAMES, "AR1", "AR10", f"AR{max_dets}", *_AR_AREA_NAMES)


def load_coco(gt: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools `COCO` from a json path, a parsed json dict, or an existing `COCO`."""
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, str | os.PathLike):
        with open(gt) as f:
            dataset = json.load(f)
    else:
        dataset = copy.deepcopy(dict(gt))
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def results_coco(
    gt: COCO, detections: np.ndarray, masks: Sequence[Mapping[str, Any]] | None = None
) -> COCO:
    """The results `COCO` that `gt.loadRes` would build, from a `DETECTION_DTYPE` array.

    Same annotation fields and ids (1..K in array order) as `loadRes` of results with a `bbox`
    (area = w * h), without the box polygon `segmentation` it adds when a result has none (unused
    by bbox evaluation; it doubles the memory). With `masks` (one compressed RLE per detection)
    each annotation's `segmentation` is its mask.

    Raises:
      ValueError: a detection on an image that is not in `gt`; masks that do not match the
        detections or their image's size.
    """
    dets = np.asarray(detections)
    if dets.dtype != DETECTION_DTYPE:
        raise TypeError(f"detections must have DETECTION_DTYPE, got {dets.dtype}")
    unknown = np.setdiff1d(np.unique(dets["image_id"]), np.asarray(gt.getImgIds(), np.int64))
    if unknown.size:
        raise ValueError(f"detections on images missing from the ground truth: {unknown[:5]}")
    anns = [
        {
            "id": i + 1,
            "image_id": img,
            "category_id": cat,
            "bbox": [x, y, w, h],
            "score": s,
            "area": w * h,
            "iscrowd": 0,
        }
        for i, (img, cat, x, y, w, h, s) in enumerate(
            zip(*(dets[name].tolist() for name in DETECTION_DTYPE.names))
        )
    ]
    if masks is not None:
        if len(masks) != len(anns):
            raise ValueError(f"{len(masks)} masks for {len(anns)} detections")
        for ann, m in zip(anns, masks):
            img = gt.imgs[ann["image_id"]]
            if [int(v) for v in m["size"]] != [int(img["height"]), int(img["width"])]:
                raise ValueError(
                    f"mask of size {list(m['size'])} on image {ann['image_id']} of size "
                    f"{[img['height'], img['width']]}"
                )
            ann["segmentation"] = m
    res = COCO()
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def gt_has_masks(gt: COCO | Mapping[str, Any]) -> bool:
    """Whether every annotation of the ground truth has a `segmentation` (and there is one)."""
    anns = gt.dataset["annotations"] if isinstance(gt, COCO) else gt["annotations"]
    return bool(anns) and all(a.get("segmentation") for a in anns)


def default_category_splits(gt: COCO) -> dict[int, str] | None:
    """Category id -> `split` field of the json categories, or None when no category has one."""
    cats = gt.dataset.get("categories", [])
    if not any("split" in c for c in cats):
        return None
    return {int(c["id"]): str(c.get("split", "excluded")) for c in cats}


def split_ap50(
    precision: np.ndarray, cat_ids: Sequence[int], category_splits: Mapping[int, str]
) -> dict[str, float]:
    """AP50/<split> and AP50/all (percent) from `COCOeval.eval["precision"]` (module docstring).

    Args:
      precision: float[T, R, K, A, M] from `COCOeval.accumulate`, IoU 0.5 first, area "all" first.
      cat_ids: the K category ids in the order of `precision`'s K axis (`params.catIds`).
      category_splits: category id -> split name; "excluded" categories count in no split.
    """
    p50 = precision[0, :, :, 0, -1]  # [R, K]
    per_cat = {}
    for k, cid in enumerate(cat_ids):
        col = p50[:, k]
        col = col[col > -1]
        if col.size:
            per_cat[int(cid)] = float(np.mean(col))
    groups: dict[str, list[float]] = {}
    for cid, split in category_splits.items():
        if split == "excluded" or cid not in per_cat:
            continue
        groups.setdefault(split, []).append(per_cat[cid])
        groups.setdefault("all", []).append(per_cat[cid])
    out = {}
    for name in sorted({s for s in category_splits.values() if s != "excluded"} | {"all"}):
        vals = groups.get(name, [])
        out[f"AP50/{name}"] = 100.0 * float(np.mean(vals)) if vals else math.nan
    return out


def evaluate_coco(
    gt: str | os.PathLike | Mapping[str, Any] | COCO,
    detections: np.ndarray,
    *,
    category_splits: Mapping[int, str] | None = None,
    max_dets: int = 100,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | np.ndarray | None = None,
    verbose: bool = False,
    masks: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """COCO bbox or segm metrics and open-vocabulary AP50 splits (percent) of `detections`.

    Args:
      gt: COCO instances json (path or dict) or a pycocotools `COCO`.
      detections: `results.DETECTION_DTYPE` array [K] (`read_detections`); boxes xywh in original
        image pixels, dataset category ids. pycocotools keeps the `max_dets` best per image and
        category.
      category_splits: category id -> "base" | "novel" | ... ("excluded": in no split). Default:
        the `split` field of the json categories; no split numbers when there is none.
      max_dets: the last of COCOeval's maxDets (1, 10, max_dets).
      iou_type: "bbox", or "segm" (mask AP; needs `masks` and GT `segmentation`).
      image_ids: evaluate on these images only (e.g. `results.read_image_ids` after a partial
        pass over the val set); default all images of `gt`.
      verbose: print pycocotools' progress and summary.
      masks: one compressed RLE dict per detection (`results.read_masks`); required by "segm".

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", f"AR{max_dets}", "ARs", "ARm",
      "ARl"} and, with splits, {"AP50/base", "AP50/novel", ..., "AP50/all"}. With no detections:
      all zeros and a warning (pycocotools cannot load an empty result list).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == "segm" and masks is None:
        raise ValueError("iou_type 'segm' needs the detections' masks")
    coco_gt = load_coco(gt)
    if iou_type == "segm" and not gt_has_masks(coco_gt):
        raise ValueError("iou_type 'segm': some ground-truth annotations have no segmentation")
    if category_splits is None:
        category_splits = default_category_splits(coco_gt)
    names = metric_names(max_dets)
    dets = np.asarray(detections)
    if dets.shape[0] == 0:
        warnings.warn("evaluate_coco: no detections; reporting zeros", stacklevel=2)
        out = dict.fromkeys(names, 0.0)
        if category_splits:
            labels = {s for s in category_splits.values() if s != "excluded"} | {"all"}
            out.update({f"AP50/{s}": 0.0 for s in sorted(labels)})
        return out
    coco_dt = results_coco(coco_gt, dets, masks if iou_type == "segm" else None)
    stdout = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with stdout:
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.maxDets = [1, 10, int(max_dets)]
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in np.asarray(image_ids).reshape(-1))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {n: float(s * 100) if s >= 0 else math.nan for n, s in zip(names, ev.stats)}
    if category_splits:
        out.update(split_ap50(ev.eval["precision"], ev.params.catIds, category_splits))
    return out


def format_table(metrics: Mapping[str, float], digits: int = 3) -> str:
    """A two-row markdown table of `metrics` (names, then values), as detectron2 logs them."""
    names = list(metrics)
    vals = [f"{metrics[n]:.{digits}f}" for n in names]
    widths = [max(len(n), len(v)) for n, v in zip(names, vals)]
    row = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([row(names), rule, row(vals)])
