"""RegionCLIP detectron2 checkpoints: a `.pth` with the spec's key names (§7.2) built here from a
random open_clip model loads and gives the region logits of a PyTorch reference (open_clip
modules + torchvision RoIAlign + the cosine/0.01 classifier with a zero background column,
written here from spec §2.4); bad files fail naming the key."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from regionclip_jax.convert.regionclip import (
    load_regionclip,
    load_regionclip_file,
    pretrain_init_from_openai,
    regionclip_from_state_dict,
    regionclip_to_state_dict,
    save_regionclip,
    split_regionclip_state_dict,
)
from regionclip_jax.losses.common import logits_with_background
from regionclip_jax.models.region import RegionEncoder

TEXT = dict(width=64, heads=1, layers=1, vocab_size=300)
VISION = dict(layers=[1, 1, 1, 1], width=16, image_size=64)
EMBED = 32


def torch_clip(seed: int = 0):
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(EMBED, VISION, TEXT, quick_gelu=True).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.ndim == 1 and t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith("weight"):
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def regionclip_sd(tm, num_classes: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A RegionCLIP pretraining/transfer state dict with the spec's names, as numpy arrays."""
    rng = np.random.RandomState(seed)
    sd = {}
    for k, v in tm.state_dict().items():
        a = v.numpy().copy()
        if k.endswith("num_batches_tracked") or k == "logit_scale":
            continue
        if k.startswith("visual."):
            sd["backbone." + k[7:]] = a
            sd["teacher_backbone." + k[7:]] = a * 1.5 if a.ndim == 4 else a
        else:
            sd["lang_encoder." + k] = a
    p = "roi_heads.box_predictor."
    sd[p + "cls_score.weight"] = rng.randn(num_classes, EMBED).astype(np.float32)
    sd[p + "test_cls_score.weight"] = rng.randn(num_classes + 2, EMBED).astype(np.float32)
    sd[p + "cls_bg_score.weight"] = np.zeros((1, EMBED), np.float32)
    sd[p + "bbox_pred.weight"] = rng.randn(4, EMBED).astype(np.float32) * 1e-3
    sd[p + "bbox_pred.bias"] = np.zeros(4, np.float32)
    sd["offline_backbone.res2.0.conv1.weight"] = rng.randn(64, 64, 1, 1).astype(np.float32)
    sd["offline_proposal_generator.rpn_head.conv.weight"] = rng.randn(8, 8, 3, 3).astype(np.float32)
    return sd


def torch_region_logits(tm, images, boxes, class_emb, pooler) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    from torchvision.ops import roi_align

    v = tm.visual
    b, r = boxes.shape[:2]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        res4 = v.layer3(v.layer2(v.layer1(v.stem(x))))
        idx = np.repeat(np.arange(b, dtype=np.float32), r)[:, None]
        rois = torch.from_numpy(np.concatenate([idx, boxes.reshape(-1, 4)], axis=1))
        feats = v.attnpool(v.layer4(roi_align(res4, rois, pooler, 1 / 16, 0, True)))
        cls = F.normalize(feats, dim=-1) @ F.normalize(torch.from_numpy(class_emb), dim=-1).T
        logits = torch.cat([cls, torch.zeros(len(cls), 1)], dim=1) / 0.01
    return logits.numpy().reshape(b, r, -1)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.torch_ref
