r"""Zero-shot detection on COCO (65 classes) with a pretrained RegionCLIP: no fine-tuning (spec §6.2).

Launch (ground-truth boxes as proposals, the paper's Table 4 "GT" column):

  python -m regionclip_jax.main --config=configs/zeroshot_coco.py:proposals=gt \
      --workdir=runs/zeroshot_coco_gt --config.model.init=checkpoints/regionclip_rn50

and with RPN proposals (the LVIS-866 FPN RPN, NMS 0.9, scores fused with its objectness logit):

  python -m regionclip_jax.main --config=configs/zeroshot_coco.py:proposals=rpn \
      --workdir=runs/zeroshot_coco_rpn --config.model.init=checkpoints/regionclip_rn50 \
      --config.detect.rpn_init=checkpoints/rpn_lvis_866.pth

The original's CLIP_fast_rcnn_R_50_C4_ovd_zsinf.yaml: 65-class embeddings, NO_BOX_DELTA, NMS 0.5,
score threshold 0.001, 100 detections; metrics AP50 novel / base / all.

Variants (`:ARGS`): proposals=gt|rpn, model=rn50|rn50x4, runlocal, init=DIR, rpn=PATH, root=DIR.
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    a, rest = common.pop_args(arg, proposals="gt", model="rn50")
    preset, pooler = {"rn50": ("RN50", 14), "rn50x4": ("RN50x4", 18)}[a.model]
    return common.paper_detection_config(
        rest,
        task="coco",
        name=a.model,
        preset=preset,
        pooler_resolution=pooler,
        eval_only=True,
        proposals=a.proposals,
    )
