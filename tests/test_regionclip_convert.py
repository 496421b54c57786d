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
from torch_reference import open_clip_model

from regionclip_jax.convert.regionclip import (
    MASK_HEAD_KEYS,
    RegionCLIPWeights,
    load_mask_head,
    load_regionclip,
    load_regionclip_file,
    mask_head_arrays,
    pretrain_init_from_openai,
    regionclip_from_state_dict,
    regionclip_to_state_dict,
    save_regionclip,
    split_regionclip_state_dict,
)
from regionclip_jax.losses.common import logits_with_background
from regionclip_jax.models.detector import OVDFastRCNN
from regionclip_jax.models.region import RegionEncoder

TEXT = dict(width=64, heads=1, layers=1, vocab_size=300)
VISION = dict(layers=[1, 1, 1, 1], width=16, image_size=64)
EMBED = 32


def torch_clip(seed: int = 0):
    return open_clip_model(EMBED, VISION, TEXT, seed)


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


# -------------------------------------------------------------------------------- mask head

RES5 = VISION["width"] * 32  # the mask head's input width (2048 for RN50)


def torch_mask_head(seed: int = 0):
    """detectron2 `MaskRCNNConvUpsampleHead` with NUM_CONV 0, class-agnostic: deconv =
    ConvTranspose2d(C, 256, 2, stride 2) -> ReLU -> predictor = Conv2d(256, 1, 1)."""
    import torch

    torch.manual_seed(seed)
    deconv = torch.nn.ConvTranspose2d(RES5, 256, kernel_size=2, stride=2, padding=0)
    predictor = torch.nn.Conv2d(256, 1, kernel_size=1, stride=1, padding=0)
    with torch.no_grad():
        for t in (deconv.bias, predictor.weight, predictor.bias):
            t.normal_(0.0, 0.1)

    def forward(x):
        return predictor(torch.relu(deconv(x)))

    sd = {f"deconv.{k}": v.detach().numpy().copy() for k, v in deconv.state_dict().items()}
    sd.update(
        {f"predictor.{k}": v.detach().numpy().copy() for k, v in predictor.state_dict().items()}
    )
    return forward, sd


def detector_with_mask_head(visual) -> OVDFastRCNN:
    return OVDFastRCNN(
        visual, num_train_classes=3, num_test_classes=3, mask_head=True, rngs=nnx.Rngs(9)
    )


@pytest.mark.torch_ref
def test_released_mask_head_loads_and_gives_reference_logits(tmp_path):
    """`roi_heads.mask_head.*` of an LVIS checkpoint -> our MaskHead: the same mask logits as the
    torch head on random res5 features (max|d| / max|ref| <= 1e-5); kept through save / load and
    back to RegionCLIP names."""
    import torch

    tm = torch_clip()
    sd = regionclip_sd(tm)
    forward, head_sd = torch_mask_head()
    assert head_sd["deconv.weight"].shape == (RES5, 256, 2, 2)
    assert head_sd["predictor.weight"].shape == (1, 256, 1, 1)
    sd.update({"roi_heads.mask_head." + k: v for k, v in head_sd.items()})
    with pytest.warns(UserWarning, match="2 keys not loaded"):
        w = regionclip_from_state_dict(sd, load_teacher=False)
    assert not any("mask_head" in k for k in w.ignored)
    assert set(w.mask_head) == set(MASK_HEAD_KEYS)

    det = detector_with_mask_head(w.clip.visual)
    load_mask_head(det.mask_head, w.mask_head)
    rng = np.random.RandomState(0)
    res5 = rng.randn(5, 7, 7, RES5).astype(np.float32)  # NHWC, as the detector's res5 maps
    ours = np.asarray(det.mask_head(jnp.asarray(res5)))
    with torch.no_grad():
        ref = forward(torch.from_numpy(res5.transpose(0, 3, 1, 2).copy()))[:, 0].numpy()
    assert ours.shape == ref.shape == (5, 14, 14)
    assert rel_err(ours, ref) <= 1e-5

    dest = save_regionclip(w, tmp_path / "ckpt")
    loaded = load_regionclip(dest)
    for k, v in head_sd.items():
        np.testing.assert_array_equal(loaded.mask_head[k], v)
    back = regionclip_to_state_dict(w)
    for k, v in head_sd.items():
        np.testing.assert_array_equal(back["roi_heads.mask_head." + k], v)
    for k, v in mask_head_arrays(det.mask_head).items():
        np.testing.assert_array_equal(v, head_sd[k])

    # A class-specific predictor, or a deconv of another res5 width, fail naming the key.
    bad = dict(sd)
    bad["roi_heads.mask_head.predictor.weight"] = np.zeros((5, 256, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"mask_head\.predictor\.weight.*class-specific"):
        regionclip_from_state_dict(bad, load_teacher=False)
    bad = dict(sd)
    bad["roi_heads.mask_head.deconv.weight"] = np.zeros((RES5 // 2, 256, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"mask_head\.deconv\.weight"):
        regionclip_from_state_dict(bad, load_teacher=False)
    bad = {k: v for k, v in sd.items() if k != "roi_heads.mask_head.deconv.bias"}
    with pytest.raises(ValueError, match=r"mask_head\.deconv\.bias"):
        regionclip_from_state_dict(bad, load_teacher=False)
    bad = dict(sd, **{"roi_heads.mask_head.mask_fcn1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unknown keys.*mask_fcn1"):
        split_regionclip_state_dict(bad)


def test_mask_head_arrays_map_to_the_conv_transpose():
    """Without torch: `load_mask_head` of PyTorch-layout arrays = a NumPy ConvTranspose2d(k=2,
    s=2) -> ReLU -> 1x1 written from its definition, and `mask_head_arrays` inverts it."""
    from regionclip_jax.models.resnet import ModifiedResNet

    visual = ModifiedResNet((1, 1, 1, 1), EMBED, 1, 64, 16, rngs=nnx.Rngs(0))
    det = detector_with_mask_head(visual)
    rng = np.random.RandomState(1)
    c = 16 * 32
    arrays = {
        "deconv.weight": rng.randn(c, 256, 2, 2).astype(np.float32) * 0.05,
        "deconv.bias": rng.randn(256).astype(np.float32) * 0.1,
        "predictor.weight": rng.randn(1, 256, 1, 1).astype(np.float32) * 0.1,
        "predictor.bias": rng.randn(1).astype(np.float32),
    }
    load_mask_head(det.mask_head, arrays)
    x = rng.randn(2, 3, 3, c).astype(np.float32)
    # ConvTranspose2d, stride 2, kernel 2: out[o, 2i + a, 2j + b] = sum_c x[c, i, j] W[c, o, a, b].
    up = np.zeros((2, 6, 6, 256))
    for n, i, j, a, b in np.ndindex(2, 3, 3, 2, 2):
        up[n, 2 * i + a, 2 * j + b] = (
            x[n, i, j].astype(np.float64) @ arrays["deconv.weight"][:, :, a, b]
        )
    up = np.maximum(up + arrays["deconv.bias"], 0.0)
    want = up @ arrays["predictor.weight"][0, :, 0, 0] + arrays["predictor.bias"][0]
    got = np.asarray(det.mask_head(jnp.asarray(x)))
    assert rel_err(got, want) <= 1e-5
    for k, v in mask_head_arrays(det.mask_head).items():
        np.testing.assert_array_equal(v, arrays[k])
    # A checkpoint without the head is refused, not silently left at the random init.
    with pytest.raises(ValueError, match="no roi_heads.mask_head"):
        load_mask_head(det.mask_head, {})
    assert RegionCLIPWeights(clip=None, heads={}).mask_head == {}
