"""COCO evaluation and the detection writer, against pycocotools called directly.

The ground truth is a small ShapesWorld val set (shape x colour categories, so some categories
have no ground truth, and the `split` field on every category). Detections are synthetic: jittered
GT boxes (sometimes with the wrong category), duplicates and random false positives, random
scores. The reference route builds the COCO results list in this file straight from those arrays
and runs `COCO.loadRes` + `COCOeval`; the split numbers are checked against separate `COCOeval`
runs whose `params.catIds` are restricted to the split, an independent route to the same AP50.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip_jax.data import shapesworld
from regionclip_jax.eval import coco as coco_eval
from regionclip_jax.eval import results


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld")
    shapesworld.generate(
        out,
        num_train=0,
        num_val=30,
        image_size=256,
        seed=3,
        write_images=False,
        categories="shape_color",
    )
    return str(out / "annotations" / "instances_val.json")


def _synthetic_detections(gt: dict, n_slots: int, seed: int = 0):
    """Per-image padded arrays: image_ids [I], boxes [I, N, 4] xyxy, scores, cats, valid [I, N]."""
    rng = np.random.default_rng(seed)
    cat_ids = np.array([c["id"] for c in gt["categories"]])
    by_img: dict[int, list] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        by_img[a["image_id"]].append(a)
    images = sorted(by_img)
    boxes = np.zeros((len(images), n_slots, 4), np.float32)
    scores = np.zeros((len(images), n_slots), np.float32)
    cats = np.zeros((len(images), n_slots), np.int64)
    valid = np.zeros((len(images), n_slots), bool)
    for i, img in enumerate(images):
        dets = []
        for a in by_img[img]:
            x, y, w, h = a["bbox"]
            for _ in range(rng.integers(0, 3)):  # 0 (missed), 1 or 2 (duplicate) detections
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                box = [x + j[0], y + j[1], x + w + j[2], y + h + j[3]]
                cat = a["category_id"] if rng.random() < 0.85 else rng.choice(cat_ids)
                dets.append((box, cat))
        for _ in range(rng.integers(1, 5)):  # false positives anywhere
            xy = rng.uniform(0, 200, 2)
            wh = rng.uniform(4, 80, 2)
            dets.append(([*xy, *(xy + wh)], rng.choice(cat_ids)))
        dets = dets[:n_slots]
        for k, (box, cat) in enumerate(dets):
            boxes[i, k] = box
            cats[i, k] = cat
            scores[i, k] = rng.uniform(0.05, 1.0)
            valid[i, k] = True
        # Padding slots hold garbage that must not leak through the mask.
        boxes[i, len(dets) :] = rng.uniform(0, 50, (n_slots - len(dets), 4))
        scores[i, len(dets) :] = 0.99
    return np.array(images), boxes, scores, cats, valid


def _reference_results(image_ids, boxes, scores, cats, valid):
    """COCO results list built directly from the padded arrays (xyxy -> xywh in float32)."""
    out = []
    for i, img in enumerate(image_ids):
        for k in np.nonzero(valid[i])[0]:
            x1, y1, x2, y2 = boxes[i, k]
            out.append(
                {
                    "image_id": int(img),
                    "category_id": int(cats[i, k]),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(scores[i, k]),
                }
            )
    return out


def _cocoeval(gt_path, res_list, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        dt = gt.loadRes(res_list)
        ev = COCOeval(gt, dt, iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = sorted(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _write_two_processes(directory, arrays, batch=4):
    """Writes images round-robin by batch to two writers; last batches padded with id -1."""
    image_ids, boxes, scores, cats, valid = arrays
    n = image_ids.shape[0]
    writers = [results.DetectionWriter(directory, p) for p in (0, 1)]
    for b, start in enumerate(range(0, n, batch)):
        sl = slice(start, min(n, start + batch))
        pad = batch - (sl.stop - sl.start)
        ids = np.concatenate([image_ids[sl], -np.ones(pad, np.int64)])
        padded = [np.concatenate([a[sl], a[:pad]]) for a in (boxes, scores, cats, valid)]
        writers[b % 2].add(ids, *padded)
    for w in writers:
        w.close()


@pytest.fixture(scope="module")
def case(gt_path, tmp_path_factory):
    with open(gt_path) as f:
        gt = json.load(f)
    arrays = _synthetic_detections(gt, n_slots=12)
    directory = tmp_path_factory.mktemp("dets")
    _write_two_processes(directory, arrays)
    return gt, arrays, directory


def test_writer_round_trip_two_processes(case):
    gt, arrays, directory = case
    dets = results.read_detections(directory)
    ref = _reference_results(*arrays)
    assert dets.shape[0] == len(ref)
    got = sorted(zip(*(dets[k].tolist() for k in results.DETECTION_DTYPE.names)))
    want = sorted((r["image_id"], r["category_id"], *r["bbox"], r["score"]) for r in ref)
    assert got == want  # exact: same float32 values
    np.testing.assert_array_equal(results.read_image_ids(directory), np.sort(arrays[0]))


def test_writer_detects_incomplete_and_duplicates(tmp_path, case):
    _, (image_ids, boxes, scores, cats, valid), _ = case
    w = results.DetectionWriter(tmp_path, 0)
    w.add(image_ids[:2], boxes[:2], scores[:2], cats[:2], valid[:2])
    with pytest.raises(ValueError, match="added twice"):
        w.add(image_ids[1:3], boxes[1:3], scores[1:3], cats[1:3], valid[1:3])
    w.close()
    w1 = results.DetectionWriter(tmp_path, 1)
    w1.add(image_ids[2:4], boxes[2:4], scores[2:4], cats[2:4], valid[2:4])
    with pytest.raises(RuntimeError, match="not closed"):
        results.read_detections(tmp_path)  # process 1 has not finished
    w1.close()
    assert results.read_detections(tmp_path).shape[0] == valid[:4].sum()
    w2 = results.DetectionWriter(tmp_path, 2)
    w2.add(image_ids[:1], boxes[:1], scores[:1], cats[:1], valid[:1])
    w2.close()
    with pytest.raises(ValueError, match="more than one process"):
        results.read_detections(tmp_path)


def test_to_coco_json_matches_reference_list(tmp_path, case):
    _, arrays, directory = case
    path = tmp_path / "res.json"
    results.to_coco_json(results.read_detections(directory), path)
    with open(path) as f:
        got = json.load(f)
    key = lambda r: (r["image_id"], r["score"], r["category_id"])
    assert sorted(got, key=key) == sorted(_reference_results(*arrays), key=key)


def test_evaluate_coco_matches_pycocotools(gt_path, case):
    gt, arrays, directory = case
    dets = results.read_detections(directory)
    ours = coco_eval.evaluate_coco(gt_path, dets)
    ref_list = _reference_results(*arrays)
    stats = _cocoeval(gt_path, ref_list)
    names = coco_eval.metric_names(100)
    for name, s in zip(names, stats):
        want = s * 100 if s >= 0 else math.nan
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=1e-9, err_msg=name)
    assert 5 < ours["AP"] < 95  # a non-trivial operating point

    # Splits: COCOeval restricted to each split's categories (categories without GT drop out).
    splits = {c["id"]: c["split"] for c in gt["categories"]}
    for split in ("novel", "base"):
        cat_ids = [c for c, s in splits.items() if s == split]
        want = _cocoeval(gt_path, ref_list, cat_ids)[1] * 100
        np.testing.assert_allclose(ours[f"AP50/{split}"], want, atol=1e-9, err_msg=split)
    np.testing.assert_allclose(ours["AP50/all"], stats[1] * 100, atol=1e-9)
    assert ours["AP50/novel"] != ours["AP50/base"]

    # An explicit split map with "excluded" categories: "all" leaves them out.
    cat_ids = sorted(splits)
    custom = {
        c: ("excluded" if i % 3 == 0 else "seen" if i % 3 == 1 else "unseen")
        for i, c in enumerate(cat_ids)
    }
    ours = coco_eval.evaluate_coco(gt_path, dets, category_splits=custom)
    assert set(ours) >= {"AP50/seen", "AP50/unseen", "AP50/all"} and "AP50/excluded" not in ours
    for split in ("seen", "unseen"):
        want = _cocoeval(gt_path, ref_list, [c for c, s in custom.items() if s == split])[1] * 100
        np.testing.assert_allclose(ours[f"AP50/{split}"], want, atol=1e-9, err_msg=split)
    kept = [c for c, s in custom.items() if s != "excluded"]
    np.testing.assert_allclose(
        ours["AP50/all"], _cocoeval(gt_path, ref_list, kept)[1] * 100, atol=1e-9
    )
    table = coco_eval.format_table(ours)
    assert "AP50/seen" in table and f"{ours['AP']:.3f}" in table


def test_evaluate_coco_subset_of_images(gt_path, case):
    gt, arrays, directory = case
    dets = results.read_detections(directory)
    keep_imgs = arrays[0][:10]
    sub = dets[np.isin(dets["image_id"], keep_imgs)]
    ours = coco_eval.evaluate_coco(gt_path, sub, image_ids=keep_imgs)
    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO(gt_path)
        ev = COCOeval(cgt, cgt.loadRes(results.to_coco_results(sub)), iouType="bbox")
        ev.params.imgIds = sorted(keep_imgs.tolist())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    np.testing.assert_allclose(ours["AP"], ev.stats[0] * 100, atol=1e-9)


def test_evaluate_coco_empty_detections(gt_path):
    with pytest.warns(UserWarning, match="no detections"):
        out = coco_eval.evaluate_coco(gt_path, np.zeros((0,), results.DETECTION_DTYPE))
    assert out["AP"] == 0.0 and out["AP50/novel"] == 0.0 and out["AR100"] == 0.0
    assert set(out) == {*coco_eval.metric_names(100), "AP50/base", "AP50/novel", "AP50/all"}


def test_detections_on_unknown_image_rejected(gt_path, case):
    _, _, directory = case
    dets = results.read_detections(directory)[:3].copy()
    dets["image_id"][0] = 10_000
    with pytest.raises(ValueError, match="missing from the ground truth"):
        coco_eval.evaluate_coco(gt_path, dets)
