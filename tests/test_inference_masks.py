"""Instance masks at inference (issue 20, item 4) and the mask head of a converted checkpoint as the
`detect` trainer's init (item 3), on a tiny random RegionCLIP checkpoint with a random mask head.

Reference of `RegionCLIP.detect`'s masks, written here: the res5 maps of the detections' boxes from
the visual tower's pieces (trunk -> RoIAlign(P, 1/16, 0, aligned) -> layer4) on the preprocessed
canvas, the boxes taken to the canvas in NumPy; detectron2's `MaskRCNNConvUpsampleHead` in NumPy
from the PyTorch-layout arrays (ConvTranspose2d 2x2 stride 2 = one tap per output pixel, ReLU, 1x1
conv), sigmoid; and `paste_masks_in_image` in NumPy from its definition (grid_sample, bilinear,
zeros padding, align_corners=False, at every pixel centre of the original image, >= 0.5).
"""

from __future__ import annotations

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CLIP as TINY
from helpers import experiment_config
from PIL import Image
from pycocotools import mask as mask_utils

from regionclip_jax.inference import RegionCLIP
from regionclip_jax.inference.commands import main
from regionclip_jax.models import split as split_lib

SIZES = dict(min_size=64, max_size=96)
SIZE_ARGS = ["--min-size", "64", "--max-size", "96"]
WORDS = ["cat", "dog"]
BOXES = [[2, 3, 60, 50], [10, 10, 70, 80], [50.5, 20.2, 119, 89], [30, 40, 33.5, 44.0]]
RES5 = TINY["vision_width"] * 32
CONV_DIM = 16


def random_mask_head(seed: int = 3, conv_dim: int = CONV_DIM) -> dict[str, np.ndarray]:
    """PyTorch-layout arrays of a class-agnostic head (deconv [C, D, 2, 2], predictor [1, D, 1, 1])."""
    rng = np.random.RandomState(seed)
    return {
        "deconv.weight": (rng.randn(RES5, conv_dim, 2, 2) / np.sqrt(RES5)).astype(np.float32),
        "deconv.bias": (rng.randn(conv_dim) * 0.1).astype(np.float32),
        "predictor.weight": (rng.randn(1, conv_dim, 1, 1) * 32 / np.sqrt(conv_dim)).astype(
            np.float32
        ),
        "predictor.bias": np.asarray([1.0], np.float32),
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.convert.regionclip import RegionCLIPWeights, save_regionclip
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models import CLIPConfig

    tmp = tmp_path_factory.mktemp("inference_masks")
    clip = random_clip(CLIPConfig(**TINY))
    heads = {"cls_score.weight": np.ones((3, 32), np.float32)}
    arrays = random_mask_head()
    with_mask = save_regionclip(
        RegionCLIPWeights(clip=clip, heads=heads, mask_head=arrays), tmp / "ckpt_mask"
    )
    plain = save_regionclip(RegionCLIPWeights(clip=clip, heads=heads), tmp / "ckpt_plain")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(90, 120, 3) * 255).astype(np.uint8)).save(tmp / "a.png")
    (tmp / "boxes.json").write_text(json.dumps(BOXES))
    return tmp, with_mask, plain, arrays


@pytest.fixture(scope="module")
def model(env):
    tmp, with_mask, _, _ = env
    return RegionCLIP.from_checkpoint(with_mask, cache_dir=tmp / "cache", **SIZES)


# --------------------------------------------------------------------------------- references


def reference_res5(visual, canvas: np.ndarray, canvas_boxes: np.ndarray, pooler: int) -> np.ndarray:
    """float64 [N, S, S, C]: trunk -> RoIAlign -> layer4 of the canvas (tower pieces)."""
    from regionclip_jax.ops import roi_align

    res4 = visual.trunk(jnp.asarray(canvas[None], jnp.float32))
    crops = roi_align(
        res4, jnp.asarray(canvas_boxes[None], jnp.float32), (pooler, pooler), 1 / 16, 0, True
    )
    crops = crops.reshape(len(canvas_boxes), pooler, pooler, -1)
    return np.asarray(visual.res5(crops), np.float64)


