"""Helpers shared by the experiment configs (big_vision style `get_config(arg)`).

Config files load this module by path (`load_common()` in each file) so they work whatever the
current directory is: ml_collections imports config files by file path, not as a package.
"""

from __future__ import annotations

import ml_collections

from regionclip_jax.train.config_validation import base_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `"runlocal,res=64,steps=300"` into a ConfigDict over `defaults`.

    A bare word sets a bool default to True; `key=value` casts to the default's type. Unknown
    keys fail naming the key and the valid ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; valid: {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "y")
        else:
            out[key] = type(default)(value)
    return out


def training_config(mode: str) -> ml_collections.ConfigDict:
    """The full schema with defaults (regionclip_jax.train.config_validation) for `mode`."""
    c = base_config()
    c.mode = mode
    return c


def tiny_clip_model(resolution: int = 64, embed: int = 64, context_length: int = 32) -> dict:
    """CLIPConfig fields of the small ResNet CLIP used on ShapesWorld (see clip_shapesworld)."""
    return dict(
        embed_dim=embed,
        image_resolution=resolution,
        vision_layers=(1, 1, 1, 1),
        vision_width=16,
        vision_patch_size=None,
        context_length=context_length,
        vocab_size=49408,
        transformer_width=128,
        transformer_heads=2,
        transformer_layers=4,
        activation="quick_gelu",
    )


def scale_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Linear LR scaling (Goyal et al.; detectron2's rule): lr * batch / base_batch."""
    return base_lr * batch / base_batch


def paper_pretrain_config(
    arg: str | None, *, name: str, preset: str, pooler_resolution: int
) -> ml_collections.ConfigDict:
    """The paper's RegionCLIP pretraining recipe on CC3M (spec §4.6) for `preset`.

    Args:
      arg: the config file's argument (runlocal, batch=N, init=DIR, data=PATH, concepts=FILE).
      name: short model name used in default paths ("rn50" -> checkpoints/clip_rn50).
      preset: CLIP preset of the runlocal variant ("RN50").
      pooler_resolution: RoIAlign output of the RoI head (14 for RN50, 18 for RN50x4).
    """
    a = parse_arg(
        arg,
        runlocal=False,
        batch=96,
        init=f"checkpoints/clip_{name}",
        data="data/cc3m/shards",
        concepts="data/concepts/coco_nouns_4764.txt",
    )
    c = training_config("pretrain")
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
    c.pretrain.pooler_resolution = pooler_resolution

    c.optim.name = "sgd"
    c.optim.lr = scale_lr(0.002, 96, a.batch)
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = int(1000 * scale)
    c.optim.warmup_factor = 0.001
    c.optim.decay_steps = (int(300_000 * scale), int(525_000 * scale))
    c.optim.decay_factor = 0.1
    c.optim.clip_grad_norm = 5.0

    if a.runlocal:
        c.model.init = ""
        c.model.preset = preset
        # The preset's layout at a fraction of its width and depth.
        c.model.overrides = dict(vision_layers=(1, 1, 1, 1), vision_width=16, embed_dim=64,
                                 transformer_width=64, transformer_heads=1, transformer_layers=1)  # fmt: skip
        c.total_steps = 4
        c.log_every = 1
        c.checkpoint_every = 2
        c.data.train = ""
        c.data.shapesworld.dir = f"/tmp/regionclip_jax/shapesworld_runlocal_{name}"
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
