"""Proposal mode of the zero-shot recognizer (`RegionCLIP(rpn=...)`, spec §6.1-6.2).

A tiny random CLIP checkpoint and a tiny CLIP-res4 RPN exported with `convert.rpn.export_rpn`:
  - `proposals(image)` equals the RPN module (the object whose weights were exported) called
    directly on a canvas built here (PIL bicubic resize by the shortest-edge rule, zero padding,
    RGB 0..255), mapped back to original pixels by the resize scale;
  - `detect(image, vocab)` without boxes equals GT mode with those proposals as the boxes (no box
    regression in zero-shot inference, so the two must agree);
  - missing / wrong RPNs and a missing RPN fail with clear errors; `classify --rpn` runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_rpn import TINY_CLIP, export_random_clip_rpn

from regionclip_jax.inference import RegionCLIP
from regionclip_jax.inference.commands import main

SIZES = dict(min_size=64, max_size=96)  # canvases 64 x 96 (landscape) / 96 x 64 (portrait)
RPN_KW = dict(rpn_pre_nms_topk=200, rpn_post_nms_topk=40, rpn_nms_thresh=0.7)
WORDS = ["cat", "dog", "red car"]
# (file, original H x W, resized h x w by the shortest-edge rule, canvas)
IMAGES = [("land.png", (90, 120), (64, 85), (64, 96)), ("port.png", (120, 80), (96, 64), (96, 64))]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.convert.regionclip import RegionCLIPWeights, save_regionclip
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models import CLIPConfig

    tmp = tmp_path_factory.mktemp("proposals")
    config = CLIPConfig(**TINY_CLIP)
    ckpt = save_regionclip(RegionCLIPWeights(clip=random_clip(config), heads={}), tmp / "ckpt")
    reference_rpn = export_random_clip_rpn(
        tmp / "rpn_work",
        pre_nms_topk=RPN_KW["rpn_pre_nms_topk"],
        post_nms_topk=RPN_KW["rpn_post_nms_topk"],
        nms_thresh=RPN_KW["rpn_nms_thresh"],
    )

    rng = np.random.RandomState(0)
    for name, hw, _, _ in IMAGES:
        Image.fromarray((rng.rand(*hw, 3) * 255).astype(np.uint8)).save(tmp / name)
    (tmp / "words.txt").write_text("cat\ndog\nred car\n")
    model = RegionCLIP.from_checkpoint(
        ckpt, rpn=tmp / "rpn_work", cache_dir=tmp / "cache", **SIZES, **RPN_KW
    )
    return tmp, ckpt, reference_rpn, model


def reference_canvas(path, resized_hw, canvas):
    """RGB 0..255 float32 canvas: PIL bicubic resize to `resized_hw`, zeros bottom/right."""
    with Image.open(path) as im:
        r = np.asarray(im.convert("RGB").resize(resized_hw[::-1], Image.BICUBIC), np.float32)
    out = np.zeros((*canvas, 3), np.float32)
    out[: r.shape[0], : r.shape[1]] = r
    return out


@pytest.mark.parametrize("name,original_hw,resized_hw,canvas", IMAGES)
def test_proposals_equal_the_rpn_on_the_raw_canvas(env, name, original_hw, resized_hw, canvas):
    tmp, _, reference_rpn, model = env
    boxes, objectness = model.proposals(tmp / name)
    x = reference_canvas(tmp / name, resized_hw, canvas)
    rb, rl, rv = reference_rpn(x[None], np.asarray([resized_hw], np.int32))
    rv = np.asarray(rv[0])
    ref_boxes, ref_logits = np.asarray(rb[0])[rv], np.asarray(rl[0])[rv]
    (h, w), (nh, nw) = original_hw, resized_hw
    ref_boxes = ref_boxes / np.array([nw / w, nh / h, nw / w, nh / h])  # canvas -> original
    assert 5 <= len(ref_boxes) <= RPN_KW["rpn_post_nms_topk"]
    assert boxes.shape == (len(ref_boxes), 4) and boxes.dtype == np.float32
    assert objectness.shape == (len(ref_boxes),) and objectness.dtype == np.float32
    np.testing.assert_allclose(objectness, ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(boxes, ref_boxes, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(objectness) <= 0)
    # In the original image, and not all the same box.
    assert np.all(boxes >= 0) and np.all(boxes[:, [2, 3]] <= [w, h])
    assert len(np.unique(np.round(boxes), axis=0)) > 3


def test_detect_without_boxes_equals_gt_mode_on_the_proposals(env):
    tmp, _, _, model = env
    image = tmp / IMAGES[0][0]
    boxes, objectness = model.proposals(image)
    # Threshold 0: the random CLIP's class probabilities are tiny next to the background's.
    got = model.detect(image, WORDS, score_thresh=0.0)
    want = model.detect(image, WORDS, boxes=boxes, score_thresh=0.0)
    assert len(want) > 0 and got.names == want.names == WORDS
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-6, atol=1e-5)
    # Every detection is one of the proposals (no box regression).
    d = np.abs(got.boxes[:, None, :] - boxes[None]).max(-1)
    assert np.all(d.min(1) < 1e-4)
    # The per-proposal scores carry the RPN logits.
    regions = model.classify_proposals(image, WORDS)
    np.testing.assert_array_equal(regions.boxes, boxes)
    np.testing.assert_array_equal(regions.objectness, objectness)
    assert "objectness" in regions.to_dict()["regions"][0]


def test_rpn_settings_reach_the_rpn(env):
    tmp, ckpt, _, model = env
    assert model.has_rpn and model.rpn_arch["kind"] == "clip"
    assert (model.rpn_arch["pre_nms_topk"], model.rpn_arch["post_nms_topk"]) == (200, 40)
    assert model.rpn_arch["nms_thresh"] == 0.7
    # Defaults: the kind's pre-NMS top-k (CLIP res4 as C4: 6000), 1000, zero-shot NMS 0.9.
    default = RegionCLIP.from_checkpoint(ckpt, rpn=tmp / "rpn_work" / "export", cache_dir=None)
    arch = default.rpn_arch
    assert (arch["pre_nms_topk"], arch["post_nms_topk"], arch["nms_thresh"]) == (6000, 1000, 0.9)


def test_errors(env):
    tmp, ckpt, _, _ = env
    plain = RegionCLIP.from_checkpoint(ckpt, cache_dir=None, **SIZES)
    image = tmp / IMAGES[0][0]
    assert not plain.has_rpn
    for call in (lambda: plain.detect(image, WORDS), lambda: plain.proposals(image)):
        with pytest.raises(ValueError, match=r"needs an offline RPN.*rpn="):
            call()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RegionCLIP.from_checkpoint(ckpt, rpn=tmp / "no_such_rpn", cache_dir=None)
    with pytest.raises(FileNotFoundError, match="neither an `rpn` workdir"):
        RegionCLIP.from_checkpoint(ckpt, rpn=ckpt, cache_dir=None)  # a CLIP checkpoint dir
    np.savez(tmp / "not_rpn.npz", weight=np.zeros(3, np.float32))
    for bad in ("not_rpn.npz", "words.txt"):
        with pytest.raises(ValueError, match="is not a usable RPN"):
            RegionCLIP.from_checkpoint(ckpt, rpn=tmp / bad, cache_dir=None)
    with pytest.raises(ValueError, match="rpn_nms_thresh"):
        RegionCLIP.from_checkpoint(ckpt, rpn=tmp / "rpn_work", rpn_nms_thresh=0.0, cache_dir=None)


def test_cli_classify_with_rpn(env, capsys):
    tmp, ckpt, _, model = env
    image = str(tmp / IMAGES[0][0])
    argv = ["classify", "--checkpoint", str(ckpt), "--cache-dir", str(tmp / "cache")]
    argv += ["--min-size", "64", "--max-size", "96", "--image", image]
    argv += ["--vocabulary", str(tmp / "words.txt"), "--out", str(tmp / "dets.json")]
    argv += ["--score-thresh", "0"]
    rpn = ["--rpn", str(tmp / "rpn_work"), "--rpn-pre-nms-topk", "200"]
    rpn += ["--rpn-post-nms-topk", "40", "--rpn-nms-thresh", "0.7"]
    assert main([*argv, *rpn]) == 0
    res = json.loads((tmp / "dets.json").read_text())
    assert res["classes"] == WORDS
    (r,) = res["results"]
    want = model.detect(image, WORDS, score_thresh=0.0)
    assert len(want) > 0
    assert [d["label"] for d in r["detections"]] == [WORDS[k] for k in want.labels]
    np.testing.assert_allclose([d["box"] for d in r["detections"]], want.boxes, atol=0.006)
    np.testing.assert_allclose([d["score"] for d in r["detections"]], want.scores, rtol=1e-5)
    boxes, objectness = model.proposals(image)
    assert len(r["regions"]) == len(boxes)
    np.testing.assert_allclose([g["objectness"] for g in r["regions"]], objectness, rtol=1e-5)
    capsys.readouterr()
    # Neither --boxes nor --rpn: exit 2 naming both.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("regionclip-jax classify: error:")
    assert "--boxes" in err and "--rpn" in err
    # Both: argparse refuses.
    (tmp / "boxes.json").write_text("[[2, 3, 60, 50]]")
    with pytest.raises(SystemExit):
        main([*argv, *rpn, "--boxes", str(tmp / "boxes.json")])
    assert "not allowed with" in capsys.readouterr().err
