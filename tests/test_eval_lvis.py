"""LVIS federated box evaluation: a hand-worked example, pycocotools, and the official lvis-api.

1. `test_worked_example`: a two-image set whose every number is derived by hand below.
2. `test_matches_cocoeval_when_exhaustive`: with every absent category listed as negative and
   nothing "not exhaustive", the federated protocol reduces to COCO's; pycocotools' COCOeval
   (no crowd, < 100 detections per image) must then give the same AP/AP50/AP75/APs/APm/APl/AR.
3. `test_matches_lvis_api` (PyTorch-reference leg: needs the `lvis` 0.5.3 package from
   requirements-dev.txt): a random LVIS-style set with negative, not-exhaustive and unlisted
   categories, an image over the 300-detection limit, all sizes; every number against lvis-api's
   LVISEval, which needs a NumPy 2 shim (`np.float`) set only inside the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from regionclip_jax.eval import lvis as lvis_eval
from regionclip_jax.eval import results

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _dets(rows):
    """rows of (image_id, category_id, [x, y, w, h], score) -> DETECTION_DTYPE."""
    return results.detections_from_coco_results(
        [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in rows]
    )


# All GT boxes are 40 x 40 (area 1600: "medium"), so APs/APl have no GT (nan) and APm = AP.
WORKED_GT = {
    "images": [
        # Image 1: category 3 verified absent; category 2's annotation is not exhaustive.
        {"id": 1, "neg_category_ids": [3], "not_exhaustive_category_ids": [2]},
        # Image 2: categories 1 and 4 verified absent; category 2 not listed at all.
        {"id": 2, "neg_category_ids": [1, 4], "not_exhaustive_category_ids": []},
    ],
    "categories": [
        {"id": 1, "name": "f1", "frequency": "f"},
        {"id": 2, "name": "c2", "frequency": "c"},
        {"id": 3, "name": "r3", "frequency": "r"},
        {"id": 4, "name": "c4", "frequency": "c"},  # no GT anywhere
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600},  # A
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600},  # B
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 50, 40, 40], "area": 1600},  # C
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600},  # D
    ],
}
WORKED_DETS = [
    (1, 4, [0, 0, 40, 40], 0.99),  # d7: category 4 unlisted on image 1 -> dropped
    (1, 2, [60, 0, 35, 35], 0.95),  # d5: unmatched, category 2 not exhaustive -> ignored
    (1, 1, [0, 0, 40, 40], 0.90),  # d1: = A, TP at every IoU
    (1, 1, [60, 0, 35, 35], 0.85),  # d3: disjoint from A, B -> FP
    (1, 1, [50, 50, 40, 29], 0.80),  # d2: IoU(B) = 1160/1600 = 0.725: TP at .50-.70, FP at .75-.95
    (1, 2, [0, 50, 40, 40], 0.70),  # d4: = C, TP
    (1, 3, [0, 0, 40, 40], 0.60),  # d6: category 3 negative on image 1 -> FP
    (2, 3, [10, 10, 40, 40], 0.50),  # d9: = D, TP
    (2, 1, [0, 0, 40, 40], 0.95),  # d10: category 1 negative on image 2 -> FP
    (2, 2, [0, 0, 40, 40], 0.99),  # d11: category 2 unlisted on image 2 -> dropped
    (2, 4, [0, 0, 40, 40], 0.30),  # d12: category 4 negative on image 2, but no GT -> no AP
]


def test_worked_example():
    """Hand computation (101 recall points r = 0, .01, ..., 1; precision envelope from the right).

    Category 1 (f; GT A, B): ranked d10 FP, d1 TP, d3 FP, d2.
      IoU .50-.70 (5 thresholds): FP TP FP TP: recall 0 .5 .5 1, precision 0 .5 1/3 .5,
        envelope .5 everywhere -> AP_t = .5; recall 1.
      IoU .75-.95 (5): FP TP FP FP: recall 0 .5 .5 .5, envelope .5 .5 1/3 .25; r <= .5 (51
        points) -> .5, r > .5 -> 0; AP_t = 25.5/101; recall .5.
      AP_1 = (5 * .5 + 5 * 25.5/101) / 10 = .25 + 12.75/101;  AP50_1 = .5;  AP75_1 = 25.5/101.
    Category 2 (c; GT C): d11 dropped (unlisted), d5 ignored (not exhaustive), d4 TP -> AP = 1
      at every IoU (with d11 or d5 counted as FP it would be .5); recall 1.
    Category 3 (r; GT D): d6 FP (negative on image 1), d9 TP -> envelope .5 -> AP = .5; recall 1.
    Category 4 (c): no GT -> precision -1, left out of AP and APc (d12 changes nothing).
    AP = (AP_1 + 1 + .5) / 3; AP50 = (.5 + 1 + .5) / 3; AP75 = (25.5/101 + 1 + .5) / 3;
    APr = .5; APc = 1; APf = AP_1; APm = AP; APs = APl = nan; AR = (.75 + 1 + 1) / 3.
    """
    out = lvis_eval.evaluate_lvis(WORKED_GT, _dets(WORKED_DETS))
    ap1 = 0.25 + 12.75 / 101
    want = {
        "AP": (ap1 + 1.5) / 3,
        "AP50": 2 / 3,
        "AP75": (25.5 / 101 + 1.5) / 3,
        "APs": math.nan,
        "APm": (ap1 + 1.5) / 3,
        "APl": math.nan,
        "APr": 0.5,
        "APc": 1.0,
        "APf": ap1,
        "AR": 2.75 / 3,
    }
    for k, v in want.items():
        np.testing.assert_allclose(out[k], 100 * v, rtol=1e-12, err_msg=k)

    # Per-image limit before federated filtering: with max_dets = 5, image 1 keeps d7 d5 d1 d3 d2
    # (d7 takes a slot although it is dropped later) and loses d4, d6. Category 2 then has only
    # the ignored d5: AP 0. Category 3 has only d9: AP 1. AP = (AP_1 + 0 + 1) / 3.
    out = lvis_eval.evaluate_lvis(WORKED_GT, _dets(WORKED_DETS), max_dets=5)
    np.testing.assert_allclose(out["AP"], 100 * (ap1 + 1) / 3, rtol=1e-12)
    np.testing.assert_allclose(out["APc"], 0.0, atol=1e-12)
    np.testing.assert_allclose(out["APr"], 100.0, rtol=1e-12)


def test_equal_iou_goes_to_later_gt():
    """GT1 = [0, 0, 40, 40], GT2 = [16, 0, 40, 40] (json order); d1 = [8, 0, 40, 40] (score .9) has
    IoU 1280/1920 = 2/3 with both, d2 = GT1 (score .8) has IoU 960/2240 = .43 with GT2.

    IoU .50-.65 (4 thresholds): d1 takes the later GT2, d2 takes GT1: TP TP -> AP_t = 1 (taking
      GT1 first would leave d2 a FP: 51/101).
    IoU .70-.95 (6): d1 FP, d2 TP -> envelope .5 up to recall .5 -> AP_t = 25.5/101.
    AP = (4 + 6 * 25.5/101) / 10.
    """
    gt = {
        "images": [{"id": 1, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "frequency": "f"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [16, 0, 40, 40], "area": 1600},
        ],
    }
    dets = _dets([(1, 1, [8, 0, 40, 40], 0.9), (1, 1, [0, 0, 40, 40], 0.8)])
    out = lvis_eval.evaluate_lvis(gt, dets)
    np.testing.assert_allclose(out["AP"], 100 * (4 + 6 * 25.5 / 101) / 10, rtol=1e-12)


def test_empty_detections_and_unknown_image():
    with pytest.warns(UserWarning, match="no detections"):
        out = lvis_eval.evaluate_lvis(WORKED_GT, _dets([]))
    assert out["AP"] == 0.0 and out["APr"] == 0.0 and math.isnan(out["APs"])
    with pytest.raises(ValueError, match="missing from the ground truth"):
        lvis_eval.evaluate_lvis(WORKED_GT, _dets([(7, 1, [0, 0, 4, 4], 0.5)]))


def _random_set(seed, num_images=16, num_cats=12, exhaustive=False):
    """A random LVIS-style GT dict and detections list (COCO results format), all box sizes."""
    rng = np.random.default_rng(seed)
    freqs = ["r", "c", "f"]
    cats = [{"id": 3 * k + 2, "name": f"c{k}", "frequency": freqs[k % 3]} for k in range(num_cats)]
    cat_ids = [c["id"] for c in cats]
    images, anns, dets = [], [], []
    for i in range(num_images):
        img_id = 10 + 7 * i
        pos = set(rng.choice(cat_ids, rng.integers(1, 4), replace=False).tolist())
        for c in pos:
            for _ in range(rng.integers(1, 4)):
                s = float(np.exp(rng.uniform(np.log(12), np.log(200))))  # small .. large
                wh = [s * rng.uniform(0.6, 1.4), s * rng.uniform(0.6, 1.4)]
                xy = rng.uniform(0, 300, 2).tolist()
                box = [*xy, *wh]
                # Json area is the mask area: smaller than the box.
                area = wh[0] * wh[1] * rng.uniform(0.5, 1.0)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": img_id,
                        "category_id": c,
                        "bbox": box,
                        "area": area,
                    }
                )
                for _ in range(rng.integers(0, 3)):
                    j = rng.normal(0, 0.15, 4) * [wh[0], wh[1], wh[0], wh[1]]
                    dets.append(
                        (img_id, c, [xy[0] + j[0], xy[1] + j[1], wh[0] + j[2], wh[1] + j[3]])
                    )
        rest = [c for c in cat_ids if c not in pos]
        if exhaustive:
            neg, nel = rest, []
        else:
            neg = rng.choice(rest, rng.integers(0, 4), replace=False).tolist()
            nel = [c for c in pos if rng.random() < 0.4]
        images.append({"id": img_id, "neg_category_ids": neg, "not_exhaustive_category_ids": nel})
        for _ in range(rng.integers(2, 12)):  # FPs on positive, negative and unlisted categories
            s = float(np.exp(rng.uniform(np.log(8), np.log(150))))
            dets.append(
                (img_id, int(rng.choice(cat_ids)), [*rng.uniform(0, 300, 2).tolist(), s, s])
            )
    # One image over the 300 limit.
    for _ in range(0 if exhaustive else 320):
        img_id = images[0]["id"]
        dets.append((img_id, int(rng.choice(cat_ids)), [*rng.uniform(0, 300, 2).tolist(), 30, 30]))
    gt = {"images": images, "categories": cats, "annotations": anns}
    scores = rng.uniform(0.01, 1.0, len(dets)).astype(np.float32)
    res = [
        {
            "image_id": i,
            "category_id": c,
            "bbox": [float(v) for v in np.float32(b)],
            "score": float(s),
        }
        for (i, c, b), s in zip(dets, scores)
    ]
    return gt, res


def test_matches_cocoeval_when_exhaustive():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, res = _random_set(1, exhaustive=True)
    # Under 100 detections per image: COCO's per-(image, category) cap of 100 and LVIS's per-image
    # cap of 300 are both inactive, so the default maxDets (1, 10, 100) compares like for like.
    assert max(np.unique([r["image_id"] for r in res], return_counts=True)[1]) < 100
    ours = lvis_eval.evaluate_lvis(gt, results.detections_from_coco_results(res))
    coco_gt = dict(gt, annotations=[dict(a, iscrowd=0) for a in gt["annotations"]])
    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO()
        cgt.dataset = coco_gt
        cgt.createIndex()
        ev = COCOeval(cgt, cgt.loadRes([dict(r) for r in res]), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for name, s in zip(names, ev.stats[:6]):
        np.testing.assert_allclose(ours[name], 100 * s, rtol=0, atol=1e-9, err_msg=name)
    for name, s in zip(("AR", "ARs", "ARm", "ARl"), ev.stats[8:12]):
        np.testing.assert_allclose(ours[name], 100 * s, rtol=0, atol=1e-9, err_msg=name)
    assert 5 < ours["AP"] < 95


@pytest.mark.torch_ref
@pytest.mark.filterwarnings("ignore::DeprecationWarning:lvis.*")
@pytest.mark.parametrize("seed", [0, 2])
def test_matches_lvis_api(tmp_path, monkeypatch, seed):
    lvis = pytest.importorskip("lvis", reason="lvis 0.5.3 (requirements-dev.txt) not installed")
    # lvis-api 0.5.3 uses np.float, removed in NumPy 1.24.
    monkeypatch.setattr(np, "float", float, raising=False)

    gt, res = _random_set(seed)
    ours = lvis_eval.evaluate_lvis(gt, results.detections_from_coco_results(res))
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    lvis_gt = lvis.LVIS(str(path))
    lvis_dt = lvis.LVISResults(lvis_gt, [dict(r) for r in res], max_dets=300)
    ev = lvis.LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.run()
    ref = ev.get_results()
    ref_names = {"AR": "AR@300", "ARs": "ARs@300", "ARm": "ARm@300", "ARl": "ARl@300"}
    for name in (*KEYS, "AR", "ARs", "ARm", "ARl"):
        r = ref[ref_names.get(name, name)]
        want = 100 * r if r > -1 else math.nan
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=1e-9, err_msg=name)
    assert not any(math.isnan(ours[k]) for k in KEYS)  # every slice populated
    # Per-category precision arrays agree too.
    full = lvis_eval.evaluate_lvis(
        gt, results.detections_from_coco_results(res), return_arrays=True
    )
    np.testing.assert_allclose(full["precision"], ev.eval["precision"], rtol=0, atol=1e-12)
