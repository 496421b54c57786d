r"""Detection fine-tuning on your own COCO-format data set: one path.

Launch:

  python -m regionclip_jax.main \
      --config=configs/detect_custom.py:json=/data/pets/annotations/instances.json \
      --workdir=runs/pets

The json's images are read relative to its directory (`images=DIR` to point elsewhere), it is
converted into shards under WORKDIR/shards on first use, and checked first: a json that is not
COCO-format, entries missing required fields, annotations whose category id is not in
`categories`, or an empty image list stop the run with an error naming the problem.
Training evaluates on the same json unless `val=PATH` names a held-out one.

Classes: every category of the json (fully supervised), or, when the categories carry a
`"split": "base" | "novel"` field, open-vocabulary: boxes of base categories train, all are
evaluated (AP50 novel / base / all). Class embeddings come from the text tower of `init` with
the 81-template ensemble, so category names should be words ("golden retriever", not "cls_3").

Defaults: RegionCLIP RN50 (`init`, converted with `regionclip-jax convert`), proposals from the
original's class-agnostic LVIS RPN (`rpn`; or train one on your data with mode `rpn`), the COCO
OVD recipe scaled to `steps` (default 10k at batch 16, x0.1 at 2/3 and 8/9 of the run).

Variants (`:ARGS`): json=PATH (required), val=PATH, images=DIR, init=DIR, rpn=PATH, steps=N,
batch=N, runlocal.
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    a, rest = common.pop_args(
        arg,
        json="",
        val="",
        images="",
        steps=10_000,
        init="checkpoints/regionclip_rn50",
        rpn="checkpoints/rpn_lvis_866.pth",
    )
    c = common.paper_detection_config(
        rest + (",init=" + a.init) + (",rpn=" + a.rpn),
        task="coco",
        name="rn50",
        preset="RN50",
        pooler_resolution=14,
        train_classes="base",
    )
    with c.unlocked():
        if not c.data.shapesworld.dir:  # not runlocal
            t = c.detect
            t.split = ""  # the json's own `split` field, else every category is trained
            t.train_json = a.json
            t.val_json = a.val or a.json
            t.image_root = a.images
            t.val_image_root = a.images if not a.val else ""
            c.rpn.pre_nms_topk = 1000  # an FPN RPN: per level
            c.total_steps = int(a.steps * 16 / c.data.batch_size)
            c.optim.warmup_steps = min(c.optim.warmup_steps, c.total_steps // 10)
            c.optim.decay_steps = (c.total_steps * 2 // 3, c.total_steps * 8 // 9)
            c.checkpoint_every = max(c.total_steps // 10, 1)
    return c
