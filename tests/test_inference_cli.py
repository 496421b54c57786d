"""The inference subcommands run in-process on a tiny random-weight checkpoint (no torch needed):
outputs agree with the Python API, files are written, bad input exits 2 with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY_CLIP as TINY
from PIL import Image

from regionclip_jax.inference.commands import main

SIZE_ARGS = ["--min-size", "64", "--max-size", "96"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.convert.regionclip import RegionCLIPWeights, save_regionclip
    from regionclip_jax.inference.random_model import random_clip
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
        ({"--boxes": "empty.json"}, "empty.json: empty file (0 bytes)"),
        ({"--boxes": None}, "needs an offline RPN"),
    ],
)
def test_classify_bad_input_exits_2(env, capsys, change, message):
    tmp, _, common = env
    (tmp / "bad.jpg").write_bytes(b"garbage")
    (tmp / "outside.json").write_text("[[0, 0, 500, 20]]")
    (tmp / "degenerate.json").write_text("[[5, 5, 5, 20]]")
    (tmp / "empty.json").write_bytes(b"")
    opts = {"--image": "a.png", "--boxes": "boxes.json", "--vocabulary": "cat,dog"}
    opts.update(change)
    argv = ["classify", *common, *SIZE_ARGS, "--out", str(tmp / "x.json")]
    for k, v in opts.items():
        if v is not None:
            argv += [k, v if k == "--vocabulary" else str(tmp / v)]
    assert main(argv) == 2
    # A bad image is reported as it is skipped, then the run ends with one error line.
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("regionclip-jax classify: error:") and message in err[-1]


def test_boxes_given_inline_equal_boxes_from_a_file(env, capsys):
    tmp, _, common = env
    argv = [
        "classify",
        *common,
        *SIZE_ARGS,
        "--image",
        str(tmp / "a.png"),
        "--vocabulary",
        "cat,dog",
    ]
    outs = {}
    for name, boxes in (
        ("file", str(tmp / "boxes.json")),
        ("inline", "[[2, 3, 60, 50], [10, 10, 70, 80]]"),
    ):
        assert main([*argv, "--boxes", boxes, "--out", str(tmp / f"{name}.json")]) == 0
        outs[name] = json.loads((tmp / f"{name}.json").read_text())["results"]
    assert outs["inline"] == outs["file"] and len(outs["file"][0]["regions"]) == 2
    assert main([*argv, "--boxes", "[[2, 3, 60", "--out", str(tmp / "bad.json")]) == 2
    assert "--boxes: not valid JSON" in capsys.readouterr().err


def test_words_that_embed_identically_are_an_error(env, capsys, monkeypatch):
    """'Cat' and 'cat ' are one class after the tokenizer's cleaning: an error naming both."""
    from regionclip_jax.inference import commands

    tmp, _, common = env
    monkeypatch.setattr(commands, "_load_model", _no_work)
    argv = ["classify", *common, *SIZE_ARGS, "--image", str(tmp / "a.png"), "--boxes"]
    argv += [str(tmp / "boxes.json"), "--vocabulary", "Cat,dog,cat ", "--out", str(tmp / "d.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "duplicate classes: 'Cat' (item 1) and 'cat' (item 3)" in err
    assert not (tmp / "d.json").exists()


def _no_work(args):
    raise AssertionError("the model was loaded: the input should have been refused before")


def _bad_middle_image(tmp):
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return [str(tmp / "a.png"), str(tmp / "corrupt.jpg"), str(tmp / "b.jpg")]


def test_classify_keeps_results_of_good_images(env, capsys):
    """A bad image in the middle is skipped and reported; the others' results are on disk; exit 2."""
    tmp, _, common = env
    images = _bad_middle_image(tmp)
    out = tmp / "kept.json"
    argv = ["classify", *common, *SIZE_ARGS, "--image", *images, "--boxes", str(tmp / "boxes.json")]
    assert main([*argv, "--vocabulary", "cat,dog", "--out", str(out), "--quiet"]) == 2
    res = json.loads(out.read_text())
    assert [r["image"] for r in res["results"]] == [images[0], images[2]]
    assert all(r["regions"] for r in res["results"])
    assert [f["image"] for f in res["failed"]] == [images[1]]
    assert "cannot read image" in res["failed"][0]["error"]
    err = capsys.readouterr().err
    assert f"skipped {images[1]}: cannot read image" in err
    assert "error: 1 of 3 image(s) failed, the results of the other 2 are in" in err


def test_classify_on_error_stop_writes_jsonl_as_it_goes(env, capsys):
    tmp, _, common = env
    images = _bad_middle_image(tmp)
    out = tmp / "stop.jsonl"
    argv = ["classify", *common, *SIZE_ARGS, "--image", *images, "--boxes", str(tmp / "boxes.json")]
    argv += ["--vocabulary", "cat,dog", "--out", str(out), "--on-error", "stop"]
    assert main(argv) == 2
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert lines[0] == {"classes": ["cat", "dog"]}
    assert lines[1]["image"] == images[0] and lines[1]["regions"]
    assert lines[2]["image"] == images[1] and "cannot read image" in lines[2]["error"]
    assert len(lines) == 3  # stopped: b.jpg was not processed
    assert "(--on-error stop: 1 image(s) not processed)" in capsys.readouterr().err


def test_output_path_checked_before_the_work(env, capsys, monkeypatch):
    """A missing --out folder is created; an --out that cannot be written fails before loading."""
    from regionclip_jax.inference import commands

    tmp, _, common = env
    out = tmp / "new" / "deeper" / "dets.json"
    argv = ["classify", *common, *SIZE_ARGS, "--image", str(tmp / "a.png"), "--boxes"]
    argv += [str(tmp / "boxes.json"), "--vocabulary", "cat,dog"]
    assert main([*argv, "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["results"]) == 1
    (tmp / "a_file").write_text("x")
    monkeypatch.setattr(commands, "_load_model", _no_work)
    for cmd in (argv, ["embed-text", *common, "--vocabulary", "cat,dog"]):
        capsys.readouterr()
        assert main([*cmd, "--out", str(tmp / "a_file" / "x.json")]) == 2
        err = capsys.readouterr().err
        assert f"--out {tmp / 'a_file' / 'x.json'}: cannot create its folder" in err
    assert main([*argv, "--out", str(tmp)]) == 2
    assert "--out is a folder, give a file name" in capsys.readouterr().err


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
    out = capsys.readouterr().out
    assert "mask head: none; 1 offline-RPN / buffer keys not converted" in out
    back = load_regionclip(tmp / "converted")
    np.testing.assert_array_equal(back.heads["cls_score.weight"], w.heads["cls_score.weight"])
    np.testing.assert_array_equal(
        back.clip.visual.attnpool.c_proj.kernel[...], w.clip.visual.attnpool.c_proj.kernel[...]
    )
    assert main([*argv, str(tmp / "converted")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
