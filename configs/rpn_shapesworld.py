r"""A class-agnostic RPN for ShapesWorld, trained on base-shape boxes: the demo's offline RPN.

Launch (after configs/clip_shapesworld.py has exported the teacher):

  python -m regionclip_jax.main --config=configs/rpn_shapesworld.py \
      --workdir=/tmp/regionclip_jax/rpn_shapesworld

The RPN head sits on the res4 of the ShapesWorld CLIP image tower (`rpn.kind = "clip"`, like the
original's `rpn_lvis_1203_clipbackbone`), started from the teacher and trained on the boxes of the
7 base shapes only, as the original's OVD RPNs see base boxes only. It exports to WORKDIR/export
and reports its recall on the held-out scenes for base and novel shapes: the detectors'
`detect.rpn_init` is this WORKDIR.

Anchors: one stride-16 level, sizes 24-96 px (ShapesWorld objects are 29-58 px on 128 px scenes),
ratios 0.5 / 1 / 2. Test-time: 500 pre-NMS, NMS 0.7, 100 proposals.

Training scenes: those of configs/detect_shapesworld.py (novel shapes 1 object in 7, `novel_weight`;
generated next to DATA on first use); held-out scenes: the demo's own.

Variants (`:ARGS`): teacher=DIR, data=DIR, steps=N, batch=N, novel_weight=W, runlocal.
"""

from __future__ import annotations

from regionclip_jax.configs import common, pretrain_shapesworld


def get_config(arg: str | None = None):
    a = common.parse_arg(
        arg,
        runlocal=False,
        teacher="/tmp/regionclip_jax/clip_shapesworld/export",
        data="/tmp/regionclip_jax/shapesworld",
        steps=300,
        batch=16,
        novel_weight=COCO_LIKE_NOVEL_WEIGHT,
    )
    c = common.training_config("rpn")
    shapesworld_detection_data(c, a)
    c.model.init = a.teacher
    c.rpn.kind = "clip"
    c.rpn.anchor_sizes = (24, 32, 48, 64, 96)
    c.rpn.aspect_ratios = (0.5, 1.0, 2.0)
    c.rpn.freeze_at = 2
    c.rpn.train_classes = "base"
    c.optim.name = "sgd"
    c.optim.lr = common.scale_lr(0.01, 16, a.batch)
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 20
    c.optim.decay_steps = (int(a.steps * 0.8),)
    c.optim.clip_grad_norm = 5.0
    if a.runlocal:
        shapesworld_runlocal(c, a)
    c.lock()
    return c


# In COCO's open-vocabulary split about 1 object in 7 of the 65 classes is novel (OVR-CNN's val:
# 4,614 of 33,152), present in the base training images without a box. 7 base shapes and 3 novel
# ones at relative weight w make 3w / (7 + 3w) of the objects novel: 1 in 7 at w = 7/18.
COCO_LIKE_NOVEL_WEIGHT = 7 / 18


def shapesworld_detection_data(c, a):
    """Detection data: the demo's cluttered scenes (configs/pretrain_shapesworld.py), the training
    split drawn with novel shapes at `a.novel_weight` (ShapesWorldConfig.train_novel_weight).

    The held-out scenes do not depend on that weight: they are the demo's validation scenes,
    pixel for pixel. With weight 1 the demo's own scenes are used; otherwise a sibling directory
    named by the weight is generated on first use.
    """
    pre = pretrain_shapesworld.get_config(f"data={a.data}")
    c.seed = 0
    c.total_steps = a.steps
    c.log_every = 25
    c.checkpoint_every = 100
    c.data.shapesworld = pre.data.shapesworld
    if a.novel_weight != 1.0:
        c.data.shapesworld.dir = f"{a.data.rstrip('/')}_novel{a.novel_weight:.3g}"
        c.data.shapesworld.train_novel_weight = a.novel_weight
    c.data.batch_size = a.batch
    c.data.min_size = c.data.max_size = 128
    c.data.canvas = (128, 128)
    c.data.flip = True
    c.data.context_length = 32
    t = c.detect
    t.split = ""  # ShapesWorld categories carry their split: 7 base shapes, 3 novel
    t.train_sizes = (128,)
    t.test_size = 128
    t.max_boxes = 8
    t.eval_batch_size = 32
    c.rpn.pre_nms_topk = 500
    c.rpn.post_nms_topk = 100
    c.rpn.nms_thresh = 0.7


def shapesworld_runlocal(c, a):
    """The `runlocal` variant of the ShapesWorld RPN and detection configs (random tiny CLIP)."""
    c.model.init = ""
    c.model.overrides = common.tiny_clip_model(resolution=64)
    c.total_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.data.batch_size = 2
    c.data.shapesworld.dir = a.data.rstrip("/") + "_runlocal_detect"
    c.data.shapesworld.num_train = 16
    c.data.shapesworld.num_val = 8
    c.detect.eval_batch_size = 4
    c.optim.warmup_steps = 1
    c.optim.decay_steps = (3,)
