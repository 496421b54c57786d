"""The detection trainers end to end on generated ShapesWorld (tiny random models): a class-agnostic
RPN trains and exports, the OVD detector fine-tunes on base classes with that RPN frozen and is
evaluated with pycocotools, and zero-shot inference with GT boxes runs without training."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import experiment_config

from regionclip_jax import config as config_lib
from regionclip_jax.convert import rpn as rpn_format
from regionclip_jax.train import detection_trainer, rpn_trainer

REPO = Path(__file__).resolve().parents[1]


def _config(name: str, arg: str):
    return experiment_config(name, arg)


@pytest.fixture(scope="module")
def trained_rpn(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpn")
    cfg = _config("rpn_shapesworld", f"runlocal,data={root / 'sw'}")
    result = rpn_trainer.run(cfg, str(root / "work"))
    return root, cfg, result


def test_rpn_trains_exports_and_reports_recall(trained_rpn):
    root, _, result = trained_rpn
    assert result.step == 4 and all(math.isfinite(v) for v in result.losses.values())
    export = root / "work" / "export"
    arch = json.loads((export / "rpn.json").read_text())
    assert arch["kind"] == "clip" and (export / "params.npz").is_file()
    for side in ("base", "novel"):
        assert 0.0 <= result.metrics[f"eval/recall@100/{side}"] <= 1.0


def test_ovd_finetuning_with_the_frozen_rpn(trained_rpn, tmp_path):
    root, _, _ = trained_rpn
    cfg = _config("detect_shapesworld", f"runlocal,data={root / 'sw'}")
    with cfg.unlocked():
        cfg.detect.rpn_init = str(root / "work")
    result = detection_trainer.run(cfg, str(tmp_path / "det"))
    assert result.step == 4 and all(math.isfinite(v) for v in result.losses.values())
    # The offline RPN and the class embeddings are frozen: they leave training unchanged.
    arch = config_lib.rpn_arch_from_init(str(root / "work"), cfg)
    rpn_params, _ = rpn_format.load_rpn_weights(arch)
    trained = jax.device_get(result.state) if result.state is not None else None
    if trained is not None:
        got = jax.tree.leaves(trained["params"]["rpn"])
        want = jax.tree.leaves(rpn_params)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))
    # 7 base shapes trained, all 10 evaluated; the metrics are pycocotools'.
    for key in ("eval/AP", "eval/AP50", "eval/AP50/novel", "eval/AP50/base", "eval/AP50/all"):
        assert key in result.metrics
    metrics_file = tmp_path / "det" / "eval" / "4" / "metrics.json"
    assert json.loads(metrics_file.read_text())["AP50/all"] == pytest.approx(
        result.metrics["eval/AP50/all"]
    )


def test_zero_shot_with_gt_boxes(tmp_path):
    cfg = _config("zeroshot_coco", "proposals=gt,runlocal")
    with cfg.unlocked():
        cfg.data.shapesworld.dir = str(tmp_path / "sw")
    result = detection_trainer.run(cfg, str(tmp_path / "zs"))
    assert result.step == 0 and {"AP50/novel", "AP50/base", "AP"} <= set(result.metrics)
    assert os.path.isfile(tmp_path / "zs" / "eval" / "metrics.json")


def test_frozen_patterns_freeze_every_norm_and_the_stages_of_freeze_at():
    import re

    paths = {
        "detector/visual/bn1/scale": (True, True),  # (frozen at freeze_at 0, at 2)
        "detector/visual/conv1/kernel": (False, True),
        "detector/visual/layer1/0/conv1/kernel": (False, True),
        "detector/visual/layer2/0/bn3/bias": (True, True),
        "detector/visual/layer3/0/downsample/1/scale": (True, True),
        "detector/visual/layer3/0/downsample/0/kernel": (False, False),
        "detector/visual/attnpool/c_proj/kernel": (False, False),
        "detector/train_embeddings": (True, True),
        "rpn/head/conv/kernel": (True, True),
    }
    for i, freeze_at in enumerate((0, 2)):
        pats = [re.compile(p) for p in detection_trainer.frozen_patterns(freeze_at)]
        got = {p: any(r.search(p) for r in pats) for p in paths}
        assert got == {p: v[i] for p, v in paths.items()}, freeze_at
