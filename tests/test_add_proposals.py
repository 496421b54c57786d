"""Offline RPN proposals precomputed into the shards (`inference.proposals.add_proposals`, spec §4.6).

Input: tiny ShapesWorld records (64 x 64) mixed with a landscape and a portrait image (two canvas
buckets), one record with stale proposals and one truncated PNG; a tiny CLIP-res4 RPN exported
with `convert.rpn.export_rpn`. Checks:
  - every other field of every record is unchanged (image bytes included), order and ids kept,
    the truncated image skipped with a reason in the manifest;
  - the stored proposals equal the RPN module (the in-memory object whose weights were exported)
    called directly on a canvas built here (PIL bicubic resize by the shortest-edge rule, zero
    padding, RGB 0..255), mapped back by the resize scale, top-k by objectness;
  - the output passes the schema's bad-record policy unchanged and feeds the pretraining
    pipeline (`make_pretrain_dataset(boxes="proposals")`);
  - the result does not depend on how records are batched / flushed;
  - errors (missing RPN, in == out, existing output) and the CLI end to end.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tiny_rpn import export_random_clip_rpn

from regionclip_jax import cli
from regionclip_jax.data.schema import sanitize_record
from regionclip_jax.data.shards import ShardReader, ShardWriter, load_manifest
from regionclip_jax.inference import proposals as proposals_lib
from regionclip_jax.inference.proposals import add_proposals

SETTINGS = dict(min_size=64, max_size=96, topk=40, pre_nms_topk=200, nms_thresh=0.5)
# Resized (h, w) by the shortest-edge rule with min 64 / max 96, worked out by hand, and the
# orientation bucket (ceil32(64), ceil32(96)) or its transpose.
EXPECTED = {(64, 64): ((64, 64), (64, 96)), (90, 120): ((64, 85), (64, 96))}
EXPECTED[(120, 80)] = ((96, 64), (96, 64))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from regionclip_jax.data import shapesworld

    tmp = tmp_path_factory.mktemp("add_proposals")
    shapesworld.generate(tmp / "sw", num_train=6, num_val=0, image_size=64)
    sw = list(ShardReader(tmp / "sw" / "train"))
    rng = np.random.RandomState(0)
    base = dict(source="test", captions=["a picture"], boxes=None, category_ids=None)
    land = dict(base, id="land", image=_png((rng.rand(90, 120, 3) * 255).astype(np.uint8)))
    land.update(
        image_format="png",
        height=90,
        width=120,
        # Stale proposals: replaced by the RPN's.
        proposals=np.array([[0, 0, 10, 10]], np.float32),
        objectness=np.array([1.0], np.float32),
    )
    port = dict(base, id="port", image=_png((rng.rand(120, 80, 3) * 255).astype(np.uint8)))
    port.update(image_format="png", height=120, width=80)
    good = _png((rng.rand(50, 50, 3) * 255).astype(np.uint8))
    broken = dict(base, id="broken", image=good[: len(good) // 2], image_format="png")
    broken.update(height=50, width=50)  # the header parses; the pixels do not decode
    records = [sw[0], land, sw[1], sw[2], broken, port, sw[3], sw[4], sw[5]]
    # check_images=False lets the truncated PNG in (only its header is read).
    with ShardWriter(
        tmp / "in", "train", 4, check_images=False, metadata={"origin": "test input"}
    ) as w:
        for r in records:
            assert w.write(r)

    rpn_dir = tmp / "rpn_work"
    reference_rpn = export_random_clip_rpn(
        rpn_dir,
        pre_nms_topk=SETTINGS["pre_nms_topk"],
        post_nms_topk=SETTINGS["topk"],
        nms_thresh=SETTINGS["nms_thresh"],
    )

    ticks = []
    summary = add_proposals(
        tmp / "in", tmp / "out", rpn_dir, batch_size=4, progress=ticks.append, **SETTINGS
    )
    return tmp, rpn_dir, records, reference_rpn, summary, ticks


def reference_proposals(reference_rpn, image_bytes, topk):
    """The RPN on a canvas built here, mapped to stored-image pixels, top-k by objectness."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        im = im.convert("RGB")
        (nh, nw), canvas = EXPECTED[(im.height, im.width)]
        h, w = im.height, im.width
        r = np.asarray(im.resize((nw, nh), Image.BICUBIC), np.float32)
    x = np.zeros((1, *canvas, 3), np.float32)
    x[0, :nh, :nw] = r
    rb, rl, rv = (np.asarray(a[0]) for a in reference_rpn(x, np.asarray([[nh, nw]], np.int32)))
    boxes = rb[rv] / np.array([nw / w, nh / h, nw / w, nh / h])
    boxes = np.clip(boxes, 0, [w, h, w, h])
    logits = rl[rv]
    order = np.argsort(-logits, kind="stable")[:topk]
    return boxes[order], logits[order]


