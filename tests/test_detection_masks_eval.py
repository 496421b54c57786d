"""The `detect` trainer's evaluation with a mask head, end to end on generated ShapesWorld.

Zero-shot with GT boxes (no training) and a random mask head: the detections carry pasted RLE
masks (streamed beside them), the mask AP (`segm/...`) is reported beside the box AP, and it
equals pycocotools' COCOeval(segm) run directly on the streamed detections and masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_detection_trainer import _config

from regionclip_jax.eval import results
from regionclip_jax.train import detection_trainer


def test_zero_shot_with_mask_head_reports_mask_ap(tmp_path):
    cfg = _config("zeroshot_coco", "proposals=gt,runlocal")
    with cfg.unlocked():
        cfg.data.shapesworld.dir = str(tmp_path / "sw")
        cfg.detect.mask_on = True
    result = detection_trainer.run(cfg, str(tmp_path / "zs"))
    m = result.metrics
    assert {"AP", "AP50/novel", "segm/AP", "segm/AP50/novel", "segm/AP50/all"} <= set(m)
    out = tmp_path / "zs" / "eval"
    dets = results.read_detections(out)
    masks = results.read_masks(out)
    assert masks is not None and len(masks) == len(dets) > 0
    # Every mask has its image's size; a detection's mask lies within its box grown by 1 pixel.
    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.dataset = json.loads((tmp_path / "sw/annotations/instances_val.json").read_text())
        coco.createIndex()
    assert all(a.get("segmentation") for a in coco.dataset["annotations"])
    for d, rle in zip(dets[:50], masks[:50]):
        img = coco.imgs[int(d["image_id"])]
        assert rle["size"] == [img["height"], img["width"]]
        x, y, w, h = mask_utils.toBbox(rle)
        if mask_utils.area(rle):
            assert x >= d["x"] - 1.5 and y >= d["y"] - 1.5
            assert x + w <= d["x"] + d["w"] + 1.5 and y + h <= d["y"] + d["h"] + 1.5
    # segm metrics = pycocotools on the streamed results.
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results.to_coco_results(dets, masks)), iouType="segm")
        ev.params.maxDets = [1, 10, int(cfg.detect.topk)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    want = 100 * ev.stats[0] if ev.stats[0] >= 0 else math.nan
    np.testing.assert_allclose(m["segm/AP"], want, rtol=0, atol=1e-9)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["segm/AP"] == m["segm/AP"]
