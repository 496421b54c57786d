r"""RegionCLIP pretraining, the paper's RN50 recipe on CC3M (spec §4.6; `configs/pretrain/RegionCLIP_RN50.yaml`).

Launch (one host; on a TPU pod or GPU cluster see launch/README.md, same config):

  python -m regionclip_jax.main --config=configs/pretrain_rn50_cc3m.py \
      --workdir=gs://BUCKET/regionclip/pretrain_rn50_cc3m \
      --config.model.init=checkpoints/clip_rn50 \
      --config.data.train=data/cc3m/shards

Before: convert OpenAI's weights (`regionclip-jax convert RN50.pt checkpoints/clip_rn50`),
write CC3M as image-text shards with the offline RPN's 300 proposals per image
(`regionclip-jax make-shards ...`, docs/data.md), and build the concept pool file
(`regionclip-jax concepts --min-count 100 ...`: 4,764 nouns on COCO Captions, which the paper
uses for CC3M too).

Recipe (the original's): global batch 96, SGD momentum 0.9, lr 0.002, weight decay 1e-4, linear
warmup 1,000 iterations from factor 0.001, x0.1 at 300k and 525k, 600k iterations; per-parameter
gradient-norm clipping at 5.0; stem + layer1 frozen; 100 of the 300 stored proposals per image
plus the global box; teacher pseudo-labels over the concept pool at τ 0.01, threshold 0.1;
images resized to shorter side 800 / longer side <= 1333 with random flips, on a 1344 x 1344
canvas; region losses per group of 3 images (one of the original's 32 GPUs); fp32.

LR scaling for other global batches: linear, lr = 0.002 x batch / 96, with the step counts scaled
by 96 / batch so the run sees the same number of samples (the `batch=N` argument does both).

Variants (`--config=configs/pretrain_rn50_cc3m.py:ARGS`):
  runlocal        a tiny random RN50-shaped smoke run on ShapesWorld (CPU, < 1 minute)
  batch=N         global batch (scales lr and the schedule as above)
  init=DIR        converted OpenAI CLIP RN50 (default checkpoints/clip_rn50)
  data=PATH       CC3M image-text shards with proposals (default data/cc3m/shards)
  concepts=FILE   concept pool file (default data/concepts/coco_nouns_4764.txt)
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    return common.paper_pretrain_config(arg, name="rn50", preset="RN50", pooler_resolution=14)
