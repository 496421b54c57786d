r"""Open-vocabulary detection on LVIS v1 (866 base / 337 rare), RegionCLIP RN50x4 (spec §5.1).

Launch:

  python -m regionclip_jax.main --config=configs/ovd_lvis_rn50x4.py \
      --workdir=runs/ovd_lvis_rn50x4 \
      --config.model.init=checkpoints/regionclip_rn50x4 \
      --config.detect.rpn_init=checkpoints/rpn_lvis_866_lsj.pth

Before: the RegionCLIP RN50x4 checkpoint converted (`regionclip-jax convert`), the original's
LVIS RPN (R50-FPN trained on the 866 base classes) and LVIS v1 under data/lvis
(lvis_v1_{train,val}.json, images/ holding the COCO 2017 train and val images).

Recipe (the original's LVISv1 CLIP_fast_rcnn_R_50_C4.yaml): batch 16, lr 0.002, warmup 5k, x0.1 at
120k and 160k, 180k steps; repeat-factor sampling (threshold 0.001); at most 500 GT per image;
RoIAlign 18; weighted CE with background weight 0.8 (no focal scaling); class-agnostic mask head;
test with RPN-score fusion sqrt(p x objectness logit), score threshold 0.02, soft-NMS, 300
detections; metrics AP, APr (headline), APc, APf.
Other batches: lr = 0.002 x batch / 16, steps x 16 / batch.

Masks: the original's LVIS detectors are Mask R-CNN models (MASK_ON): the class-agnostic mask head
trains on the GT masks that `make-shards detection` keeps from the LVIS polygons (at
`detect.mask_scale` 0.25 of the canvas: a documented approximation of detectron2's full-resolution
bitmaps, docs/data.md), and evaluation prints LVIS mask AP (`segm/AP`, `segm/APr`, `segm/APc`,
`segm/APf`) beside box AP. The paper reports box APr / APc / APf / AP (RN50x4: 22.0 / 32.1 / 36.9 /
32.3) and mask AP in its Table 2 (values not in spec §8.1). With a released LVIS checkpoint
converted by `regionclip-jax convert-regionclip` (its mask head is converted and loaded when
mask_on), `--config.detect.eval_only=True` evaluates it; the released `bbox_pred` is not loaded
into the detector yet (the trainer starts box regression from scratch), so eval-only box and mask
AP of the released weights are without their box refinement.

Variants: runlocal, batch=N, init=DIR, rpn=PATH, root=DIR (as configs/ovd_coco_rn50.py).
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    return common.paper_detection_config(
        arg, task="lvis", name="rn50x4", preset="RN50x4", pooler_resolution=18
    )
