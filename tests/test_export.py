"""`regionclip-jax export`: the proposal-mode detector as one jax.export program.

A tiny random checkpoint and a tiny CLIP-res4 RPN are exported once through the CLI; a FRESH
Python process that imports only jax / numpy / json / PIL (and the three serving helpers, copied
in as source text, as a server would copy them; `regionclip_jax` is checked to be absent from
its `sys.modules`) loads `model.jax` + `model.json`, preprocesses two images and runs them as
one batch (b = 2) and one by one (b = 1: the batch size is symbolic). Its detections, mapped back
to original pixels, must equal `RegionCLIP.detect` in proposal mode (the Python model, host
post-processing) on the same canvas: same count, order, labels; boxes and scores within float
tolerance. Score threshold 0 with 40 proposals x 3 classes keeps every pair a candidate (no
candidate cap), away from the batched/host corner cases of eval/postprocess.py.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from tiny_rpn import TINY_CLIP, export_random_clip_rpn

from regionclip_jax.cli import main

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

WORDS = ["cat", "dog", "red car"]
RPN_ARGS = ["--rpn-pre-nms-topk", "200", "--rpn-post-nms-topk", "40", "--rpn-nms-thresh", "0.7"]
RPN_KW = dict(rpn_pre_nms_topk=200, rpn_post_nms_topk=40, rpn_nms_thresh=0.7)
CANVAS = (96, 128)  # holds both orientations of min/max size 64 / 96
# (file, original H x W, resized h x w by the shortest-edge rule)
IMAGES = [("land.png", (90, 120), (64, 85)), ("port.png", (120, 80), (96, 64))]
MAX_DETS = 100


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.convert.regionclip import RegionCLIPWeights, save_regionclip
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models import CLIPConfig

    tmp = tmp_path_factory.mktemp("export")
    ckpt = save_regionclip(
        RegionCLIPWeights(clip=random_clip(CLIPConfig(**TINY_CLIP), seed=1), heads={}),
        tmp / "ckpt",
    )
    export_random_clip_rpn(tmp / "rpn_work", pre_nms_topk=200, post_nms_topk=40, nms_thresh=0.7)
    rng = np.random.RandomState(3)
    for name, hw, _ in IMAGES:
        Image.fromarray((rng.rand(*hw, 3) * 255).astype(np.uint8)).save(tmp / name)
    (tmp / "words.txt").write_text("\n".join(WORDS) + "\n")
    common = ["export", "--checkpoint", str(ckpt), "--cache-dir", str(tmp / "cache")]
    return tmp, ckpt, common


@pytest.fixture(scope="module")
def exported(env):
    tmp, _, common = env
    argv = [*common, "--rpn", str(tmp / "rpn_work"), *RPN_ARGS]
    argv += ["--vocabulary", str(tmp / "words.txt"), "--out", str(tmp / "out" / "model.jax")]
    argv += ["--canvas", *map(str, CANVAS), "--min-size", "64", "--max-size", "96"]
    argv += ["--score-thresh", "0", "--max-dets", str(MAX_DETS)]
    assert main(argv) == 0
    return tmp / "out" / "model.jax"


def _server_script(model_path, images, out_path) -> str:
    """A stand-alone program: the three serving helpers as source text, then the calls."""
    from regionclip_jax.inference import export as export_lib

    helpers = "\n\n".join(
        inspect.getsource(f)
        for f in (
            export_lib.load_exported,
            export_lib.preprocess_for_export,
            export_lib.boxes_to_original,
        )
    )
    main_code = f"""
    import json, sys
    import numpy as np
    from PIL import Image

    detect, meta = load_exported({str(model_path)!r})
    pre = [preprocess_for_export(np.asarray(Image.open(p).convert("RGB")), meta)
           for p in {[str(p) for p in images]!r}]
    pixels = np.stack([p[0] for p in pre])
    hw = np.asarray([p[1] for p in pre], np.int32)
    out = {{"pixels": pixels, "image_hw": hw}}
    for k, v in detect(pixels, hw).items():          # b = 2
        out["b2_" + k] = v
    for i in range(len(pre)):                         # b = 1, one image at a time
        for k, v in detect(pixels[i:i + 1], hw[i:i + 1]).items():
            out[f"b1_{{i}}_{{k}}"] = v
        out[f"orig_boxes_{{i}}"] = boxes_to_original(
            out["b2_boxes"][i][out["b2_valid"][i]], pre[i][1], pre[i][2])
    np.savez({str(out_path)!r}, **out)
    print(json.dumps({{"regionclip_jax_loaded": any(m.startswith("regionclip_jax")
                                                    for m in sys.modules)}}))
    """
    return helpers + "\n" + textwrap.dedent(main_code)


def test_exported_program_matches_the_python_model(env, exported):
    from regionclip_jax.inference import RegionCLIP

    tmp, ckpt, _ = env
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["format"] == "regionclip_jax.exported_detector" and meta["format_version"] == 1
    assert meta["classes"] == WORDS and meta["canvas"] == list(CANVAS)
    assert (meta["min_size"], meta["max_size"], meta["max_detections"]) == (64, 96, MAX_DETS)
    assert meta["rpn"]["post_nms_topk"] == 40 and meta["score_thresh"] == 0.0
    np.testing.assert_allclose(meta["clip_std"][0], 0.26862954)

    images = [tmp / name for name, _, _ in IMAGES]
    script = tmp / "serve.py"
    script.write_text(_server_script(exported, images, tmp / "served.npz"))
    env_vars = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env_vars
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"regionclip_jax_loaded": False}
    got = dict(np.load(tmp / "served.npz"))

    model = RegionCLIP.from_checkpoint(
        ckpt, rpn=tmp / "rpn_work", cache_dir=tmp / "cache", min_size=64, max_size=96,
        canvas=CANVAS, **RPN_KW,
    )  # fmt: skip
    for i, (path, (h, w), resized) in enumerate(IMAGES):
        prepared, _ = model.prepare(tmp / path)
        # The server's preprocessing is the recognizer's.
        assert tuple(got["image_hw"][i]) == prepared.image_hw == resized
        np.testing.assert_array_equal(got["pixels"][i], prepared.pixels.astype(np.float32))

        want = model.detect(tmp / path, WORDS, score_thresh=0.0, max_detections=MAX_DETS)
        n = len(want)
        assert 10 < n < MAX_DETS  # some NMS suppression, and padding in the output
        valid = got["b2_valid"][i]
        assert valid.sum() == n and valid[:n].all()  # padding last
        np.testing.assert_array_equal(got["b2_labels"][i][:n], want.labels)
        assert np.all(got["b2_labels"][i][n:] == -1)
        np.testing.assert_allclose(got["b2_scores"][i][:n], want.scores, rtol=1e-4, atol=1e-7)
        # Canvas -> original pixels by the resize scale, computed here.
        sx, sy = resized[1] / w, resized[0] / h
        boxes = got["b2_boxes"][i][:n] / np.array([sx, sy, sx, sy])
        np.testing.assert_allclose(boxes, want.boxes, rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose(got[f"orig_boxes_{i}"], want.boxes, rtol=1e-5, atol=2e-3)
        # b = 1 gives the batch's results.
        for k in ("boxes", "scores", "labels", "valid"):
            one = got[f"b1_{i}_{k}"]
            assert one.shape == (1, *got[f"b2_{k}"].shape[1:]) and one.shape[1] == MAX_DETS
            np.testing.assert_allclose(one[0], got[f"b2_{k}"][i], rtol=1e-5, atol=1e-5)


def test_bad_input_fails_before_any_work(env, capsys):
    tmp, _, common = env
    base = [*common, "--out", str(tmp / "bad" / "model.jax"), "--canvas", "96", "128"]
    cases = [
        ([*base, "--vocabulary", "cat,dog"], "--rpn"),  # no RPN
        ([*base, "--rpn", str(tmp / "rpn_work"), "--vocabulary", "cat,Cat"], "cat"),
        ([*base, "--rpn", str(tmp / "no_rpn"), "--vocabulary", "cat,dog"], "does not exist"),
        ([*base, "--rpn", str(tmp / "rpn_work"), "--vocabulary", "nope.txt"], "nope.txt"),
        (
            [*common, "--rpn", str(tmp / "rpn_work"), "--vocabulary", "cat,dog"]
            + ["--out", str(tmp / "bad" / "model.jax"), "--canvas", "100", "128"],
            "multiples of 32",
        ),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("regionclip-jax export: error:") and err.count("\n") == 1, err
        assert needle in err
    assert not (tmp / "bad").exists()  # nothing written
