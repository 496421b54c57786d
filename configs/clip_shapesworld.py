r"""Image-level CLIP on ShapesWorld: the teacher for region pretraining (CPU, minutes).

Launch (generates ShapesWorld into /tmp/regionclip_jax/shapesworld_iconic on first use):

  python -m regionclip_jax.main --config=configs/clip_shapesworld.py \
      --workdir=/tmp/regionclip_jax/clip_shapesworld

The trained model is exported to WORKDIR/export (save_clip format): the `model.init` of
configs/pretrain_shapesworld.py.

Data: "iconic" ShapesWorld, like the one-subject photos of web image-text data: one large object
per image (side 45-90% of the image) and captions that name its shape only. Measured: on the
default cluttered scenes, whose captions name colours 75% of the time, an image-level CLIP learns
colour words and its crop zero-shot accuracy over the 10 shapes stays near chance (0.12 after
2,400 steps); on iconic scenes it reaches ~0.6 in 1,000 steps.

Variants (`--config=configs/clip_shapesworld.py:ARGS`, comma separated):
  runlocal        tiny smoke run: 64 generated images, 20 steps, batch 8
  res=N           image resolution (multiple of 32; ShapesWorld images are rendered at N)
  steps=N         total steps
  batch=N         global batch; the learning rate scales linearly from 1e-3 at batch 64
  data=DIR        ShapesWorld directory (generated there when missing)

Model: a small ModifiedResNet CLIP (layers (1,1,1,1), stem width 16 -> 512 channels at res5,
attention pool with 8 heads) with a 4-layer, width-128 text transformer, embed 64, context 32
(ShapesWorld captions are < 20 tokens). A ResNet, not a ViT, because region pretraining pools
RoI features from the ResNet trunk and the student starts from this teacher. It trains from
scratch: frozen BN starts as the identity (bn3 of each block zero-initialised, so blocks start as
identity mappings) and its scale/bias are trainable parameters. Optimiser: AdamW (as CLIP) with
a learned temperature (CLIP's logit_scale).
"""

from __future__ import annotations

from regionclip_jax.configs import common


def get_config(arg: str | None = None):
    a = common.parse_arg(
        arg,
        runlocal=False,
        res=64,
        steps=1000,
        batch=64,
        data="/tmp/regionclip_jax/shapesworld_iconic",
    )
    c = common.training_config("clip")
    c.seed = 0
    c.total_steps = a.steps
    c.log_every = 25
    c.checkpoint_every = 500

    c.model.overrides = common.tiny_clip_model(resolution=a.res)
    c.data.shapesworld.dir = a.data
    c.data.shapesworld.num_train = 4000
    c.data.shapesworld.num_val = 256
    c.data.shapesworld.image_size = a.res
    c.data.shapesworld.min_objects = c.data.shapesworld.max_objects = 1
    c.data.shapesworld.small_size = (0.45, 0.6)
    c.data.shapesworld.large_size = (0.65, 0.9)
    c.data.shapesworld.color_mention = c.data.shapesworld.size_mention = 0.0
    c.data.batch_size = a.batch
    c.data.min_size = c.data.max_size = a.res
    c.data.canvas = (a.res, a.res)
    c.data.context_length = 32

    c.loss.learn_temperature = True
    c.optim.name = "adamw"
    c.optim.lr = common.scale_lr(1e-3, 64, a.batch)  # 3e-3 collapsed to chance
    c.optim.weight_decay = 0.1
    c.optim.decay_min_ndim = 2  # CLIP: no decay on gains, biases, logit_scale
    c.optim.warmup_steps = 50
    c.optim.warmup_factor = 0.0
    # The loss only starts to fall after ~500 steps; an early decay stops the learning.
    c.optim.decay_steps = (int(a.steps * 0.9),)
    c.optim.decay_factor = 0.1

    if a.runlocal:
        c.total_steps = 20
        c.log_every = 5
        c.checkpoint_every = 10
        c.data.batch_size = 8
        c.data.shapesworld.dir = a.data.rstrip("/") + "_runlocal"
        c.data.shapesworld.num_train = 64
        c.data.shapesworld.num_val = 16
        c.optim.warmup_steps = 2
        c.optim.decay_steps = (15,)
    c.lock()
    return c
