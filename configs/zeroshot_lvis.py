r"""Zero-shot detection on LVIS v1 (1203 classes) with a pretrained RegionCLIP (spec §6.2).

Launch:

  python -m regionclip_jax.main --config=configs/zeroshot_lvis.py:proposals=gt \
      --workdir=runs/zeroshot_lvis_gt --config.model.init=checkpoints/regionclip_rn50

The original's LVISv1 CLIP_fast_rcnn_R_50_C4_zsinf.yaml: 1203-class embeddings, NO_BOX_DELTA,
NMS 0.5, 300 detections, score threshold 0.0001 (GT boxes) or 0.02 (RPN, scores fused with the
LVIS-866 RPN's objectness logit, RPN NMS 0.9); metrics AP, APr, APc, APf.

Variants (`:ARGS`): proposals=gt|rpn, model=rn50|rn50x4, runlocal, init=DIR, rpn=PATH, root=DIR.
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    a, rest = common.pop_args(arg, proposals="gt", model="rn50")
    preset, pooler = {"rn50": ("RN50", 14), "rn50x4": ("RN50x4", 18)}[a.model]
    return common.paper_detection_config(
        rest,
        task="lvis",
        name=a.model,
        preset=preset,
        pooler_resolution=pooler,
        eval_only=True,
        proposals=a.proposals,
    )
