"""eval.confusion: the class of the best-scoring overlapping detection per GT object, checked on a
hand-built example whose answers are worked out below."""

from __future__ import annotations

import json

import numpy as np

from regionclip_jax.eval import confusion as cf
from regionclip_jax.eval.results import DetectionWriter

GT = {
    "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
    "categories": [
        {"id": 1, "name": "circle", "split": "base"},
        {"id": 2, "name": "star", "split": "novel"},
        {"id": 3, "name": "heart", "split": "novel"},
    ],
    "annotations": [
        # image 1: a star at [0,0,20,20] and a heart at [50,50,70,70]
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "iscrowd": 0},
        # image 2: a star nothing overlaps enough, a circle, and a crowd star (skipped)
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [60, 0, 30, 30], "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 2, "bbox": [30, 30, 10, 10], "iscrowd": 1},
    ],
}


def _write(directory):
    # xyxy boxes, per image: (box, score, category id)
    dets = {
        1: [
            ([0, 0, 20, 20], 0.6, 3),  # star -> heart (IoU 1, score 0.6) ...
            ([1, 1, 20, 20], 0.9, 2),  # ... but this star box (IoU 0.9025) scores higher: star
            ([0, 0, 40, 40], 0.99, 1),  # IoU 0.25 with the star: too little overlap to count
            ([52, 52, 72, 72], 0.5, 2),  # heart -> star (IoU 324/476 = 0.68)
        ],
        2: [
            ([10, 10, 30, 30], 0.8, 2),  # star at IoU 100/700 = 0.14: the star is missed
            ([60, 0, 90, 30], 0.3, 3),  # circle -> heart
            ([30, 30, 40, 40], 0.9, 1),  # only the crowd star overlaps it
        ],
    }
    n = max(len(v) for v in dets.values())
    boxes = np.zeros((2, n, 4), np.float32)
    scores = np.zeros((2, n), np.float32)
    cats = np.zeros((2, n), np.int32)
    valid = np.zeros((2, n), bool)
    for row, image_id in enumerate((1, 2)):
        for j, (b, s, c) in enumerate(dets[image_id]):
            boxes[row, j], scores[row, j], cats[row, j], valid[row, j] = b, s, c, True
    w = DetectionWriter(directory)
    w.add(np.array([1, 2]), boxes, scores, cats, valid)
    w.close()


def test_confusion_counts_the_hand_worked_example(tmp_path):
    _write(tmp_path / "dets")
    from regionclip_jax.eval.results import read_detections

    counts = cf.confusion(GT, read_detections(tmp_path / "dets"))
    assert counts == {
        ("star", "star"): 1,
        ("heart", "star"): 1,
        ("star", "-"): 1,
        ("circle", "heart"): 1,
    }
    # Only the novel categories; a stricter IoU turns the heart's 0.68 match into a miss.
    novel = cf.confusion(GT, read_detections(tmp_path / "dets"), [2, 3], iou=0.7)
    assert novel == {("star", "star"): 1, ("heart", "-"): 1, ("star", "-"): 1}


def test_confusion_command(tmp_path, capsys):
    _write(tmp_path / "dets")
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    args = ["--gt", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dets")]
    assert cf.main(args + ["--split", "novel"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["heart", "star"]
    assert "star (2): star 1, - 1" in out[1]
