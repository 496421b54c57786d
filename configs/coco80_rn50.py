r"""Fully-supervised detection on COCO-80 from RegionCLIP RN50 (spec §1.5).

Launch:

  python -m regionclip_jax.main --config=configs/coco80_rn50.py \
      --workdir=runs/coco80_rn50 \
      --config.model.init=checkpoints/regionclip_rn50 \
      --config.detect.rpn_init=checkpoints/rpn_coco_80.pth

The original's CLIP_fast_rcnn_R_50_C4_ovd_coco80.yaml: the OVD COCO recipe with all 80 classes in
training and test (no split; no novel classes), RPN trained on all classes (`rpn_coco_80`).

Variants: runlocal, batch=N, init=DIR, rpn=PATH, root=DIR (as configs/ovd_coco_rn50.py).
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    c = common.paper_detection_config(
        arg, task="coco", name="rn50", preset="RN50", pooler_resolution=14, train_classes="all"
    )
    with c.unlocked():
        if not c.data.shapesworld.dir:
            c.detect.split = ""  # all 80 categories, all "base"
    return c
