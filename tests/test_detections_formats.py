"""`Detections` in the shapes other tools expect, and `classify --format`.

- `to_pipeline()`: Hugging Face transformers' zero-shot-object-detection list; its boxes are int
  pixels truncated toward zero (transformers' `box.int()`), checked on values just below integers.
- `to_coco()`: COCO results (bbox xywh, category ids 1..K or a mapping, RLE masks), checked by
  arithmetic here and by pycocotools (`COCO.loadRes` accepts them, `annToMask` gives the masks).
- `classify --format pipeline|coco` on a tiny random checkpoint equals these conversions of
  `RegionCLIP.detect`'s arrays (the default output, unchanged, is tests/test_inference_cli.py's).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import TINY_CLIP
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from regionclip_jax.inference.commands import main
from regionclip_jax.inference.recognizer import Detections

NAMES = ["cat", "dog", "red car"]
BOXES = np.array(
    [[10.999, 0.0, 40.5, 30.9999], [0.2, 5.7, 63.0, 47.999], [3.0, 4.0, 7.25, 9.5]], np.float32
)
SCORES = np.array([0.9, 0.5, 0.25], np.float32)
LABELS = np.array([2, 0, 2], np.int32)


def _expected_pipeline(boxes, scores, labels, names):
    return [
        {
            "score": float(s),
            "label": names[int(k)],
            "box": {
                "xmin": math.floor(b[0]),
                "ymin": math.floor(b[1]),
                "xmax": math.floor(b[2]),
                "ymax": math.floor(b[3]),
            },
        }
        for b, s, k in zip(boxes.tolist(), scores.tolist(), labels.tolist())
    ]


def _coco_gt(image_ids, hw, names):
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": hw[0], "width": hw[1]} for i in image_ids],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
        "annotations": [],
    }
    gt.createIndex()
    return gt


def test_to_pipeline_truncates_like_transformers():
    dets = Detections(BOXES, SCORES, LABELS, NAMES)
    got = dets.to_pipeline()
    assert got == _expected_pipeline(BOXES, SCORES, LABELS, NAMES)
    assert got[0]["box"] == {"xmin": 10, "ymin": 0, "xmax": 40, "ymax": 30}
    assert all(type(v) is int for d in got for v in d["box"].values())
    assert json.loads(json.dumps(got)) == got
    assert (
        Detections(np.zeros((0, 4), np.float32), SCORES[:0], LABELS[:0], NAMES).to_pipeline() == []
    )


# pycocotools' RLE decoding warns under NumPy 2 (its own `__array__`), not our code.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
def test_to_coco_boxes_ids_and_masks_load_in_pycocotools():
    h, w = 50, 64
    masks_np = []
    for x1, y1, x2, y2 in BOXES:
        m = np.zeros((h, w), np.uint8, order="F")
        m[int(y1) : int(math.ceil(y2)), int(x1) : int(math.ceil(x2))] = 1
        masks_np.append(m)
    rles = []
    for m in masks_np:
        r = mask_utils.encode(np.asfortranarray(m))
        rles.append({"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()})
    dets = Detections(BOXES, SCORES, LABELS, NAMES, masks=rles)

    got = dets.to_coco(7)
    assert len(got) == 3
    for d, b, s, k in zip(got, BOXES.tolist(), SCORES.tolist(), LABELS.tolist()):
        assert d["image_id"] == 7 and d["category_id"] == k + 1
        np.testing.assert_allclose(d["bbox"], [b[0], b[1], b[2] - b[0], b[3] - b[1]], rtol=1e-6)
        assert d["score"] == pytest.approx(s)
    ids = {"cat": 17, "dog": 18, "red car": 3}
    assert [d["category_id"] for d in dets.to_coco(7, ids)] == [3, 17, 3]
    with pytest.raises(ValueError, match="red car"):
        dets.to_coco(7, {"cat": 1})

    gt = _coco_gt([7], (h, w), NAMES)
    res = gt.loadRes(json.loads(json.dumps(got)))
    anns = res.loadAnns(res.getAnnIds(imgIds=[7]))
    assert len(anns) == 3
    for a, d, m in zip(anns, got, masks_np):
        assert a["bbox"] == d["bbox"] and a["category_id"] == d["category_id"]
        np.testing.assert_array_equal(res.annToMask(a), m)
    # Without masks: no "segmentation"; loadRes makes the box polygon itself.
    plain = Detections(BOXES, SCORES, LABELS, NAMES).to_coco(7)
    assert all("segmentation" not in d for d in plain)
    assert len(gt.loadRes(plain).getAnnIds()) == 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.convert.regionclip import RegionCLIPWeights, save_regionclip
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models import CLIPConfig

    tmp = tmp_path_factory.mktemp("formats")
    ckpt = save_regionclip(
        RegionCLIPWeights(clip=random_clip(CLIPConfig(**TINY_CLIP)), heads={}), tmp / "ckpt"
    )
    rng = np.random.RandomState(0)
    images = [str(tmp / "000000000042.png"), str(tmp / "7.png")]
    for path, shape in zip(images, ((90, 120, 3), (90, 120, 3))):
        Image.fromarray((rng.rand(*shape) * 255).astype(np.uint8)).save(path)
    boxes = [[2.5, 3.25, 60.75, 50.5], [10, 10, 70.9, 80.1], [0, 0, 119.5, 89.5]]
    (tmp / "boxes.json").write_text(json.dumps(boxes))
    argv = ["classify", "--checkpoint", str(ckpt), "--cache-dir", str(tmp / "cache")]
    argv += ["--min-size", "64", "--max-size", "96", "--image", *images]
    argv += ["--boxes", str(tmp / "boxes.json"), "--vocabulary", ",".join(NAMES)]
    argv += ["--score-thresh", "0", "--quiet"]
    return tmp, ckpt, images, boxes, argv


def test_classify_formats(env):
    from regionclip_jax.inference import RegionCLIP

    tmp, ckpt, images, boxes, argv = env
    model = RegionCLIP.from_checkpoint(ckpt, min_size=64, max_size=96, cache_dir=tmp / "cache")
    want = [model.detect(img, NAMES, boxes=boxes, score_thresh=0.0) for img in images]
    assert all(len(d) > 3 for d in want)

    assert main([*argv, "--format", "pipeline", "--out", str(tmp / "pipe.json")]) == 0
    pipe = json.loads((tmp / "pipe.json").read_text())
    assert pipe["classes"] == NAMES
    for r, d in zip(pipe["results"], want):
        assert "regions" not in r
        exp = _expected_pipeline(d.boxes, d.scores, d.labels, NAMES)
        assert [x["box"] for x in r["detections"]] == [x["box"] for x in exp]
        assert [x["label"] for x in r["detections"]] == [x["label"] for x in exp]
        np.testing.assert_allclose([x["score"] for x in r["detections"]], d.scores, rtol=1e-6)

    assert main([*argv, "--format", "coco", "--out", str(tmp / "coco.json")]) == 0
    coco = json.loads((tmp / "coco.json").read_text())
    assert isinstance(coco, list) and len(coco) == sum(len(d) for d in want)
    # Image ids: the numbers in the file names (COCO style).
    gt = _coco_gt([42, 7], (90, 120), NAMES)
    res = gt.loadRes(str(tmp / "coco.json"))
    for image_id, d in zip((42, 7), want):
        anns = [a for a in coco if a["image_id"] == image_id]
        assert len(res.getAnnIds(imgIds=[image_id])) == len(d)
        assert [a["category_id"] for a in anns] == (d.labels + 1).tolist()
        xywh = np.concatenate([d.boxes[:, :2], d.boxes[:, 2:] - d.boxes[:, :2]], axis=1)
        np.testing.assert_allclose([a["bbox"] for a in anns], xywh, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose([a["score"] for a in anns], d.scores, rtol=1e-6)


def test_classify_coco_needs_a_json_out(env, capsys):
    tmp, _, _, _, argv = env
    capsys.readouterr()
    assert main([*argv, "--format", "coco", "--out", str(tmp / "c.jsonl")]) == 2
    assert "give a .json --out" in capsys.readouterr().err