def test_regionclip_pth_loads_and_gives_reference_logits(tmp_path):
    import torch

    tm = torch_clip()
    sd = regionclip_sd(tm)
    path = tmp_path / "regionclip_pretrained-tiny.pth"
    # detectron2 checkpoints pickle numpy arrays inside {'model': ...}.
    torch.save({"model": sd, "__author__": "test"}, path)
    from regionclip_jax.convert.torch_files import CheckpointFormatError

    with pytest.raises((CheckpointFormatError, ValueError)):
        load_regionclip_file(path)  # numpy pickles need trust_pickle
    with pytest.warns(UserWarning, match="2 keys not loaded"):
        w = load_regionclip_file(path, trust_pickle=True, load_teacher=True)
    assert w.ignored == sorted(k for k in sd if k.startswith("offline_"))
    assert set(w.heads) == {
        "cls_score.weight",
        "test_cls_score.weight",
        "cls_bg_score.weight",
        "bbox_pred.weight",
        "bbox_pred.bias",
    }
    assert w.clip.config.embed_dim == EMBED
    # logit_scale is absent from RegionCLIP files: OpenAI's initial value.
    assert math.isclose(float(w.clip.logit_scale[...]), math.log(1 / 0.07), rel_tol=1e-6)
    # Teacher = teacher_backbone.* (different conv weights from the student here).
    t_conv = np.asarray(w.teacher.conv1.kernel[...])
    np.testing.assert_allclose(t_conv, 1.5 * np.asarray(w.clip.visual.conv1.kernel[...]), 1e-6)

    rng = np.random.RandomState(0)
    images = rng.randn(1, 96, 128, 3).astype(np.float32)
    boxes = np.array([[[4, 6, 60, 70], [0, 0, 128, 96], [30.5, 20.2, 31.5, 22], [90, 50, 140, 99]]])
    boxes = boxes.astype(np.float32)
    emb = sd["roi_heads.box_predictor.cls_score.weight"]
    ref = torch_region_logits(tm, images, boxes, emb, 4)
    feats = RegionEncoder(w.clip.visual)(jnp.asarray(images), jnp.asarray(boxes))
    ours = logits_with_background(feats, jnp.asarray(w.heads["cls_score.weight"]))
    assert ours.shape == (1, 4, 6)
    np.testing.assert_array_equal(ours[..., -1], 0.0)
    assert rel_err(ours, ref) <= 1e-4

    # Save + load round trip keeps the heads; back to RegionCLIP names is the identity.
    dest = save_regionclip(w, tmp_path / "ckpt", source=path)
    loaded = load_regionclip(dest)
    for k, v in w.heads.items():
        np.testing.assert_array_equal(loaded.heads[k], v)
    back = regionclip_to_state_dict(w)
    for k, v in sd.items():
        if not k.startswith("offline_"):
            np.testing.assert_allclose(back[k], v, rtol=0, atol=0, err_msg=k)
    assert not set(back) - set(sd)


@pytest.mark.torch_ref
def test_bad_regionclip_files_name_the_key():
    tm = torch_clip()
    sd = regionclip_sd(tm)

    for key in ("backbone.layer1.0.conv1.weight", "backbone.layer2.0.conv2.weight"):
        bad = dict(sd)
        bad[key] = np.zeros((3, 3, 1, 1), np.float32)
        with pytest.raises(ValueError, match=r"(?s)^RegionCLIP checkpoint: .*" + re.escape(key)):
            regionclip_from_state_dict(bad)

    bad = dict(sd)  # an architecture with a fifth stage
    bad["backbone.layer5.0.conv1.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"backbone\.layer5\.0\.conv1\.weight"):
        regionclip_from_state_dict(bad)

    bad = dict(sd)
    bad["roi_heads.box_predictor.cls_score.weight"] = np.zeros((5, EMBED + 1), np.float32)
    with pytest.raises(ValueError, match=r"roi_heads\.box_predictor\.cls_score\.weight"):
        regionclip_from_state_dict(bad, load_teacher=False)

    bad = dict(sd)
    bad["roi_heads.box_head.fc1.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"unknown keys.*roi_heads\.box_head\.fc1\.weight"):
        split_regionclip_state_dict(bad)

    bad = {k: v for k, v in sd.items() if not k.startswith("lang_encoder.")}
    with pytest.raises(ValueError, match="lang_encoder"):
        regionclip_from_state_dict(bad)
    # ... unless the text tower comes from an OpenAI CLIP state dict.
    text = {k: v.numpy() for k, v in tm.state_dict().items()}
    with pytest.warns(UserWarning, match="not loaded"):
        w = regionclip_from_state_dict(bad, text_state_dict=text, load_teacher=False)
    np.testing.assert_array_equal(np.asarray(w.clip.text_projection[...]), text["text_projection"])

    bad = {k: v for k, v in sd.items() if k != "backbone.attnpool.c_proj.bias"}
    with pytest.raises(ValueError, match=r"missing key 'backbone\.attnpool\.c_proj\.bias'"):
        regionclip_from_state_dict(bad)


@pytest.mark.torch_ref
def test_pretrain_init_copies_the_visual_tower():
    tm = torch_clip()
    w = pretrain_init_from_openai(tm.state_dict())
    assert w.heads == {}
    s_leaves = jax.tree.leaves(nnx.state(w.clip.visual))
    t_leaves = jax.tree.leaves(nnx.state(w.teacher))
    assert len(s_leaves) == len(t_leaves)
    for a, b in zip(s_leaves, t_leaves):
        np.testing.assert_array_equal(a, b)
    # Independent copies: changing the student leaves the teacher as it was.
    before = np.asarray(w.teacher.conv1.kernel[...]).copy()
    w.clip.visual.conv1.kernel[...] = jnp.zeros_like(w.clip.visual.conv1.kernel[...])
    np.testing.assert_array_equal(w.teacher.conv1.kernel[...], before)
