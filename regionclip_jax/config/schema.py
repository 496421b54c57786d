"""The training config schema: every key a run config may have, with its default.

`base_config()` is the full set of keys; experiment files (configs/*.py) start from it
(configs/common.py) and override values. `regionclip_jax.config.validation.validate` checks a config
against it. The tuples below are the allowed values of the string fields.
"""

from __future__ import annotations

import ml_collections

MODES = ("clip", "pretrain", "detect", "rpn")
DETECT_TASKS = ("coco", "lvis")
PROPOSAL_SOURCES = ("rpn", "gt")
RPN_KINDS = ("c4", "fpn", "clip")
REGION_SOURCES = ("proposals", "random", "gt", "rpn")
OPTIMIZERS = ("sgd", "adamw")


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
    # proposal network trained on the training boxes, regionclip_jax.train.rpn_trainer; format: regionclip_jax.convert.rpn).
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
    c.detect.rois_per_image = 512
    c.detect.positive_fraction = 0.25
    c.detect.iou_threshold = 0.5
    c.detect.bg_weight = -1.0  # < 0: the task's default (coco 0.2, lvis 0.8)
    c.detect.focal_gamma = -1.0  # < 0: the task's default (coco 0.5; lvis has none)
    c.detect.temperature = 0.01
    c.detect.mask_on = False
    # GT instance masks kept at this fraction of the canvas size (detection_pipeline docstring).
    c.detect.mask_scale = 0.25
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
    # The RPN's test-time settings (eval mode, spec §5.2): detect's offline RPN (`detect.rpn_init`)
    # and the proposals whose recall mode `rpn` reports after training.
    c.rpn.pre_nms_topk = 6000  # candidates per level before NMS
    c.rpn.post_nms_topk = 1000  # proposals kept after NMS
    c.rpn.nms_thresh = 0.7

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_at_step = 0  # > 0: make the loss and gradients of that update NaN (tests)
    c.debug.step_sleep = 0.0  # seconds to sleep after each step (tests kill runs mid-way)
    c.debug.print_memory = True
    c.debug.fail_at_step = 0  # > 0: process `fail_process` raises before that step (tests)
    c.debug.fail_process = 0
    return c


MESH_AXES = ("data", "fsdp", "model")
RPN_DEPTHS = (50, 101, 152)  # regionclip_jax.models.rpn.RESNET_BLOCKS
DETECT_SPLITS = ("", "coco48_17", "lvis")  # "" or regionclip_jax.data.ov_splits.SPLITS
TEMPLATES = ("ensemble", "single")
CLASS_SETS = ("base", "all")
