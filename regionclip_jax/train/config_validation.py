"""The training config schema and its validation (run before anything is compiled).

`base_config()` is the full set of keys a training config may have, with defaults; experiment
files (configs/*.py) start from it (configs/common.py) and override values. `validate(config)`
fails with a `ConfigError` naming the offending key for
  - keys the schema does not know (typos: `optim.lrr`), also inside nested dicts;
  - values of the wrong kind or out of range;
  - inconsistent values (global batch not divisible by the data-parallel mesh size or by the
    process count, decay steps out of order, an image resolution the model cannot take, ...).
Keys under `model` free-form dicts are checked by the model's own config (CLIPConfig).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import ml_collections

MODES = ("clip", "pretrain", "detect", "rpn")
DETECT_TASKS = ("coco", "lvis")
PROPOSAL_SOURCES = ("rpn", "gt")
RPN_KINDS = ("c4", "fpn", "clip")
REGION_SOURCES = ("proposals", "random", "gt", "rpn")
OPTIMIZERS = ("sgd", "adamw")


class ConfigError(ValueError):
    """A training config is invalid; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config may have, with its default (unlocked; lock after editing)."""
    c = ml_collections.ConfigDict()
    c.mode = "clip"
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.eval_every = 0  # 0: evaluate only at the end

    # Mesh ('data', 'fsdp', 'model') sizes; -1 takes the remaining devices. axis_rules: list of
    # (logical name, mesh axes) pairs; empty uses regionclip_jax.parallel.DEFAULT_RULES.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.axis_rules = ()

    # Model: CLIPConfig fields (regionclip_jax.models.presets), applied over `preset` if given.
    c.model = ml_collections.ConfigDict()
    c.model.preset = ""
    c.model.overrides = ml_collections.ConfigDict()
    c.model.dtype = "float32"
    # A CLIP checkpoint dir (save_clip / `regionclip-jax convert`) to start from; it also fixes
    # the architecture (leave preset/overrides empty). Used by mode `pretrain`.
    c.model.init = ""

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # shard dir / manifest / glob (shards.open_shards)
    c.data.val = ""
    c.data.shapesworld = ml_collections.ConfigDict()
    c.data.shapesworld.dir = ""  # if set and empty on disk: generate ShapesWorld there first
    c.data.shapesworld.num_train = 2000
    c.data.shapesworld.num_val = 200
    c.data.shapesworld.seed = 0
    c.data.shapesworld.image_size = 128
    # Scene options (data.shapesworld.ShapesWorldConfig); the defaults are the generator's.
    c.data.shapesworld.min_objects = 2
    c.data.shapesworld.max_objects = 5
    c.data.shapesworld.small_size = (0.14, 0.22)
    c.data.shapesworld.large_size = (0.30, 0.42)
    c.data.shapesworld.color_mention = 0.75
    c.data.shapesworld.size_mention = 0.35
    c.data.shapesworld.max_mentions = 3  # most objects one caption names
    c.data.shapesworld.train_novel_weight = 1.0  # novel shapes' weight in the train split
    c.data.batch_size = 32  # global batch (all processes)
    c.data.min_size = 128
    c.data.max_size = 128
    c.data.canvas = (128, 128)
    c.data.flip = False  # ShapesWorld captions say nothing about left/right; CLIP never flips
    c.data.num_workers = 0
    c.data.context_length = 77

    # The image-text loss: learned temperature (CLIP: logit_scale param, init 1/0.07, exp()
    # clipped at max_logit_scale) or a fixed one (RegionCLIP pretraining: 0.01).
    c.loss = ml_collections.ConfigDict()
    c.loss.learn_temperature = True
    c.loss.temperature = 0.01
    c.loss.max_logit_scale = 100.0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"
    c.optim.lr = 0.002
    c.optim.momentum = 0.9
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 1e-4
    c.optim.decay_min_ndim = 0
    c.optim.warmup_steps = 0
    c.optim.warmup_factor = 0.001
    c.optim.decay_steps = ()
    c.optim.decay_factor = 0.1
    c.optim.clip_grad_norm = 0.0
    c.optim.freeze = ()

    # Mode `pretrain` (regionclip_jax.train.pretrain_trainer; spec §4).
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.regions = "proposals"  # proposals | random | gt | rpn (module docstring)
    c.pretrain.num_regions = 100  # region slots per image (the original samples 100 of 300)
    c.pretrain.random_min_frac = 0.1  # "random" boxes: side range, fraction of the image side
    c.pretrain.random_max_frac = 0.6
    c.pretrain.concepts = ""  # concepts file, "a,b,c", or "" = frequent nouns of data.train
    c.pretrain.concept_min_count = 100  # for the "" pool (the paper's threshold)
    c.pretrain.templates = "ensemble"  # concept prompts: "ensemble" (81) or "single"
    c.pretrain.temperature = 0.01
    c.pretrain.teacher_temperature = 0.01
    c.pretrain.threshold = 0.1  # pseudo-label confidence (CONCEPT_THRES)
    c.pretrain.group_size = 0  # images per original GPU for the region losses; 0 = whole batch
    c.pretrain.loss_weights = (1.0, 1.0, 1.0)  # distill, concept contrastive, image-text
    c.pretrain.freeze_at = 2  # student stem (1) + layer1 (2) frozen, as the original
    c.pretrain.pooler_resolution = 0  # RoIAlign output; 0 = 2 x input_resolution / 32

    # Modes `detect` (OVD / fully-supervised Fast R-CNN fine-tuning and zero-shot inference,
    # regionclip_jax.train.detection_trainer; spec §1.3-§1.5, §5, §6) and `rpn` (a class-agnostic
    # proposal network trained on the training boxes, regionclip_jax.train.rpn_trainer).
    c.detect = ml_collections.ConfigDict()
    c.detect.task = "coco"  # coco: focal-scaled CE (bg 0.2), COCO eval | lvis: weighted CE (bg 0.8)
    # COCO-format jsons; converted once into shards under WORKDIR/shards (images: image_root, or
    # the json's directory when empty). data.train / data.val shards may be given instead.
    c.detect.train_json = ""
    c.detect.val_json = ""
    c.detect.image_root = ""
    c.detect.val_image_root = ""
    c.detect.split = ""  # "" (categories' own `split` field, else all base) | coco48_17 | lvis
    c.detect.train_classes = "base"  # base: OVD (novel boxes removed) | all: fully supervised
    c.detect.templates = "ensemble"  # class-name prompts when embeddings are computed
    c.detect.train_embeddings = ""  # .npy/.pth [K_train, D]; "" = from model.init's text tower
    c.detect.test_embeddings = ""  # [K_test, D] over all classes; "" = from model.init's text tower
    c.detect.proposals = "rpn"  # rpn: the frozen offline RPN of detect.rpn_init | gt: GT boxes
    c.detect.rpn_init = ""  # an `rpn` mode workdir (its export/) or a detectron2 RPN .pth
    c.detect.rpn_pre_nms_topk = 6000  # offline RPN in eval mode: its test-time settings (spec 5.2)
    c.detect.rpn_post_nms_topk = 1000
    c.detect.rpn_nms_thresh = 0.7
    c.detect.rois_per_image = 512
    c.detect.positive_fraction = 0.25
    c.detect.iou_threshold = 0.5
    c.detect.bg_weight = -1.0  # < 0: the task's default (coco 0.2, lvis 0.8)
    c.detect.focal_gamma = -1.0  # < 0: the task's default (coco 0.5; lvis has none)
    c.detect.temperature = 0.01
    c.detect.mask_on = False
    c.detect.freeze_at = 2
    c.detect.pooler_resolution = 0  # 0 = 2 x input_resolution / 32
    c.detect.max_boxes = 100  # GT slots per image
    c.detect.train_sizes = (640, 672, 704, 736, 768, 800)
    c.detect.test_size = 800
    c.detect.repeat_threshold = 0.0  # > 0: repeat-factor sampling (LVIS 0.001)
    c.detect.eval_batch_size = 8
    c.detect.eval_only = False  # zero-shot inference: evaluate model.init, no training
    c.detect.score_thresh = 0.001
    c.detect.nms_thresh = 0.5
    c.detect.soft_nms = True  # Gaussian soft-NMS (sigma 0.5), as all the OVD test scripts
    c.detect.topk = 100  # detections per image (COCO 100, LVIS 300)
    c.detect.max_candidates = 2000  # (RoI, class) pairs kept before NMS (postprocess docstring)
    c.detect.multiply_rpn_score = False  # sqrt(p * RPN logit) fusion (LVIS, zero-shot with RPN)
    c.detect.apply_deltas = True  # False: NO_BOX_DELTA (zero-shot; always with GT proposals)
    c.detect.max_eval_images = 0  # > 0: evaluate the first N val images only

    c.rpn = ml_collections.ConfigDict()
    c.rpn.kind = "c4"  # c4 | fpn (detectron2 R50, from rpn.init) | clip (head on model's trunk)
    c.rpn.init = ""  # detectron2 RPN .pth to start from (kinds c4 / fpn)
    c.rpn.depth = 50
    c.rpn.base_width = 64
    c.rpn.anchor_sizes = (32, 64, 128, 256, 512)
    c.rpn.aspect_ratios = (0.5, 1.0, 2.0)
    c.rpn.freeze_at = 2
    c.rpn.train_classes = "base"  # the original's OVD RPNs see base boxes only

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_at_step = 0  # > 0: make the loss and gradients of that update NaN (tests)
    c.debug.step_sleep = 0.0  # seconds to sleep after each step (tests kill runs mid-way)
    c.debug.print_memory = True
    c.debug.fail_at_step = 0  # > 0: process `fail_process` raises before that step (tests)
    c.debug.fail_process = 0
    return c


# Sub-dicts whose keys are free-form (checked elsewhere).
_FREE_FORM = ("model.overrides",)


def _unknown_keys(config: Any, schema: Any, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            out.append(name)
            continue
        value, ref = config[key], schema[key]
        if name in _FREE_FORM:
            continue
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict | dict):
                continue  # reported as a type error below
            out.extend(_unknown_keys(value, ref, f"{name}."))
    return out


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config.{key}: {msg}")


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks `config` against the schema and itself; raises ConfigError naming the key.

    Args:
      config: the resolved training config.
      num_devices: devices the mesh will span (jax.device_count()).
      num_processes: jax.process_count().
    """
    unknown = _unknown_keys(config, base_config())
    if unknown:
        _fail(unknown[0], f"unknown key (not in the schema; typo?). All unknown: {unknown}")

    if config.mode not in MODES:
        _fail("mode", f"must be one of {MODES}, got {config.mode!r}")
    for key in ("total_steps", "log_every", "keep_checkpoints"):
        if int(config[key]) < 1:
            _fail(key, f"must be >= 1, got {config[key]}")
    if int(config.checkpoint_every) < 0:
        _fail("checkpoint_every", "must be >= 0 (0: only at the end)")

    # Mesh and batch.
    mesh = dict(config.mesh)
    sizes = {a: int(mesh.get(a, 1)) for a in mesh}
    for axis, size in sizes.items():
        if axis not in ("data", "fsdp", "model"):
            _fail(f"mesh.{axis}", "unknown mesh axis; axes are data, fsdp, model")
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", f"must be >= 1 or -1, got {size}")
    if list(sizes.values()).count(-1) > 1:
        _fail("mesh", "at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if num_devices % known:
        _fail("mesh", f"{sizes} does not fit {num_devices} devices")
    full = {a: (num_devices // known if s == -1 else s) for a, s in sizes.items()}
    if math.prod(full.values()) != num_devices:
        _fail("mesh", f"{sizes} needs {math.prod(full.values())} devices, have {num_devices}")
    data_par = full.get("data", 1) * full.get("fsdp", 1)
    batch = int(config.data.batch_size)
    if batch < 1:
        _fail("data.batch_size", f"must be >= 1, got {batch}")
    if batch % data_par:
        _fail(
            "data.batch_size",
            f"global batch {batch} is not divisible by the data-parallel size "
            f"data x fsdp = {data_par} (mesh {full})",
        )
    if batch % num_processes:
        _fail("data.batch_size", f"global batch {batch} not divisible by {num_processes} processes")
    for pair in config.axis_rules:
        if len(pair) != 2:
            _fail("axis_rules", f"entries must be (logical name, mesh axes) pairs, got {pair}")

    # Data.
    d = config.data
    if config.mode in ("detect", "rpn"):
        _validate_detect(config)
    elif not d.train and not d.shapesworld.dir:
        _fail("data.train", "set data.train (shards) or data.shapesworld.dir (generated)")
    if len(d.canvas) != 2 or min(d.canvas) < 1:
        _fail("data.canvas", f"must be (height, width), got {d.canvas}")
    if int(d.min_size) < 1:
        _fail("data.min_size", f"must be >= 1, got {d.min_size}")

    # Optimiser.
    o = config.optim
    if o.name not in OPTIMIZERS:
        _fail("optim.name", f"must be one of {OPTIMIZERS}, got {o.name!r}")
    if float(o.lr) <= 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}")
    steps = [int(s) for s in o.decay_steps]
    if steps != sorted(steps) or any(s <= 0 for s in steps):
        _fail("optim.decay_steps", f"must be increasing positive steps, got {tuple(steps)}")
    if int(o.warmup_steps) < 0:
        _fail("optim.warmup_steps", "must be >= 0")
    if float(o.clip_grad_norm) < 0:
        _fail("optim.clip_grad_norm", "must be >= 0 (0 disables)")
    for pattern in o.freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail("optim.freeze", f"bad regex {pattern!r}: {e}")

    # Loss.
    if float(config.loss.temperature) <= 0:
        _fail("loss.temperature", "must be > 0")

    # Model: build the CLIPConfig now so a bad field fails before any compile.
    if config.model.dtype not in ("float32", "bfloat16"):
        _fail("model.dtype", f"must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
    init = str(config.model.init)
    if init:
        if config.model.preset or dict(config.model.overrides):
            _fail(
                "model.init", "fixes the architecture: leave model.preset and model.overrides empty"
            )
        if not os.path.exists(os.path.join(init, "model.json")):
            _fail(
                "model.init",
                f"{os.path.join(init, 'model.json')} not found: convert weights with "
                "`regionclip-jax convert` or train mode 'clip' (it exports WORKDIR/export)",
            )
    try:
        clip_cfg = clip_config(config)
    except (KeyError, ValueError, TypeError) as e:
        _fail("model", str(e))
    res = clip_cfg.image_resolution
    if clip_cfg.is_resnet and res % 32:
        _fail("model.overrides.image_resolution", f"a ResNet needs a multiple of 32, got {res}")
    if config.mode == "pretrain":
        _validate_pretrain(config, clip_cfg)
    elif config.mode in ("detect", "rpn"):
        if not clip_cfg.is_resnet and (config.mode == "detect" or config.rpn.kind == "clip"):
            _fail("model", "the detector's region head is res5 + attnpool: needs a ResNet CLIP")
    elif tuple(int(x) for x in d.canvas) != (res, res):
        _fail(
            "data.canvas",
            f"CLIP training feeds whole canvases to the model: canvas {tuple(d.canvas)} must be "
            f"({res}, {res}) = model image_resolution",
        )
    if int(d.context_length) < 2:
        _fail("data.context_length", f"must be >= 2 (start and end tokens), got {d.context_length}")
    if int(d.context_length) > clip_cfg.context_length:
        _fail(
            "data.context_length",
            f"{d.context_length} > model context_length {clip_cfg.context_length}",
        )


def _validate_pretrain(config: ml_collections.ConfigDict, clip_cfg: Any) -> None:
    p = config.pretrain
    if p.regions not in REGION_SOURCES:
        _fail("pretrain.regions", f"must be one of {REGION_SOURCES}, got {p.regions!r}")
    if not clip_cfg.is_resnet:
        _fail("model", "mode 'pretrain' needs a ModifiedResNet CLIP (res5 + attnpool region head)")
    if int(p.num_regions) < 1:
        _fail("pretrain.num_regions", f"must be >= 1, got {p.num_regions}")
    lo, hi = float(p.random_min_frac), float(p.random_max_frac)
    if not 0.0 < lo <= hi <= 1.0:
        _fail(
            "pretrain.random_min_frac",
            f"need 0 < random_min_frac <= random_max_frac <= 1, got {lo}, {hi}",
        )
    if p.templates not in ("ensemble", "single"):
        _fail("pretrain.templates", f"must be 'ensemble' or 'single', got {p.templates!r}")
    for key in ("temperature", "teacher_temperature"):
        if float(p[key]) <= 0:
            _fail(f"pretrain.{key}", f"must be > 0, got {p[key]}")
    if not 0.0 <= float(p.threshold) < 1.0:
        _fail("pretrain.threshold", f"must be in [0, 1), got {p.threshold}")
    group, batch = int(p.group_size), int(config.data.batch_size)
    if group < 0 or (group and batch % group):
        _fail("pretrain.group_size", f"must be 0 or divide the global batch {batch}, got {group}")
    if len(p.loss_weights) != 3 or any(float(w) < 0 for w in p.loss_weights):
        _fail("pretrain.loss_weights", f"must be 3 weights >= 0, got {tuple(p.loss_weights)}")
    if not 0 <= int(p.freeze_at) <= 5:
        _fail("pretrain.freeze_at", f"must be in 0..5, got {p.freeze_at}")
    if int(p.pooler_resolution) < 0:
        _fail("pretrain.pooler_resolution", f"must be >= 0, got {p.pooler_resolution}")
    if int(p.concept_min_count) < 1:
        _fail("pretrain.concept_min_count", f"must be >= 1, got {p.concept_min_count}")


def _validate_detect(config: ml_collections.ConfigDict) -> None:
    d, t = config.data, config.detect
    has_train = bool(d.train or t.train_json or d.shapesworld.dir)
    if not has_train and not (config.mode == "detect" and t.eval_only):
        _fail("detect.train_json", "set detect.train_json (COCO-format json) or data.train shards")
    if config.mode == "detect" and not (d.val or t.val_json or d.shapesworld.dir):
        _fail("detect.val_json", "set detect.val_json (COCO-format json of the evaluation set)")
    if t.task not in DETECT_TASKS:
        _fail("detect.task", f"must be one of {DETECT_TASKS}, got {t.task!r}")
    if t.proposals not in PROPOSAL_SOURCES:
        _fail("detect.proposals", f"must be one of {PROPOSAL_SOURCES}, got {t.proposals!r}")
    if config.mode == "detect" and t.proposals == "rpn" and not t.rpn_init:
        _fail("detect.rpn_init", "proposals='rpn' needs an RPN: an `rpn` workdir or a .pth")
    if t.proposals == "gt" and not t.eval_only:
        _fail("detect.proposals", "'gt' proposals are for zero-shot evaluation (eval_only)")
    if t.train_classes not in ("base", "all"):
        _fail("detect.train_classes", f"must be 'base' or 'all', got {t.train_classes!r}")
    if config.rpn.train_classes not in ("base", "all"):
        _fail("rpn.train_classes", f"must be 'base' or 'all', got {config.rpn.train_classes!r}")
    if t.templates not in ("ensemble", "single"):
        _fail("detect.templates", f"must be 'ensemble' or 'single', got {t.templates!r}")
    for key in ("rois_per_image", "max_boxes", "test_size", "eval_batch_size", "topk"):
        if int(t[key]) < 1:
            _fail(f"detect.{key}", f"must be >= 1, got {t[key]}")
    if not 0.0 < float(t.positive_fraction) <= 1.0:
        _fail("detect.positive_fraction", f"must be in (0, 1], got {t.positive_fraction}")
    if float(t.temperature) <= 0:
        _fail("detect.temperature", f"must be > 0, got {t.temperature}")
    if not t.train_sizes or any(int(x) < 1 for x in t.train_sizes):
        _fail("detect.train_sizes", f"must be positive sizes, got {tuple(t.train_sizes)}")
    canvas = tuple(int(x) for x in d.canvas)
    longest = max([int(x) for x in t.train_sizes] + [int(t.test_size)])
    if int(d.max_size or 0) == 0 and longest > min(canvas):
        _fail("data.canvas", f"{canvas} cannot hold a {longest}-pixel side: set data.max_size")
    if max(canvas) % 32:
        _fail("data.canvas", f"must be multiples of 32 (RoI features at stride 16), got {canvas}")
    if t.task == "lvis" and float(t.focal_gamma) >= 0:
        _fail("detect.focal_gamma", "LVIS has no focal scaling (leave it < 0)")
    if not 0 <= int(t.freeze_at) <= 5:
        _fail("detect.freeze_at", f"must be in 0..5, got {t.freeze_at}")
    if config.rpn.kind not in RPN_KINDS:
        _fail("rpn.kind", f"must be one of {RPN_KINDS}, got {config.rpn.kind!r}")


def clip_config(config: ml_collections.ConfigDict):
    """The CLIPConfig of `config.model`: the `init` checkpoint's, else preset then overrides."""
    from regionclip_jax.models.presets import CLIPConfig, get_preset

    init = str(config.model.get("init", ""))
    if init:  # `validate` has checked that it holds a model.json and nothing overrides it
        from regionclip_jax.convert.checkpoint import read_metadata

        return CLIPConfig.from_dict(read_metadata(init)["config"])

    overrides = dict(config.model.overrides)
    if "vision_layers" in overrides and not isinstance(overrides["vision_layers"], int):
        overrides["vision_layers"] = tuple(overrides["vision_layers"])
    if config.model.preset:
        return get_preset(config.model.preset).replace(**overrides)
    return CLIPConfig.from_dict(overrides)
