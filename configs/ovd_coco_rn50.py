r"""Open-vocabulary detection on COCO (48 base / 17 novel), RegionCLIP RN50 (spec §5.1).

Launch:

  python -m regionclip_jax.main --config=configs/ovd_coco_rn50.py \
      --workdir=runs/ovd_coco_rn50 \
      --config.model.init=checkpoints/regionclip_rn50 \
      --config.detect.rpn_init=checkpoints/rpn_coco_48.pth

Before: `regionclip-jax convert regionclip_pretrained-cc_rn50.pth checkpoints/regionclip_rn50`
(or the export/ of a `pretrain` run) and the original's RPN `rpn_coco_48.pth` (R50-C4 trained on
the base boxes; it loads as is). COCO 2017 under data/coco (annotations/instances_{train,val}2017.json,
train2017/, val2017/): the jsons are converted into shards under WORKDIR/shards on first use, with
the OVR-CNN split applied (training keeps base boxes only, images without one are skipped).

Recipe (the original's CLIP_fast_rcnn_R_50_C4_ovd.yaml): batch 16, SGD lr 0.002, momentum 0.9,
weight decay 1e-4, warmup 5k, x0.1 at 60k and 80k, 90k steps; shorter side 640-800 (step 32),
longer <= 1333, flips; RoIAlign 14, 512 RoIs per image at 25% foreground; focal-scaled CE (γ 0.5)
with background weight 0.2; L1 box loss; stem + layer1 frozen. Test: 65-class embeddings, shorter
side 800, soft-NMS, 100 detections; metrics AP50 novel / base / all (novel is the headline).
Other batches: lr = 0.002 x batch / 16, steps x 16 / batch (`batch=N` does both).

Variants (`--config=configs/ovd_coco_rn50.py:ARGS`):
  runlocal     tiny random model on generated ShapesWorld (CPU, about a minute)
  batch=N      global batch (scales lr and schedule)
  init=DIR     RegionCLIP checkpoint dir (default checkpoints/regionclip_rn50)
  rpn=PATH     offline RPN (default checkpoints/rpn_coco_48.pth)
  root=DIR     COCO root (default data/coco)
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    return common.paper_detection_config(
        arg, task="coco", name="rn50", preset="RN50", pooler_resolution=14
    )
