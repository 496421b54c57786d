"""Executes the two method notebooks end to end in a Jupyter kernel (tests/notebook_runner.py) at
tiny settings, and checks what they wrote and displayed against the files themselves: the
generator's COCO jsons, the metric logs, the raw detections (re-scored with pycocotools).

  shapesworld_method.ipynb  teacher CLIP -> region pretraining -> zero-shot region recognition
  ovd_finetune_coco.ipynb   COCO json -> base/novel split -> shards -> RPN -> OVD fine-tuning -> AP
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAIN_OVERRIDES
from notebook_runner import cell_outputs, has_image_output, run_notebook

from regionclip_jax.data.shapesworld import SHAPES

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
def test_shapesworld_method_notebook(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    # The runlocal sizes of the demo (`demo._shrink`: 32 + 8 images, batch 4, 4 steps) with the
    # tests' tiny CLIP; no held-out iconic images (the teacher's retrieval check is skipped).
    nb = run_notebook(
        "shapesworld_method.ipynb",
        dict(
            OUT_DIR=str(out),
            TEACHER_STEPS=4,
            STUDENT_STEPS=4,
            NUM_ICONIC=32,
            NUM_ICONIC_VAL=0,
            NUM_SCENES=32,
            NUM_VAL_SCENES=8,
            BATCH_SIZE=4,
            CONCEPT_MIN_COUNT=1,
            MODEL_OVERRIDES=dict(TINY_TRAIN_OVERRIDES),
        ),
        tmp_path,
    )
    assert "backend 'cpu', 1 device(s)" in cell_outputs(nb, "setup")
    # Both models exported, at the tiny size the parameters asked for.
    for name in ("teacher", "student"):
        meta = json.loads((out / name / "export" / "model.json").read_text())
        assert meta["config"]["vision_width"] == TINY_TRAIN_OVERRIDES["vision_width"]

    # The table against the saved predictions and the generator's own COCO json: one prediction
    # per ground-truth box, labels as annotated, accuracies recomputed from the predictions.
    val = json.loads((out / "data" / "scenes" / "annotations" / "instances_val.json").read_text())
    cats = {c["id"]: c for c in val["categories"]}
    novel = {c["name"] for c in val["categories"] if c["split"] == "novel"}
    table = json.loads((out / "results.json").read_text())["accuracy"]
    printed = cell_outputs(nb, "table")
    for model in ("teacher", "student"):
        p = np.load(out / f"region_predictions_{model}.npz")
        got = Counter(SHAPES[i] for i in p["labels"])
        assert got == Counter(cats[a["category_id"]]["name"] for a in val["annotations"])
        is_novel = np.array([SHAPES[i] in novel for i in p["labels"]])
        assert is_novel.any() and (~is_novel).any()
        right = p["preds"] == p["labels"]
        want = dict(all=right.mean(), base=right[~is_novel].mean(), novel=right[is_novel].mean())
        assert set(table[model]) == set(want)
        for k, v in want.items():
            assert 0.0 <= table[model][k] <= 1.0
            assert table[model][k] == pytest.approx(v)
        row = next(line for line in printed.splitlines() if line.strip().startswith(model))
        assert [float(x) for x in re.findall(r"([\d.]+)%", row)] == pytest.approx(
            [100 * want[k] for k in ("all", "base", "novel")], abs=0.051
        )
    assert (out / "teacher_vs_student.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert has_image_output(nb)

    # Loss curves: what the notebook plotted is what the trainers logged, every step, finite.
    curves = cell_outputs(nb, "curves")
    for run, key in (("teacher", "loss"), ("student", "loss"), ("student", "loss_img_txt_level")):
        rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        values = [r[key] for r in rows if key in r]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        line = re.search(rf"{run}/{key}: (\d+) points, .* -> ([\d.]+) at step 4$", curves, re.M)
        assert line and int(line[1]) == 4 and float(line[2]) == pytest.approx(values[-1], abs=1e-4)


def _pycocotools_ap50(gt_path, dets) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_path))
    results = [
        dict(
            image_id=int(d["image_id"]),
            category_id=int(d["category_id"]),
            bbox=[float(d["x"]), float(d["y"]), float(d["w"]), float(d["h"])],
            score=float(d["score"]),
        )
        for d in dets
    ]
    ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return 100 * float(ev.stats[1])


@pytest.mark.slow
def test_ovd_finetune_notebook(tmp_path):
    pytest.importorskip("pycocotools")
    out = tmp_path / "out"
    novel = ["star", "heart", "circle"]  # not ShapesWorld's own split (star, cross, heart)
    nb = run_notebook(
        "ovd_finetune_coco.ipynb",
        dict(
            OUT_DIR=str(out),
            NUM_TRAIN=16,
            NUM_VAL=8,
            BATCH_SIZE=4,
            RPN_STEPS=2,
            DETECT_STEPS=1,  # at batch 16: 4 steps at batch 4
            NOVEL_CLASSES=novel,
            NUM_SHOW=2,
        ),
        tmp_path,
    )
    assert "RANDOM weights" in cell_outputs(nb, "checkpoint")

    # The split: the generator's jsons against the notebook's.
    data = out / "data" / "shapesworld"
    train = json.loads((data / "annotations" / "instances_train.json").read_text())
    val = json.loads((data / "annotations" / "instances_val.json").read_text())
    novel_ids = {c["id"] for c in train["categories"] if c["name"] in novel}
    train_base = json.loads((out / "annotations" / "train_base.json").read_text())
    assert {c["id"] for c in train_base["categories"] if c["split"] == "novel"} == novel_ids
    assert train_base["annotations"] == [
        a for a in train["annotations"] if a["category_id"] not in novel_ids
    ]
    val_split = json.loads((out / "annotations" / "val.json").read_text())
    assert val_split["annotations"] == val["annotations"]
    # Shards: training images without a base box are skipped, every val image is kept.
    with_base = {a["image_id"] for a in train_base["annotations"]}
    manifest = json.loads((out / "shards" / "train" / "manifest.json").read_text())
    assert manifest["num_records"] == len(with_base)
    manifest = json.loads((out / "shards" / "val" / "manifest.json").read_text())
    assert manifest["num_records"] == len(val["images"])

    assert json.loads((out / "rpn" / "export" / "rpn.json").read_text())["kind"] == "clip"
    assert "7 train classes, 10 test classes (3 novel)" in cell_outputs(nb, "detect")

    # The AP table: the evaluation's metrics file, and AP50 re-scored from the raw detections.
    metrics = json.loads((out / "detect" / "eval" / "4" / "metrics.json").read_text())
    table = json.loads((out / "ap_table.json").read_text())
    assert set(table["AP50"]) == {"novel", "base", "all"}
    for k, v in table["AP50"].items():
        assert 0.0 <= v <= 100.0 and v == pytest.approx(metrics[f"AP50/{k}"])
    dtype = [("image_id", "<i8"), ("category_id", "<i4")] + [
        (k, "<f4") for k in ("x", "y", "w", "h", "score")
    ]
    dets = np.fromfile(out / "detect" / "eval" / "4" / "detections-p00000.bin", dtype)
    assert len(dets) > 0 and set(dets["image_id"]) <= {im["id"] for im in val["images"]}
    assert table["COCO"]["AP50"] == pytest.approx(
        _pycocotools_ap50(out / "annotations" / "val.json", dets), abs=1e-6
    )
    assert has_image_output(nb)


@pytest.mark.parametrize(
    "name", ["zero_shot_detection.ipynb", "shapesworld_method.ipynb", "ovd_finetune_coco.ipynb"]
)
def test_notebook_opens_with_the_install_cell(name):
    """Read as JSON (no Jupyter needed): the first code cell installs the package, with the torch
    extra, from the repository pyproject.toml names, only when it is not importable (so the suite's
    kernels skip it); the second is the parameters cell; outputs are not committed."""
    import ast
    import tomllib

    root = NOTEBOOKS.parent
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["metadata"].get("tags") for c in code[:2]] == [["install"], ["parameters"]]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    install = "".join(code[0]["source"])
    repository = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]
    assert f'REPOSITORY = "git+{repository["Repository"]}"' in install
    assert 'f"regionclip-jax[torch] @ {REPOSITORY}"' in install
    tree = ast.parse(install)
    guard = next(n for n in tree.body if isinstance(n, ast.If))
    assert ast.unparse(guard.test) == "importlib.util.find_spec('regionclip_jax') is None"
    readme = (root / "README.md").read_text()
    assert f'pip install "regionclip-jax[torch] @ git+{repository["Repository"]}"' in readme
