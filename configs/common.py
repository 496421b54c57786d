"""Helpers shared by the experiment configs (big_vision style `get_config(arg)`).

`configs/` is installed as the package `regionclip_jax.configs` (pyproject.toml `package-dir`), so
every config file imports this module (`from regionclip_jax.configs import common`) whether
ml_collections loads the file by path (`--config=configs/x.py`) or the demo imports it.
"""

from __future__ import annotations

import ml_collections

from regionclip_jax.config import base_config


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
    """The full schema with defaults (regionclip_jax.config.schema) for `mode`."""
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


# The paper's detection schedules (spec §5.1): batch 16, SGD lr 0.002, momentum 0.9, weight decay
# 1e-4, linear warmup 5,000 iterations from 0.001; COCO "1x" 90k iterations with x0.1 at 60k and
# 80k, LVIS 180k with x0.1 at 120k and 160k. Other global batches: lr = 0.002 x batch / 16 and every
# step count x 16 / batch (detectron2's linear rule; the author: "halve the LR if you halve the
# batch", RegionCLIP #43).
DETECTION_SCHEDULES = {
    "coco": dict(steps=90_000, decay=(60_000, 80_000)),
    "lvis": dict(steps=180_000, decay=(120_000, 160_000)),
}


def detection_schedule(c: ml_collections.ConfigDict, task: str, batch: int) -> None:
    """Sets the paper's optimiser and schedule of `task` for global batch `batch`."""
    sched = DETECTION_SCHEDULES[task]
    scale = 16 / batch
    c.data.batch_size = batch
    c.total_steps = int(sched["steps"] * scale)
    c.optim.name = "sgd"
    c.optim.lr = scale_lr(0.002, 16, batch)
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = int(5000 * scale)
    c.optim.warmup_factor = 0.001
    c.optim.decay_steps = tuple(int(s * scale) for s in sched["decay"])
    c.optim.decay_factor = 0.1


def paper_detection_config(
    arg: str | None,
    *,
    task: str,
    name: str,
    preset: str,
    pooler_resolution: int,
    train_classes: str = "base",
    eval_only: bool = False,
    proposals: str = "rpn",
) -> ml_collections.ConfigDict:
    """RegionCLIP's detection transfer / zero-shot recipes (spec §5.1, §6.2) on COCO or LVIS.

    Args:
      arg: the config file's argument (runlocal, batch=N, init=DIR, rpn=PATH, root=DIR).
      task: "coco" (OVD 48/17 or COCO-80 with train_classes="all") or "lvis" (866 base / 337 rare).
      name: model name in default paths ("rn50" -> checkpoints/regionclip_rn50).
      preset: CLIP preset (its runlocal variant is a narrow model of the same layout).
      pooler_resolution: RoIAlign output (14 RN50, 18 RN50x4).
      train_classes: "base" (OVD) or "all" (fully supervised).
      eval_only: zero-shot inference with the pretrained model (no fine-tuning).
      proposals: "rpn" or "gt" (zero-shot GT-box mode).
    """
    rpn_default = {
        ("coco", "base"): "checkpoints/rpn_coco_48.pth",
        ("coco", "all"): "checkpoints/rpn_coco_80.pth",
        ("lvis", "base"): "checkpoints/rpn_lvis_866_lsj.pth",
        ("lvis", "all"): "checkpoints/rpn_lvis_1203_clipbackbone.pth",
    }[(task, train_classes)]
    if eval_only:  # zero-shot runs use the LVIS-866 FPN RPN for both data sets (spec §6.2)
        rpn_default = "checkpoints/rpn_lvis_866.pth"
    a = parse_arg(
        arg,
        runlocal=False,
        batch=16,
        init=f"checkpoints/regionclip_{name}",
        rpn=rpn_default,
        root=f"data/{task}",
    )
    c = training_config("detect")
    c.seed = 0
    c.log_every = 50
    c.checkpoint_every = 5000
    c.keep_checkpoints = 2
    detection_schedule(c, task, a.batch)
    c.model.init = a.init
    d, t = c.data, c.detect
    d.min_size, d.max_size = 800, 1333
    d.canvas = (1344, 1344)
    d.flip = True
    d.num_workers = 8
    t.task = task
    t.train_classes = train_classes
    t.eval_only = eval_only
    t.proposals = proposals
    t.rpn_init = a.rpn if proposals == "rpn" else ""
    t.pooler_resolution = pooler_resolution
    t.train_sizes = (640, 672, 704, 736, 768, 800)
    t.test_size = 800
    t.soft_nms = not eval_only  # the OVD test scripts enable soft-NMS; zero-shot uses NMS 0.5
    if task == "coco":
        t.split = "coco48_17"
        t.train_json = f"{a.root}/annotations/instances_train2017.json"
        t.val_json = f"{a.root}/annotations/instances_val2017.json"
        t.image_root = f"{a.root}/train2017"
        t.val_image_root = f"{a.root}/val2017"
        t.topk = 100
        t.score_thresh = 0.001
        t.mask_on = False
    else:
        t.split = "lvis"
        t.train_json = f"{a.root}/lvis_v1_train.json"
        t.val_json = f"{a.root}/lvis_v1_val.json"
        t.image_root = t.val_image_root = f"{a.root}/images"  # LVIS names COCO train+val images
        t.topk = 300
        t.score_thresh = 0.02
        t.repeat_threshold = 0.001
        t.max_boxes = 500  # the original keeps at most 500 GT per image
        t.multiply_rpn_score = True
        c.rpn.pre_nms_topk = 1000  # FPN: per level
        t.mask_on = not eval_only
    if eval_only:
        t.apply_deltas = False  # NO_BOX_DELTA
        t.multiply_rpn_score = proposals == "rpn"
        c.rpn.nms_thresh = 0.9  # OFFLINE_RPN_NMS_THRESH of the zero-shot configs
        c.rpn.pre_nms_topk = 1000
        t.nms_thresh = 0.5
        t.score_thresh = 0.001 if task == "coco" else (0.02 if proposals == "rpn" else 0.0001)
        t.train_classes = "all"
        c.total_steps = 1
    if a.runlocal:
        _detection_runlocal(c, preset, name)
    c.lock()
    return c


