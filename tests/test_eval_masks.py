"""Mask results end to end: streamed RLE masks, COCO segm AP and LVIS mask AP.

References are the official tools called directly on hand-made ground truth (polygon shapes:
triangles, octagons, rectangles; one crowd RLE) and detections whose masks are made here with
pycocotools `mask.encode` (not with the code under test): exact shapes, box-filled rectangles and
shifted shapes, so box AP and mask AP differ.
  - COCO: `COCO.loadRes` of detectron2-style results (bbox + segmentation) and `COCOeval(segm)`;
  - LVIS: lvis-api `LVISEval(iou_type="segm")` (torch_ref leg, needs the `lvis` package), and on
    every venv `COCOeval(segm)` on an exhaustively annotated set (where the two protocols agree).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip_jax.eval import coco as coco_eval
from regionclip_jax.eval import lvis as lvis_eval
from regionclip_jax.eval import results

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _polygon(kind: str, cx: float, cy: float, s: float) -> list[float]:
    if kind == "triangle":
        pts = [(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    elif kind == "octagon":
        a = np.arange(8) * np.pi / 4 + np.pi / 8
        pts = list(zip(cx + s * np.cos(a), cy + s * np.sin(a)))
    else:
        pts = [(cx - s, cy - 0.6 * s), (cx + s, cy - 0.6 * s), (cx + s, cy + 0.6 * s)]
        pts.append((cx - s, cy + 0.6 * s))
    return [float(v) for p in pts for v in p]


def _rle(bitmap: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(bitmap.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def _box_bitmap(box, h, w) -> np.ndarray:
    x, y, bw, bh = box
    return mask_utils.decode(
        mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)
    )[..., 0]


def _mask_set(seed: int, num_images: int = 10, lvis: bool = False, crowd: bool = False):
    """GT dict (COCO or LVIS style, polygon segmentations) and detectron2-style results list."""
    rng = np.random.default_rng(seed)
    freqs = ["r", "c", "f", "f"]
    cats = [{"id": 4 + 3 * k, "name": f"c{k}"} for k in range(4)]
    if lvis:
        for c, f in zip(cats, freqs):
            c["frequency"] = f
    cat_ids = [c["id"] for c in cats]
    images, anns, res = [], [], []
    for i in range(num_images):
        h, w = int(rng.integers(90, 140)), int(rng.integers(100, 160))
        img_id = 3 + 5 * i
        img = {"id": img_id, "height": h, "width": w}
        pos = set()
        for _ in range(int(rng.integers(1, 4))):
            kind = str(rng.choice(["triangle", "octagon", "rect"]))
            s = float(rng.uniform(6, 30))
            cx, cy = float(rng.uniform(s, w - s)), float(rng.uniform(s, h - s))
            poly = _polygon(kind, cx, cy, s)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            box = [float(v) for v in mask_utils.toBbox(rle)]
            cat = int(rng.choice(cat_ids))
            pos.add(cat)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "segmentation": [poly],
                    "area": float(mask_utils.area(rle)),
                    "bbox": box,
                    "iscrowd": 0,
                }
            )
            gt_bm = mask_utils.decode(rle)
            for _ in range(int(rng.integers(0, 3))):
                j = rng.normal(0, 0.06, 4) * [box[2], box[3], box[2], box[3]]
                dbox = [box[0] + j[0], box[1] + j[1], box[2] + j[2], box[3] + j[3]]
                how = rng.choice(["exact", "boxfill", "shift"])
                if how == "exact":
                    bm = gt_bm
                elif how == "boxfill":  # a rectangle: good box, poor mask for non-rectangles
                    bm = _box_bitmap(dbox, h, w)
                else:
                    dy, dx = (int(v) for v in rng.integers(-4, 5, 2))
                    bm = np.roll(gt_bm, (dy, dx), axis=(0, 1))
                res.append((img_id, cat, dbox, _rle(bm)))
        for _ in range(int(rng.integers(1, 4))):  # false positives
            bw, bh = rng.uniform(5, 40, 2)
            dbox = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]
            res.append((img_id, int(rng.choice(cat_ids)), dbox, _rle(_box_bitmap(dbox, h, w))))
        if lvis:
            rest = [c for c in cat_ids if c not in pos]
            img["neg_category_ids"] = rest[: int(rng.integers(0, len(rest) + 1))]
            img["not_exhaustive_category_ids"] = [c for c in pos if rng.random() < 0.3]
        images.append(img)
    if crowd:  # one crowd region in RLE form (COCO only)
        img = images[0]
        bm = np.zeros((img["height"], img["width"]), np.uint8)
        bm[2:30, 2:40] = 1
        r = _rle(bm)
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": img["id"],
                "category_id": cat_ids[0],
                "segmentation": r,
                "area": float(bm.sum()),
                "bbox": [2.0, 2.0, 38.0, 28.0],
                "iscrowd": 1,
            }
        )
    gt = {"images": images, "categories": cats, "annotations": anns}
    scores = rng.uniform(0.01, 1.0, len(res)).astype(np.float32)
    out = [
        {
            "image_id": i,
            "category_id": c,
            "bbox": [float(v) for v in np.float32(b)],
            "score": float(s),
            "segmentation": m,
        }
        for (i, c, b, m), s in zip(res, scores)
    ]
    return gt, out


def _cocoeval(gt: dict, res: list, iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO()
        cgt.dataset = copy.deepcopy(gt)
        cgt.createIndex()
        ev = COCOeval(cgt, cgt.loadRes(copy.deepcopy(res)), iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _ours_coco(gt, res, iou_type):
    dets = results.detections_from_coco_results(res)
    masks = [r["segmentation"] for r in res]
    return coco_eval.evaluate_coco(gt, dets, iou_type=iou_type, masks=masks)


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_segm_matches_pycocotools(seed):
    gt, res = _mask_set(seed, crowd=True)
    box = _ours_coco(gt, res, "bbox")
    segm = _ours_coco(gt, res, "segm")
    for name, s in zip(STAT_NAMES, _cocoeval(gt, res, "segm")):
        want = 100 * s if s >= 0 else math.nan
        np.testing.assert_allclose(segm[name], want, rtol=0, atol=1e-9, err_msg=name)
    for name, s in zip(STAT_NAMES, _cocoeval(gt, res, "bbox")):
        want = 100 * s if s >= 0 else math.nan
        np.testing.assert_allclose(box[name], want, rtol=0, atol=1e-9, err_msg=name)
    assert abs(box["AP"] - segm["AP"]) > 1.0  # the masks matter
    assert 5 < segm["AP"] < 95


def test_coco_segm_needs_masks_and_gt_segmentation():
    gt, res = _mask_set(0)
    dets = results.detections_from_coco_results(res)
    with pytest.raises(ValueError, match="needs the detections' masks"):
        coco_eval.evaluate_coco(gt, dets, iou_type="segm")
    no_seg = dict(
        gt,
        annotations=[
            {k: v for k, v in a.items() if k != "segmentation"} for a in gt["annotations"]
        ],
    )
    with pytest.raises(ValueError, match="no segmentation"):
        coco_eval.evaluate_coco(
            no_seg, dets, iou_type="segm", masks=[r["segmentation"] for r in res]
        )
    bad = [dict(r["segmentation"], size=[1, 1]) for r in res]
    with pytest.raises(ValueError, match="mask of size"):
        coco_eval.evaluate_coco(gt, dets, iou_type="segm", masks=bad)


def test_lvis_segm_matches_cocoeval_when_exhaustive():
    gt, res = _mask_set(4, num_images=12, lvis=True)
    for im in gt["images"]:  # exhaustive: every absent category verified negative
        pos = {a["category_id"] for a in gt["annotations"] if a["image_id"] == im["id"]}
        im["neg_category_ids"] = [c["id"] for c in gt["categories"] if c["id"] not in pos]
        im["not_exhaustive_category_ids"] = []
    dets = results.detections_from_coco_results(res)
    ours = lvis_eval.evaluate_lvis(
        gt, dets, iou_type="segm", masks=[r["segmentation"] for r in res]
    )
    boxes = lvis_eval.evaluate_lvis(gt, dets)
    ref = _cocoeval(gt, res, "segm")
    for name, s in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ref[:6]):
        want = 100 * s if s >= 0 else math.nan
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=1e-9, err_msg=name)
    assert abs(boxes["AP"] - ours["AP"]) > 0.5  # box and mask AP differ


@pytest.mark.torch_ref
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("seed", [0, 3])
def test_lvis_segm_matches_lvis_api(tmp_path, monkeypatch, seed):
    lvis = pytest.importorskip("lvis", reason="lvis 0.5.3 (requirements-dev.txt) not installed")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis-api 0.5.3 uses np.float
    gt, res = _mask_set(seed, num_images=14, lvis=True)
    dets = results.detections_from_coco_results(res)
    ours = lvis_eval.evaluate_lvis(
        gt, dets, iou_type="segm", masks=[r["segmentation"] for r in res]
    )
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    lvis_gt = lvis.LVIS(str(path))
    ev = lvis.LVISEval(lvis_gt, lvis.LVISResults(lvis_gt, copy.deepcopy(res)), iou_type="segm")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.run()
    ref = ev.get_results()
    names = {"AR": "AR@300", "ARs": "ARs@300", "ARm": "ARm@300", "ARl": "ARl@300"}
    for name in lvis_eval.METRICS:
        r = ref[names.get(name, name)]
        want = 100 * r if r > -1 else math.nan
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=1e-9, err_msg=name)
    boxes = lvis_eval.evaluate_lvis(gt, dets)
    assert abs(boxes["AP"] - ours["AP"]) > 0.5  # box and mask AP differ


def test_writer_with_masks_round_trip(tmp_path):
    gt, res = _mask_set(2, num_images=6)
    by_img: dict[int, list] = {}
    for r in res:
        by_img.setdefault(r["image_id"], []).append(r)
    ids = sorted(by_img)
    n = max(len(v) for v in by_img.values()) + 1
    b = len(ids)
    boxes = np.zeros((b, n, 4), np.float32)
    scores = np.zeros((b, n), np.float32)
    cats = np.zeros((b, n), np.int64)
    valid = np.zeros((b, n), bool)
    masks = [[None] * n for _ in range(b)]
    for i, img in enumerate(ids):
        for k, r in enumerate(by_img[img]):
            x, y, w, h = r["bbox"]
            boxes[i, k] = [x, y, x + w, y + h]
            scores[i, k], cats[i, k], valid[i, k] = r["score"], r["category_id"], True
            masks[i][k] = r["segmentation"]
    with results.DetectionWriter(tmp_path, 0, masks=True) as w0:
        w0.add(np.array(ids[:3]), boxes[:3], scores[:3], cats[:3], valid[:3], masks=masks[:3])
    with results.DetectionWriter(tmp_path, 1, masks=True) as w1:
        # A padding row (-1) whose mask entries are None.
        w1.add(
            np.array([*ids[3:], -1]),
            np.concatenate([boxes[3:], boxes[:1]]),
            np.concatenate([scores[3:], scores[:1]]),
            np.concatenate([cats[3:], cats[:1]]),
            np.concatenate([valid[3:], valid[:1]]),
            masks=[*masks[3:], [None] * n],
        )
    dets = results.read_detections(tmp_path)
    got = results.read_masks(tmp_path)
    assert len(got) == len(dets) == len(res)
    want = {(r["image_id"], r["score"]): r["segmentation"] for r in res}
    for d, m in zip(dets, got):
        assert m == want[(int(d["image_id"]), float(d["score"]))]
    out = results.to_coco_results(dets, got)
    assert all(o["segmentation"] == m for o, m in zip(out, got))
    # The json written from the files gives pycocotools' numbers.
    path = tmp_path / "res.json"
    results.to_coco_json(dets, path, got)
    np.testing.assert_allclose(
        _cocoeval(gt, json.loads(path.read_text()), "segm"), _cocoeval(gt, res, "segm")
    )


def test_writer_mask_errors_and_maskless_files(tmp_path):
    box = np.array([[[1, 1, 5, 5]]], np.float32)
    one = (np.array([1]), box, np.ones((1, 1), np.float32), np.ones((1, 1), np.int64))
    with results.DetectionWriter(tmp_path / "a", 0) as w:
        with pytest.raises(ValueError, match="without masks=True"):
            w.add(*one, masks=[[{"size": [8, 8], "counts": "0"}]])
        w.add(*one)
    assert results.read_masks(tmp_path / "a") is None and not results.has_masks(tmp_path / "a")
    assert len(results.read_detections(tmp_path / "a")) == 1
    with results.DetectionWriter(tmp_path / "b", 0, masks=True) as w:
        with pytest.raises(ValueError, match="pass masks="):
            w.add(*one)
        with pytest.raises(ValueError, match="compressed RLE"):
            w.add(*one, masks=[[None]])
        assert w.num_detections == 0
    # Marker without a "masks" field (files from before masks existed): no masks.
    meta = tmp_path / "a" / "detections-p00000.json"
    m = json.loads(meta.read_text())
    del m["masks"]
    meta.write_text(json.dumps(m))
    assert results.read_masks(tmp_path / "a") is None