def test_other_fields_unchanged_order_kept_and_bad_image_skipped(env):
    tmp, _, records, _, summary, ticks = env
    out = list(ShardReader(tmp / "out"))
    want = [r for r in records if r["id"] != "broken"]
    assert [r["id"] for r in out] == [r["id"] for r in want]
    for got, rec in zip(out, want):
        for key in ("id", "source", "image", "image_format", "height", "width", "captions"):
            assert got[key] == rec[key], (rec["id"], key)
        for key in ("boxes", "category_ids", "iscrowd"):
            if rec.get(key) is None:
                assert got[key] is None
            else:
                np.testing.assert_array_equal(got[key], rec[key])
        assert got["proposals"] is not None and got["objectness"] is not None
    manifest = load_manifest(tmp / "out")
    assert manifest["input_records"] == 9 and manifest["num_records"] == 8
    assert manifest["skipped"] == {"corrupt_image": 1}
    assert manifest["skipped_examples"]["corrupt_image"][0][0] == "broken"
    assert manifest["repaired"] == {}  # nothing the writer had to clip or drop
    assert manifest["prefix"] == "train" and len(manifest["shards"]) == 2
    meta = manifest["metadata"]
    assert meta["origin"] == "test input"  # the input's metadata is kept
    p = meta["proposals"]
    assert p["rpn"] == str(tmp / "rpn_work") and p["rpn_kind"] == "clip"
    assert (p["topk"], p["pre_nms_topk"], p["nms_thresh"]) == (40, 200, 0.5)
    assert (p["min_size"], p["max_size"], p["canvas"]) == (64, 96, None)
    assert summary["records"] == 8 and summary["skipped"] == {"corrupt_image": 1}
    assert summary["canvases"] == {"64x96": 7, "96x64": 1}
    assert sum(ticks) == 9


def test_proposals_equal_the_rpn_on_an_independent_canvas(env):
    tmp, _, _, reference_rpn, summary, _ = env
    counts = []
    for rec in ShardReader(tmp / "out"):
        boxes, logits = reference_proposals(reference_rpn, rec["image"], SETTINGS["topk"])
        got_b, got_s = rec["proposals"], rec["objectness"]
        assert got_b.dtype == np.float32 and got_s.dtype == np.float32
        assert got_b.shape == (len(boxes), 4) and got_s.shape == (len(boxes),), rec["id"]
        np.testing.assert_allclose(got_s, logits, rtol=1e-4, atol=1e-4, err_msg=rec["id"])
        np.testing.assert_allclose(got_b, boxes, rtol=1e-4, atol=1e-3, err_msg=rec["id"])
        assert np.all(np.diff(got_s) <= 0)
        h, w = rec["height"], rec["width"]
        assert np.all(got_b >= 0) and np.all(got_b[:, [2, 3]] <= [w, h])
        counts.append(len(got_b))
    assert min(counts) >= 5 and max(counts) <= SETTINGS["topk"]
    assert summary["proposals"] == sum(counts)
    assert summary["proposals_per_image"] == pytest.approx(np.mean(counts))


