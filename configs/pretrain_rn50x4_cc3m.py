r"""RegionCLIP pretraining, the paper's RN50x4 recipe on CC3M (spec §4.6; `configs/pretrain/RegionCLIP_RN50x4.yaml`).

Launch (one host; on a TPU pod or GPU cluster see launch/README.md, same config):

  python -m regionclip_jax.main --config=configs/pretrain_rn50x4_cc3m.py \
      --workdir=gs://BUCKET/regionclip/pretrain_rn50x4_cc3m \
      --config.model.init=checkpoints/clip_rn50x4 \
      --config.data.train=data/cc3m/shards

Before: convert OpenAI's weights (`regionclip-jax convert RN50x4.pt checkpoints/clip_rn50x4`),
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

Variants (`--config=configs/pretrain_rn50x4_cc3m.py:ARGS`):
  runlocal        a tiny random RN50x4-shaped smoke run on ShapesWorld (CPU, < 1 minute)
  batch=N         global batch (scales lr and the schedule as above)
  init=DIR        converted OpenAI CLIP RN50x4 (default checkpoints/clip_rn50x4)
  data=PATH       CC3M image-text shards with proposals (default data/cc3m/shards)
  concepts=FILE   concept pool file (default data/concepts/coco_nouns_4764.txt)
"""

from __future__ import annotations

import importlib.util
import os


def load_common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("regionclip_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    common = load_common()
    a = common.parse_arg(
        arg,
        runlocal=False,
        batch=96,
        init="checkpoints/clip_rn50x4",
        data="data/cc3m/shards",
        concepts="data/concepts/coco_nouns_4764.txt",
    )
    c = common.training_config("pretrain")
    scale = 96 / a.batch  # steps scale inversely with the batch (same samples seen)
    c.seed = 0
    c.total_steps = int(600_000 * scale)
    c.log_every = 50
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3

    c.model.init = a.init
    c.data.train = a.data
    c.data.batch_size = a.batch
    c.data.min_size, c.data.max_size = 800, 1333
    c.data.canvas = (1344, 1344)
    c.data.flip = True
    c.data.num_workers = 8
    c.data.context_length = 77

    c.pretrain.regions = "proposals"
    c.pretrain.num_regions = 100
    c.pretrain.concepts = a.concepts
    c.pretrain.templates = "ensemble"
    c.pretrain.temperature = c.pretrain.teacher_temperature = 0.01
    c.pretrain.threshold = 0.1
    c.pretrain.group_size = 3
    c.pretrain.loss_weights = (1.0, 1.0, 1.0)
    c.pretrain.freeze_at = 2
    c.pretrain.pooler_resolution = 18

    c.optim.name = "sgd"
    c.optim.lr = common.scale_lr(0.002, 96, a.batch)
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = int(1000 * scale)
    c.optim.warmup_factor = 0.001
    c.optim.decay_steps = (int(300_000 * scale), int(525_000 * scale))
    c.optim.decay_factor = 0.1
    c.optim.clip_grad_norm = 5.0

    if a.runlocal:
        c.model.init = ""
        c.model.preset = "RN50x4"
        c.model.overrides = ml_overrides()
        c.total_steps = 4
        c.log_every = 1
        c.checkpoint_every = 2
        c.data.train = ""
        c.data.shapesworld.dir = "/tmp/regionclip_jax/shapesworld_runlocal_rn50x4"
        c.data.shapesworld.num_train = 32
        c.data.shapesworld.num_val = 0
        c.data.batch_size = 6
        c.data.min_size = c.data.max_size = 128
        c.data.canvas = (128, 128)
        c.data.flip = False
        c.data.num_workers = 0
        c.pretrain.regions = "random"
        c.pretrain.num_regions = 8
        c.pretrain.concepts = "circle,square,triangle,star,background"
        c.pretrain.templates = "single"
        c.pretrain.pooler_resolution = 0
        c.optim.warmup_steps = 1
        c.optim.decay_steps = (3,)
    c.lock()
    return c


def ml_overrides() -> dict:
    """runlocal: the RN50x4 layout at a fraction of its width and depth (CPU smoke run)."""
    return dict(vision_layers=(1, 1, 1, 1), vision_width=16, embed_dim=64, image_resolution=288,
                transformer_width=64, transformer_heads=1, transformer_layers=1)  # fmt: skip
