"""A tiny CLIP-res4 RPN with random weights, exported as `convert.rpn.export_rpn` writes it, and the
same weights in memory as the reference the loaders under test are compared with."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from helpers import TINY_CLIP

from regionclip_jax.convert import rpn as rpn_format
from regionclip_jax.models import CLIPConfig
from regionclip_jax.models import split as split_lib


def export_random_clip_rpn(directory, *, pre_nms_topk: int, post_nms_topk: int, nms_thresh: float):
    """Writes DIRECTORY/export (rpn.json + params.npz) and returns `reference(images, image_hw)`:
    the in-memory RPN with the same weights under the given test-time settings (boxes, logits,
    valid as the RPN module returns them; images float `[B, Hc, Wc, 3]` RGB 0..255)."""
    arch = {
        "kind": "clip",
        "anchor_sizes": [16.0, 32.0, 64.0],
        "aspect_ratios": [0.5, 1.0, 2.0],
        "pre_nms_topk": 6000,  # the exported values; the loader's settings replace them
        "post_nms_topk": 1000,
        "nms_thresh": 0.9,
        "freeze_at": 2,
        "clip_config": CLIPConfig(**TINY_CLIP).to_dict(),
    }
    # Random weights drawn in NumPy (an eager init is slow), larger than detectron2's N(0, 0.01)
    # head init so that proposals move off the anchors and their logits are well separated.
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith(("'scale']", "'var']")):
            return rng.uniform(0.75, 1.25, x.shape).astype(np.float32)
        if len(x.shape) >= 2:
            return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(
                np.float32
            )
        return (rng.standard_normal(x.shape) * 0.1).astype(np.float32)

    abstract = nnx.eval_shape(lambda: rpn_format.build_rpn(arch, nnx.Rngs(0)))
    _, params, rest = split_lib.split_model(abstract)
    params = jax.tree_util.tree_map_with_path(draw, params)
    rest = jax.tree_util.tree_map_with_path(draw, rest)
    rpn_format.export_rpn(arch, params, rest, str(directory / "export"))
    # The reference: the same in-memory weights under the test-time settings (static attributes
    # of the module graph).
    test_spec = dict(
        arch, pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk, nms_thresh=nms_thresh
    )
    ref_def, _, _ = split_lib.split_model(
        nnx.eval_shape(lambda: rpn_format.build_rpn(test_spec, nnx.Rngs(0)))
    )
    call = jax.jit(lambda p, r, x, hw: split_lib.merge(ref_def, p, r)(x, hw))

    def reference(images, image_hw):
        return call(params, rest, images, image_hw)

    return reference