def numpy_mask_head(x: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """ConvTranspose2d(k=2, s=2): out[o, 2i + a, 2j + b] = b[o] + sum_c x[c, i, j] W[c, o, a, b];
    ReLU; 1x1 conv to one channel. x: [N, S, S, C] -> [N, 2S, 2S] logits (float64)."""
    n, s = x.shape[:2]
    w = arrays["deconv.weight"].astype(np.float64)
    up = np.zeros((n, 2 * s, 2 * s, w.shape[1]))
    for a in range(2):
        for b in range(2):
            up[:, a::2, b::2] = x @ w[:, :, a, b]
    up = np.maximum(up + arrays["deconv.bias"], 0.0)
    return up @ arrays["predictor.weight"][0, :, 0, 0].astype(np.float64) + float(
        arrays["predictor.bias"][0]
    )


def numpy_paste(prob: np.ndarray, box: np.ndarray, h: int, w: int) -> np.ndarray:
    """float64 [H, W]: grid_sample(bilinear, zeros, align_corners=False) of the M x M map at every
    pixel centre, normalised to the box (detectron2 `_do_paste_mask`)."""
    m = prob.shape[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    gx = (np.arange(w) + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy = (np.arange(h) + 0.5 - y0) / (y1 - y0) * 2 - 1
    ix = ((gx + 1) * m - 1) / 2  # unnormalised sample positions, align_corners=False
    iy = ((gy + 1) * m - 1) / 2
    padded = np.zeros((m + 2, m + 2))
    padded[1:-1, 1:-1] = prob  # zeros padding: taps outside the map read 0
    xw, yn = np.floor(ix), np.floor(iy)
    out = np.zeros((h, w))
    for yy, wy in ((yn, yn + 1 - iy), (yn + 1, iy - yn)):
        for xx, wx in ((xw, xw + 1 - ix), (xw + 1, ix - xw)):
            yi = np.clip(yy, -1, m).astype(int) + 1
            xi = np.clip(xx, -1, m).astype(int) + 1
            out += wy[:, None] * wx[None, :] * padded[yi[:, None], xi[None, :]]
    return out


# -------------------------------------------------------------------------------------- tests


def test_detect_masks_match_numpy_reference(env, model):
    from regionclip_jax.inference.preprocess import preprocess

    tmp, _, _, arrays = env
    assert model.has_mask_head
    dets = model.detect(tmp / "a.png", WORDS, boxes=BOXES, score_thresh=0.0, nms_thresh=1.0)
    assert dets.masks is not None and len(dets.masks) == len(dets) == len(BOXES) * len(WORDS)

    prepared = preprocess(tmp / "a.png", **SIZES)
    h, w = prepared.original_hw
    (ch, cw) = prepared.image_hw
    scale = np.array([cw / w, ch / h, cw / w, ch / h])
    canvas_boxes = (dets.boxes.astype(np.float64) * scale).astype(np.float32)
    pooler = 2 * (TINY["image_resolution"] // 32)
    res5 = reference_res5(model.clip.visual, prepared.image, canvas_boxes, pooler)
    probs = 1.0 / (1.0 + np.exp(-numpy_mask_head(res5, arrays)))
    assert probs.shape == (len(dets), pooler, pooler)
    np.testing.assert_allclose(
        model.mask_probabilities(
            model.encoder.feature_map(jnp.asarray(prepared.image[None])), canvas_boxes
        ),
        probs,
        atol=2e-5,
    )

    areas = []
    for i, rle in enumerate(dets.masks):
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        got = mask_utils.decode(rle).astype(bool)
        vals = numpy_paste(probs[i], dets.boxes[i], h, w)
        differ = got != (vals >= 0.5)
        assert not np.any(differ & (np.abs(vals - 0.5) > 1e-4)), (i, np.argwhere(differ)[:5])
        areas.append(got.sum())
        # Nothing outside the box grown by one pixel.
        x0, y0, x1, y1 = dets.boxes[i]
        outside = np.ones((h, w), bool)
        outside[
            max(int(y0) - 1, 0) : int(np.ceil(y1)) + 1, max(int(x0) - 1, 0) : int(np.ceil(x1)) + 1
        ] = False
        assert not got[outside].any()
    # The random head gives masks that are neither empty nor their whole box (a real test).
    box_areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
    frac = np.asarray(areas) / box_areas
    assert np.any((frac > 0.1) & (frac < 0.9)), frac
    assert dets.to_json()  # JSON-serialisable, with "mask"
    assert all("mask" in d for d in dets.to_dict()["detections"])


def test_without_mask_head_outputs_are_unchanged(env, model):
    tmp, _, plain, _ = env
    other = RegionCLIP.from_checkpoint(plain, cache_dir=tmp / "cache", **SIZES)
    assert not other.has_mask_head
    ref = other.detect(tmp / "a.png", WORDS, boxes=BOXES)
    assert ref.masks is None and all("mask" not in d for d in ref.to_dict()["detections"])
    # masks=False on a mask checkpoint: exactly the plain recognizer's output.
    off = model.detect(tmp / "a.png", WORDS, boxes=BOXES, masks=False)
    assert off.masks is None and off.to_json() == ref.to_json()
    no_head = RegionCLIP.from_checkpoint(env[1], cache_dir=tmp / "cache", masks=False, **SIZES)
    assert not no_head.has_mask_head
    assert no_head.detect(tmp / "a.png", WORDS, boxes=BOXES).to_json() == ref.to_json()
    # With masks the boxes, scores and labels are those of the plain run.
    on = model.detect(tmp / "a.png", WORDS, boxes=BOXES)
    np.testing.assert_array_equal(on.boxes, ref.boxes)
    np.testing.assert_array_equal(on.labels, ref.labels)
    np.testing.assert_allclose(on.scores, ref.scores, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no mask head"):
        other.mask_probabilities(None, np.zeros((1, 4), np.float32))


def test_cli_writes_mask_rles_and_draws_them(env, capsys):
    tmp, with_mask, plain, _ = env
    base = ["classify", "--image", str(tmp / "a.png"), "--boxes", str(tmp / "boxes.json")]
    base += ["--vocabulary", ",".join(WORDS), "--cache-dir", str(tmp / "cache"), *SIZE_ARGS]
    base += ["--score-thresh", "0", "--nms-thresh", "1"]  # keep every (box, class) pair

    def run(ckpt, name, *extra):
        argv = [*base, "--checkpoint", str(ckpt), "--out", str(tmp / f"{name}.json"), *extra]
        assert main(argv) == 0
        return json.loads((tmp / f"{name}.json").read_text())["results"][0]["detections"]

    dets = run(with_mask, "m", "--vis", str(tmp / "m.png"))
    assert len(dets) == len(BOXES) * len(WORDS)
    assert all(d["mask"]["size"] == [90, 120] for d in dets)
    bitmaps = [mask_utils.decode(d["mask"]) for d in dets]
    assert all(b.shape == (90, 120) for b in bitmaps) and any(b.any() for b in bitmaps)
    plain_dets = run(plain, "p", "--vis", str(tmp / "p.png"))
    assert plain_dets and all("mask" not in d for d in plain_dets)
    assert [d["box"] for d in plain_dets] == [d["box"] for d in dets]
    pic_m = np.asarray(Image.open(tmp / "m.png"))
    pic_p = np.asarray(Image.open(tmp / "p.png"))
    assert pic_m.shape == pic_p.shape == (90, 120, 3)
    assert not np.array_equal(pic_m, pic_p)  # the masks are drawn
    assert all("mask" not in d for d in run(with_mask, "n", "--no-masks"))
    capsys.readouterr()


def test_convert_regionclip_reports_the_mask_head(env, capsys):
    from regionclip_jax.convert.regionclip import load_regionclip, regionclip_to_state_dict

    tmp, with_mask, _, arrays = env
    sd = regionclip_to_state_dict(load_regionclip(with_mask))
    np.savez(tmp / "lvis.npz", **sd)
    assert (
        main(
            [
                "convert-regionclip",
                "--input",
                str(tmp / "lvis.npz"),
                "--output",
                str(tmp / "converted"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"mask head: deconv [{RES5}, {CONV_DIM}, 2, 2]" in out
    assert "mask-head keys not converted" not in out
    back = load_regionclip(tmp / "converted")
    for k, v in arrays.items():
        np.testing.assert_array_equal(back.mask_head[k], v)


@pytest.mark.parametrize("init", ["with_head", "without_head", "other_conv_dim"])
def test_detection_trainer_inits_the_mask_head_from_a_converted_checkpoint(env, capsys, init):
    """`detect.mask_on` with `model.init` = a converted checkpoint: its mask head (detectron2's
    256 channels) lands in the state (PyTorch layout -> ours); a checkpoint without one keeps the
    random init; a head of another width is an error naming the key."""

    from flax import nnx

    from regionclip_jax.convert.regionclip import (
        RegionCLIPWeights,
        load_regionclip,
        mask_head_arrays,
        save_regionclip,
    )
    from regionclip_jax.train import detection_trainer

    tmp, with_mask, plain, _ = env
    arrays = random_mask_head(seed=5, conv_dim=256)
    ckpt = {"without_head": plain, "other_conv_dim": with_mask}.get(init)
    if ckpt is None:
        ckpt = tmp / "ckpt_mask256"
        if not ckpt.exists():
            w = load_regionclip(plain)
            save_regionclip(RegionCLIPWeights(w.clip, w.heads, mask_head=arrays), ckpt)
    cfg = experiment_config("zeroshot_coco", "proposals=gt,runlocal")
    with cfg.unlocked():
        cfg.model.init = str(ckpt)
        cfg.detect.mask_on = True
        cfg.detect.train_embeddings = cfg.detect.test_embeddings = ""
        cfg.detect.pooler_resolution = 0
    names = ["cat", "dog"]
    data = types.SimpleNamespace(
        train_ids=[1, 2], test_ids=[1, 2], train_names=names, test_names=names
    )
    task = detection_trainer.DetectionTask(cfg, data)
    if init == "other_conv_dim":
        with pytest.raises(ValueError, match=r"deconv\.weight has 16 output channels.*256"):
            task.load_init_weights()
        return
    task.load_init_weights()
    out = capsys.readouterr().out
    graphdef, params, rest = split_lib.split_model(task.build_model(nnx.Rngs(0)))
    random_init = np.array(params["detector"]["mask_head"]["deconv_kernel"])
    state = task.initialize(graphdef, {"params": params, "rest": rest})
    model = split_lib.merge(graphdef, state["params"], state["rest"])
    got = mask_head_arrays(model.detector.mask_head)
    if init == "with_head":
        assert "mask head loaded from model.init" in out
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
    else:
        assert "has no mask head" in out and "random init" in out
        np.testing.assert_array_equal(model.detector.mask_head.deconv_kernel[...], random_init)
