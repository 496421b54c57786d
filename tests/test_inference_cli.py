"""The inference subcommands run in-process on a tiny random-weight checkpoint (no torch needed):
outputs agree with the Python API, files are written, bad input exits 2 with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from regionclip_jax.inference.commands import main

TINY = dict(
    embed_dim=32,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,
    vision_patch_size=None,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=1,
)
SIZE_ARGS = ["--min-size", "64", "--max-size", "96"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.convert.regionclip import RegionCLIPWeights, save_regionclip
    from regionclip_jax.inference.notebook import random_clip
    from regionclip_jax.models import CLIPConfig

    tmp = tmp_path_factory.mktemp("cli")
    clip = random_clip(CLIPConfig(**TINY))
    heads = {"cls_score.weight": np.ones((3, 32), np.float32)}
    ckpt = save_regionclip(RegionCLIPWeights(clip=clip, heads=heads), tmp / "ckpt")
    rng = np.random.RandomState(0)
    for name, shape in (("a.png", (90, 120, 3)), ("b.jpg", (120, 80, 3))):
        Image.fromarray((rng.rand(*shape) * 255).astype(np.uint8)).save(tmp / name)
    (tmp / "boxes.json").write_text(json.dumps([[2, 3, 60, 50], [10, 10, 70, 80]]))
    (tmp / "multi.json").write_text(
        json.dumps({"a.png": [[2, 3, 60, 50]], str(tmp / "b.jpg"): [[0, 0, 80, 120]]})
    )
    (tmp / "words.txt").write_text("cat\ndog\nbird\n")
    common = ["--checkpoint", str(ckpt), "--cache-dir", str(tmp / "cache")]
    return tmp, ckpt, common


def test_embed_text(env, capsys):
    tmp, ckpt, common = env
    assert (
        main(["embed-text", *common, "--vocabulary", "cat,dog", "--out", str(tmp / "e.npy")]) == 0
    )
    emb = np.load(tmp / "e.npy")
    assert emb.shape == (2, 32) and np.all(np.isfinite(emb))
    assert (tmp / "e.txt").read_text().split() == ["cat", "dog"]
    assert "2 words x 32 dims" in capsys.readouterr().out


def test_region_features_matches_api(env):
    from regionclip_jax.inference import RegionCLIP

    tmp, ckpt, common = env
    out = tmp / "f.npy"
    argv = ["region-features", *common, *SIZE_ARGS, "--image", str(tmp / "a.png")]
    assert main([*argv, "--boxes", str(tmp / "boxes.json"), "--out", str(out)]) == 0
    feats = np.load(out)
    model = RegionCLIP.from_checkpoint(ckpt, min_size=64, max_size=96, cache_dir=None)
    assert model.heads["cls_score.weight"].shape == (3, 32)
    prepared, b = model.prepare(tmp / "a.png", [[2, 3, 60, 50], [10, 10, 70, 80]])
    ref = model.region_features(prepared.image[None], prepared.to_canvas(b)[None])[0]
    np.testing.assert_allclose(feats, ref, rtol=1e-6, atol=1e-6)


def test_classify_many_images_with_vis(env, capsys):
    tmp, _, common = env
    argv = ["classify", *common, *SIZE_ARGS, "--image", str(tmp / "a.png"), str(tmp / "b.jpg")]
    argv += ["--boxes", str(tmp / "multi.json"), "--vocabulary", str(tmp / "words.txt")]
    argv += ["--out", str(tmp / "dets.json"), "--vis", str(tmp / "vis"), "--score-thresh", "0"]
    assert main(argv) == 0
    res = json.loads((tmp / "dets.json").read_text())
    assert res["classes"] == ["cat", "dog", "bird"]
    assert [len(r["regions"]) for r in res["results"]] == [1, 1]
    for r in res["results"]:
        assert r["detections"] and r["detections"][0]["label"] in res["classes"]
    assert res["results"][1]["regions"][0]["box"] == [0, 0, 80, 120]
    for name in ("a", "b"):
        with Image.open(tmp / "vis" / f"{name}.png") as im:
            assert im.format == "PNG"
    # One image, a .png --vis path.
    argv = ["classify", *common, *SIZE_ARGS, "--image", str(tmp / "a.png"), "--boxes"]
    argv += [str(tmp / "boxes.json"), "--vocabulary", "cat,dog", "--out", str(tmp / "d1.json")]
    assert main([*argv, "--vis", str(tmp / "one.png")]) == 0
    with Image.open(tmp / "one.png") as im:
        assert im.size == (120, 90)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--image": "missing.png"}, "No such image file"),
        ({"--image": "bad.jpg"}, "cannot read image"),
        ({"--boxes": "outside.json"}, "outside the 120x90"),
        ({"--boxes": "degenerate.json"}, "degenerate"),
        ({"--vocabulary": " , "}, "vocabulary is empty"),
        ({"--vocabulary": "words_typo.txt"}, "vocabulary file words_typo.txt not found"),
        ({"--boxes": None}, "needs an offline RPN"),
    ],
)
def test_classify_bad_input_exits_2(env, capsys, change, message):
    tmp, _, common = env
    (tmp / "bad.jpg").write_bytes(b"garbage")
    (tmp / "outside.json").write_text("[[0, 0, 500, 20]]")
    (tmp / "degenerate.json").write_text("[[5, 5, 5, 20]]")
    opts = {"--image": "a.png", "--boxes": "boxes.json", "--vocabulary": "cat,dog"}
    opts.update(change)
    argv = ["classify", *common, *SIZE_ARGS, "--out", str(tmp / "x.json")]
    for k, v in opts.items():
        if v is not None:
            argv += [k, v if k == "--vocabulary" else str(tmp / v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("regionclip-jax classify: error:") and message in err


def test_duplicate_words_warn_and_dedupe(env):
    tmp, _, common = env
    argv = ["classify", *common, *SIZE_ARGS, "--image", str(tmp / "a.png"), "--boxes"]
    argv += [str(tmp / "boxes.json"), "--vocabulary", "cat,dog,cat", "--out", str(tmp / "d.json")]
    with pytest.warns(UserWarning, match="duplicate"):
        assert main(argv) == 0
    assert json.loads((tmp / "d.json").read_text())["classes"] == ["cat", "dog"]


def test_convert_regionclip(env, capsys):
    """A RegionCLIP-named .npz (detectron2 keys) converts; the result loads with its heads."""
    from regionclip_jax.convert.regionclip import load_regionclip, regionclip_to_state_dict

    tmp, ckpt, _ = env
    w = load_regionclip(ckpt)
    sd = regionclip_to_state_dict(w)
    assert "backbone.attnpool.c_proj.weight" in sd and "lang_encoder.text_projection" in sd
    sd["offline_backbone.stem.conv1.weight"] = np.zeros((4, 3, 7, 7), np.float32)
    np.savez(tmp / "regionclip.npz", **sd)
    argv = ["convert-regionclip", "--input", str(tmp / "regionclip.npz"), "--output"]
    with pytest.warns(UserWarning, match="1 keys not loaded"):
        assert main([*argv, str(tmp / "converted")]) == 0
    assert "1 offline-RPN / mask-head keys not converted" in capsys.readouterr().out
    back = load_regionclip(tmp / "converted")
    np.testing.assert_array_equal(back.heads["cls_score.weight"], w.heads["cls_score.weight"])
    np.testing.assert_array_equal(
        back.clip.visual.attnpool.c_proj.kernel[...], w.clip.visual.attnpool.c_proj.kernel[...]
    )
    assert main([*argv, str(tmp / "converted")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