def test_output_passes_the_schema_and_the_pretraining_pipeline(env):
    from regionclip_jax.data.pipeline import make_pretrain_dataset

    tmp, *_ = env
    recs = list(ShardReader(tmp / "out"))
    for rec in recs:
        clean, repairs = sanitize_record(rec)
        assert not repairs, (rec["id"], repairs)
        np.testing.assert_array_equal(clean["proposals"], rec["proposals"])
    ds = make_pretrain_dataset(
        tmp / "out",
        batch_size=len(recs),
        canvas=(96, 96),
        min_size=64,
        max_size=96,
        boxes="proposals",
        max_boxes=SETTINGS["topk"],  # no subsampling: every stored proposal comes through
        shuffle=False,
        flip=False,
        num_epochs=1,
    )
    batch = next(iter(ds))
    assert batch["boxes"].shape == (len(recs), SETTINGS["topk"], 4)
    for i, rec in enumerate(recs):
        n = len(rec["proposals"])
        assert batch["box_mask"][i].sum() == n
        sy, sx = batch["scale"][i]
        want = rec["proposals"] * np.array([sx, sy, sx, sy], np.float32)
        np.testing.assert_allclose(batch["boxes"][i, :n], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(batch["objectness"][i, :n], rec["objectness"])
        assert np.all(np.isneginf(batch["objectness"][i, n:]))


def test_result_does_not_depend_on_batching(env, monkeypatch):
    tmp, rpn_dir, *_ = env
    # Hold at most one batch of records for ordering: forces padded flushes of the rare canvas.
    monkeypatch.setattr(proposals_lib, "_HELD_BATCHES", 1)
    summary = add_proposals(tmp / "in", tmp / "out_b2", rpn_dir, batch_size=2, **SETTINGS)
    assert summary["records"] == 8
    a, b = list(ShardReader(tmp / "out")), list(ShardReader(tmp / "out_b2"))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["image"] == rb["image"]
        np.testing.assert_allclose(ra["proposals"], rb["proposals"], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(ra["objectness"], rb["objectness"], rtol=1e-5, atol=1e-4)


def test_errors(env):
    tmp, rpn_dir, *_ = env
    with pytest.raises(FileNotFoundError, match="rpn .* does not exist"):
        add_proposals(tmp / "in", tmp / "x", tmp / "no_such_rpn", **SETTINGS)
    with pytest.raises(ValueError, match="is the input"):
        add_proposals(tmp / "in", tmp / "in", rpn_dir, **SETTINGS)
    with pytest.raises(FileExistsError, match="overwrite"):
        add_proposals(tmp / "in", tmp / "out", rpn_dir, **SETTINGS)
    with pytest.raises(ValueError, match="input shards"):
        add_proposals(tmp / "no_such_shards", tmp / "x", rpn_dir, **SETTINGS)
    with pytest.raises(ValueError, match="nms_thresh"):
        add_proposals(tmp / "in", tmp / "x", rpn_dir, **dict(SETTINGS, nms_thresh=0.0))
    assert not (tmp / "x").exists()  # nothing written by a failed call


def test_cli_end_to_end(env, capsys):
    tmp, rpn_dir, *_ = env
    argv = ["add-proposals", "--shards", str(tmp / "in"), "--out", str(tmp / "out_cli")]
    argv += ["--rpn", str(rpn_dir), "--topk", "40", "--pre-nms-topk", "200"]
    argv += ["--min-size", "64", "--max-size", "96", "--batch-size", "4", "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "8 of 9 records written" in out
    assert "proposals per image: mean" in out and "skipped: corrupt_image 1" in out
    manifest = load_manifest(tmp / "out_cli")
    assert manifest["metadata"]["proposals"]["nms_thresh"] == 0.5  # the pretraining default
    a, b = list(ShardReader(tmp / "out")), list(ShardReader(tmp / "out_cli"))
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra["proposals"], rb["proposals"])
    # An existing output: a one-line error and exit 2; --overwrite replaces it.
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    # A missing RPN.
    bad = [*argv[:3], "--out", str(tmp / "out_none"), "--rpn", str(tmp / "nope")]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "add-proposals: error: rpn" in err and "does not exist" in err