def _detection_runlocal(c: ml_collections.ConfigDict, preset: str, name: str) -> None:
    """A tiny random model of the preset's layout on generated ShapesWorld (CPU, a minute)."""
    c.model.init = ""
    c.model.preset = preset
    c.model.overrides = dict(vision_layers=(1, 1, 1, 1), vision_width=16, embed_dim=64,
                             transformer_width=64, transformer_heads=1, transformer_layers=1)  # fmt: skip
    c.total_steps = 1 if c.detect.eval_only else 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.data.shapesworld.dir = f"/tmp/regionclip_jax/shapesworld_runlocal_detect_{name}"
    c.data.shapesworld.num_train = 16
    c.data.shapesworld.num_val = 8
    c.data.batch_size = 2
    c.data.min_size = c.data.max_size = 128
    c.data.canvas = (128, 128)
    c.data.num_workers = 0
    t = c.detect
    t.split = ""
    t.train_json = t.val_json = t.image_root = t.val_image_root = ""
    t.proposals = "gt" if t.eval_only else "rpn"
    t.rpn_init = "" if t.eval_only else "random"  # an untrained RPN of `rpn.kind`
    t.train_sizes = (128,)
    t.test_size = 128
    t.rois_per_image = 32
    t.pooler_resolution = 0
    t.eval_batch_size = 4
    c.rpn.pre_nms_topk = 200
    c.rpn.post_nms_topk = 50
    t.max_boxes = 8
    t.mask_on = False
    c.rpn.base_width = 8  # the random "c4" RPN of the smoke run: a narrow R50
    c.optim.warmup_steps = 1
    c.optim.decay_steps = (3,)


def pop_args(arg: str | None, **defaults) -> tuple[ml_collections.ConfigDict, str]:
    """Takes the `key=value` items named in `defaults` out of `arg`; returns (them, the rest)."""
    mine, rest = [], []
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        (mine if item.partition("=")[0] in defaults else rest).append(item)
    return parse_arg(",".join(mine), **defaults), ",".join(rest)
