"""Region encoder vs a PyTorch reference assembled from open_clip modules + torchvision RoIAlign.

Reference (independent of our code): open_clip's ModifiedResNet `stem`/`layer1..3` -> res4,
`torchvision.ops.roi_align(aligned=True, sampling_ratio=0, spatial_scale=1/16)` -> `layer4` ->
`attnpool` (spec §2.3-2.4); for the ViT, open_clip's VisionTransformer with its positional
embedding resized by `F.interpolate(bicubic)` (RegionCLIP zero-shot branch), RoIAlign on the patch
grid, mean, `ln_post`, `proj`. Weights are random (BN statistics randomised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import open_clip_model

from regionclip_jax.convert.state_dict import clip_from_state_dict, infer_config
from regionclip_jax.models.region import (
    RegionEncoder,
    box_mask,
    default_pooler_resolution,
    global_boxes,
    interpolate_pos_embed,
)

TINY_TEXT = dict(width=64, heads=4, layers=1, vocab_size=500)


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_clip(embed_dim: int, vision_cfg: dict, seed: int = 0):
    return open_clip_model(embed_dim, vision_cfg, TINY_TEXT, seed)


def ours_from(tm):
    config = infer_config(tm.state_dict(), transformer_heads=TINY_TEXT["heads"])
    return clip_from_state_dict(tm.state_dict(), config=config)


def detection_boxes(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    """float32 [n, 4]: random boxes plus tiny, huge, whole-image and partly-outside ones."""
    rng = np.random.RandomState(seed)
    special = np.array(
        [
            [10.0, 12.0, 11.5, 13.0],  # tiny (1.5 x 1 px)
            [0.0, 0.0, w, h],  # whole image
            [-30.0, -20.0, w + 40.0, h + 25.0],  # larger than the image
            [w - 50.0, h - 40.0, w + 60.0, h + 30.0],  # partly outside
            [100.3, 50.7, 100.9, 51.2],  # sub-pixel
        ],
        np.float32,
    )
    k = n - len(special)
    xy = rng.uniform(0, [w - 8, h - 8], (k, 2))
    wh = rng.uniform(4, [w, h], (k, 2)) * rng.uniform(0.05, 1.0, (k, 1))
    rand = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1).astype(np.float32)
    return np.concatenate([special, rand])[:n]


def torch_resnet_regions(tm, images: np.ndarray, boxes: np.ndarray, pooler: int) -> np.ndarray:
    """[B, R, D] region features by the RegionCLIP recipe on open_clip + torchvision modules."""
    import torch
    from torchvision.ops import roi_align

    v = tm.visual
    b, r = boxes.shape[:2]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        res4 = v.layer3(v.layer2(v.layer1(v.stem(x))))
        idx = np.repeat(np.arange(b, dtype=np.float32), r)[:, None]
        rois = torch.from_numpy(np.concatenate([idx, boxes.reshape(-1, 4)], axis=1))
        crops = roi_align(res4, rois, (pooler, pooler), 1 / 16, sampling_ratio=0, aligned=True)
        out = v.attnpool(v.layer4(crops))
    return out.numpy().reshape(b, r, -1)


def jit_encoder(encoder: RegionEncoder, method: str = "__call__"):
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return lambda *args: run(state, *args)


# ---------------------------------------------------------------------------------- unit checks


def test_box_mask_and_global_boxes():
    boxes = jnp.array([[[0, 0, 10, 10], [5, 5, 5, 9], [3, 4, 2, 8], [0, 0, jnp.nan, 1]]], float)
    np.testing.assert_array_equal(box_mask(boxes), [[True, False, False, False]])
    mask = jnp.array([[False, True, True, True]])
    np.testing.assert_array_equal(box_mask(boxes, mask), [[False, False, False, False]])
    g = global_boxes(jnp.array([[480, 640], [300, 200]]))
    np.testing.assert_array_equal(g, [[[0, 0, 640, 480]], [[0, 0, 200, 300]]])


@pytest.mark.torch_ref
@pytest.mark.parametrize("size", [(7, 13), (14, 14), (20, 9), (5, 3)])
def test_pos_embed_interpolation_matches_torch_bicubic(size):
    import torch
    import torch.nn.functional as F

    rng = np.random.RandomState(0)
    pos = rng.randn(1 + 7 * 7, 12).astype(np.float32)
    grid = torch.from_numpy(pos[1:]).reshape(1, 7, 7, 12).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    ref = np.concatenate([pos[:1], ref.permute(0, 2, 3, 1).reshape(-1, 12).numpy()])
    ours = interpolate_pos_embed(jnp.asarray(pos), size)
    assert rel_err(ours, ref) <= 1e-5
    assert interpolate_pos_embed(jnp.asarray(pos), (7, 7)) is not None


# ---------------------------------------------------------------------------- ResNet parity


@pytest.mark.torch_ref
def test_tiny_resnet_regions_batched_masked_chunked():
    """Tiny tower (P = 4): batch of 2, non-multiple-of-32 canvas, padded slots, chunked head,
    global box; equals the reference computed per image."""
    tm = torch_clip(32, dict(layers=[1, 1, 1, 1], width=16, image_size=64))
    visual = ours_from(tm).visual
    assert default_pooler_resolution(visual) == 4
    rng = np.random.RandomState(1)
    images = rng.randn(2, 96, 136, 3).astype(np.float32)
    boxes = np.stack([detection_boxes(96, 136, 8, seed=s) for s in (0, 1)])
    boxes[1, -2:] = 0.0  # padded slots
    ref = torch_resnet_regions(tm, images, boxes, 4)
    enc = RegionEncoder(visual)
    out = jit_encoder(enc)(jnp.asarray(images), jnp.asarray(boxes))
    assert out.shape == (2, 8, 32)
    assert rel_err(out, ref) <= 1e-4
    np.testing.assert_array_equal(box_mask(jnp.asarray(boxes))[1], [True] * 6 + [False] * 2)
    # Chunked RoI head (lax.map over 4 chunks of 4 crops) gives the same result.
    chunked = jit_encoder(RegionEncoder(visual, box_chunk=4))(
        jnp.asarray(images), jnp.asarray(boxes)
    )
    np.testing.assert_allclose(chunked, out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="box_chunk"):
        RegionEncoder(visual, box_chunk=5).pool(jnp.zeros((2, 6, 9, 64)), jnp.asarray(boxes))
    # Global box = [0, 0, w, h] of each image's true size.
    hw = np.array([[96, 136], [80, 100]])
    _, glob = jit_encoder(enc, "with_global")(jnp.asarray(images), jnp.asarray(boxes), hw)
    gboxes = np.array([[[0, 0, 136, 96]], [[0, 0, 100, 80]]], np.float32)
    assert rel_err(glob, torch_resnet_regions(tm, images, gboxes, 4)[:, 0]) <= 1e-4


@pytest.mark.torch_ref
@pytest.mark.parametrize(
    "name,layers,width,res,embed",
    [
        ("RN50", [3, 4, 6, 3], 64, 224, 1024),
        pytest.param("RN50x4", [4, 6, 10, 6], 80, 288, 640, marks=pytest.mark.slow),
    ],
)
def test_resnet_regions_match_torch_reference(name, layers, width, res, embed):
    """RN50 / RN50x4 (random weights): one 320x480 image, 20 boxes (tiny, huge, partly outside)."""
    tm = torch_clip(embed, dict(layers=layers, width=width, image_size=res))
    visual = ours_from(tm).visual
    pooler = default_pooler_resolution(visual)
    assert pooler == {"RN50": 14, "RN50x4": 18}[name]
    images = np.random.RandomState(2).randn(1, 320, 480, 3).astype(np.float32)
    boxes = detection_boxes(320, 480, 20)[None]
    ref = torch_resnet_regions(tm, images, boxes, pooler)
    out = jit_encoder(RegionEncoder(visual))(jnp.asarray(images), jnp.asarray(boxes))
    assert out.shape == (1, 20, embed)
    assert rel_err(out, ref) <= 1e-4


# ------------------------------------------------------------------------------- ViT parity


@pytest.mark.torch_ref
def test_vit_regions_match_torch_reference():
    import torch
    from torchvision.ops import roi_align

    tm = torch_clip(32, dict(layers=2, width=64, head_width=64, patch_size=16, image_size=64))
    visual = ours_from(tm).visual
    enc = RegionEncoder(visual)
    assert enc.pooler_resolution == 4 and enc.stride == 16
    h, w = 96, 160  # non-square 6 x 10 patch grid
    images = np.random.RandomState(3).randn(2, h, w, 3).astype(np.float32)
    boxes = np.stack([detection_boxes(h, w, 6, seed=s) for s in (0, 1)])

    v = tm.visual
    with torch.no_grad():
        pos = v.positional_embedding.detach()
        grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(
            grid, size=(h // 16, w // 16), mode="bicubic", align_corners=False
        )
        new_pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])
        v.positional_embedding = torch.nn.Parameter(new_pos)
        captured = {}
        hook = v.transformer.register_forward_hook(lambda m, i, o: captured.update(out=o))
        v(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        hook.remove()
        tokens = captured["out"]  # [B, 1 + gh*gw, W] (open_clip 3 is batch-first)
        fmap = tokens[:, 1:].reshape(2, h // 16, w // 16, -1).permute(0, 3, 1, 2)
        idx = np.repeat(np.arange(2, dtype=np.float32), 6)[:, None]
        rois = torch.from_numpy(np.concatenate([idx, boxes.reshape(-1, 4)], axis=1))
        crops = roi_align(fmap, rois, (4, 4), 1 / 16, sampling_ratio=0, aligned=True)
        ref = (v.ln_post(crops.mean(dim=(2, 3))) @ v.proj).numpy().reshape(2, 6, -1)
    out = jit_encoder(enc)(jnp.asarray(images), jnp.asarray(boxes))
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.learning
@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_bf16_compute_close_to_fp32(vision, learning_seed, report_margin):
    """bf16 compute (fp32 params) stays close to fp32 under jit (guards the jax 0.12 CPU bf16
    conv -> fp32 reduction -> conv issue, since RoIAlign accumulates in fp32)."""
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models import CLIPConfig

    if vision == "resnet":
        kw = dict(vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None)
    else:
        kw = dict(vision_layers=1, vision_width=64, vision_patch_size=16)
    config = CLIPConfig(
        embed_dim=32,
        image_resolution=64,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
        vocab_size=100,
        **kw,
    )
    f32 = random_clip(config, seed=learning_seed)
    b16 = random_clip(config, seed=learning_seed, dtype=jnp.bfloat16)
    images = jnp.asarray(np.random.RandomState(learning_seed).randn(1, 96, 128, 3), jnp.float32)
    boxes = jnp.asarray(detection_boxes(96, 128, 8, seed=learning_seed)[None])
    ref = jit_encoder(RegionEncoder(f32.visual))(images, boxes)
    out = jit_encoder(RegionEncoder(b16.visual))(images, boxes)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    err = rel_err(np.asarray(out, np.float32), ref)
    report_margin(err, 5e-2, higher_is_better=False, what="bf16 vs fp32 max rel error")
    assert err <= 5e-2
