"""Which class a detector gives each ground-truth object: a confusion table of detections.

For every GT object of the chosen categories, the detection of highest score on the same image
with IoU >= `iou` (any class) names the predicted class ("-" when no detection overlaps that much).
This is what tells apart the ways novel-class AP can be lost in open-vocabulary detection: novel
objects scored as a base class, missed (background), or confused with another novel class.

  python -m regionclip_jax.eval.confusion --gt instances_val.json --detections RUN/eval/STEP \
      [--split novel]
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Iterable, Sequence

import numpy as np

from regionclip_jax.eval.results import read_detections

MISSED = "-"


def _iou_xywh(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xywh box `[4]` with xywh boxes `[N, 4]` -> `[N]`."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return inter / np.maximum(union, 1e-12)


def confusion(
    gt: dict, detections: np.ndarray, category_ids: Iterable[int] | None = None, iou: float = 0.5
) -> collections.Counter:
    """Counts (GT class name, predicted class name or "-") over the GT objects.

    Args:
      gt: a COCO instances dict (`images`, `annotations`, `categories`).
      detections: `results.DETECTION_DTYPE` records `[K]` (xywh boxes, original pixels).
      category_ids: the GT categories to count (None: all); crowd annotations are skipped.
      iou: the overlap a detection needs to count for an object.
    """
    names = {int(c["id"]): c["name"] for c in gt["categories"]}
    wanted = None if category_ids is None else {int(c) for c in category_ids}
    by_image: dict[int, np.ndarray] = {}
    order = np.argsort(detections["image_id"], kind="stable")
    ids, starts = np.unique(detections["image_id"][order], return_index=True)
    for i, image_id in enumerate(ids):
        end = starts[i + 1] if i + 1 < len(starts) else len(order)
        by_image[int(image_id)] = detections[order[starts[i] : end]]
    counts: collections.Counter = collections.Counter()
    for a in gt["annotations"]:
        cat = int(a["category_id"])
        if a.get("iscrowd", 0) or (wanted is not None and cat not in wanted):
            continue
        dets = by_image.get(int(a["image_id"]))
        predicted = MISSED
        if dets is not None and len(dets):
            boxes = np.stack([dets["x"], dets["y"], dets["w"], dets["h"]], axis=1)
            ok = _iou_xywh(np.asarray(a["bbox"], np.float64), boxes.astype(np.float64)) >= iou
            if ok.any():
                best = np.flatnonzero(ok)[np.argmax(dets["score"][ok])]
                predicted = names[int(dets["category_id"][best])]
        counts[(names[cat], predicted)] += 1
    return counts


def format_confusion(counts: collections.Counter) -> str:
    """One line per GT class: its count, then the predicted classes by decreasing count."""
    per_gt: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (g, p), n in counts.items():
        per_gt[g][p] += n
    lines = []
    for g in sorted(per_gt):
        total = sum(per_gt[g].values())
        preds = ", ".join(f"{p} {n}" for p, n in per_gt[g].most_common())
        lines.append(f"  {g:>12} ({total}): {preds}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gt", required=True, help="COCO instances json of the evaluated set")
    p.add_argument("--detections", required=True, help="a DetectionWriter directory (eval/STEP)")
    p.add_argument("--split", default="", help="only categories with this `split` (e.g. novel)")
    p.add_argument("--iou", type=float, default=0.5)
    args = p.parse_args(argv)
    with open(args.gt) as f:
        gt = json.load(f)
    cats = None
    if args.split:
        cats = [c["id"] for c in gt["categories"] if c.get("split") == args.split]
        if not cats:
            p.error(f"no category of {args.gt} has split {args.split!r}")
    print(format_confusion(confusion(gt, read_detections(args.detections), cats, args.iou)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
