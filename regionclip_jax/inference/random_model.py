"""Random-weight models for demos and tests (no downloads): the notebook's and the tests' factory.

- `random_clip(config)`: a CLIP (default: the tiny `TINY_CONFIG`) with random weights.
- `random_checkpoint(dir)`: a tiny CLIP with RANDOM weights saved as a converted checkpoint, so
  the walk-through runs anywhere without downloads (its predictions are chance level).
- `shapesworld_example(index)`: a rendered ShapesWorld scene with its ground-truth boxes and
  shape names (an image plus the GT boxes that zero-shot GT mode needs).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.convert.checkpoint import METADATA_FILE, save_clip
from regionclip_jax.data.shapesworld import render_scene
from regionclip_jax.models import CLIP, CLIPConfig

TINY_CONFIG = dict(
    embed_dim=64,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,
    vision_patch_size=None,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=1,
)


def random_clip(config=None, *, seed: int = 0, dtype=None):
    """A CLIP (default: the tiny config) with random weights drawn in NumPy.

    Faster than running the initialisers eagerly (no per-op dispatch): kernels ~ N(0, 1/fan_in),
    norm scales and BN variances ~ U(0.75, 1.25), other vectors ~ N(0, 0.1). `dtype` is the
    compute dtype (parameters are float32); the same seed gives the same values for any dtype.
    """
    config = config or CLIPConfig(**TINY_CONFIG)
    dtype = jnp.float32 if dtype is None else dtype
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = var.get_value().shape
        if path[-1] in ("scale", "var"):
            value = rng.uniform(0.75, 1.25, shape)
        elif path[-1] == "logit_scale":
            value = np.log(1 / 0.07)
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = rng.standard_normal(shape) * 0.1
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    return model


def random_checkpoint(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Saves a tiny random-weight ResNet CLIP (for demos and tests) and returns its directory.

    An existing checkpoint at `directory` is reused.
    """
    directory = Path(directory)
    if (directory / METADATA_FILE).is_file():
        return directory.resolve()
    return save_clip(random_clip(seed=seed), directory)


def shapesworld_example(index: int = 0, *, seed: int = 0, split: str = "val"):
    """(image uint8 [S, S, 3], boxes float32 [N, 4] xyxy, shape names [N]) of one scene."""
    scene = render_scene(index, seed=seed, split=split)
    kept = scene.kept
    boxes = np.stack([o.box for o in kept]).astype(np.float32)
    return scene.image, boxes, [o.shape for o in kept]
