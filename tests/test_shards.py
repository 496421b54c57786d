"""Shard format: exact round trip, schema versions, the bad-record policy, damaged shard files.

Expected values are computed here from the inputs (NumPy clipping, PIL decoding), never read back
from the code under test.
"""

from __future__ import annotations

import io
import json
import os

import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from regionclip_jax.data import schema
from regionclip_jax.data.shards import (
    MANIFEST_NAME,
    ShardError,
    ShardReader,
    ShardWriter,
    load_manifest,
    open_shards,
)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _random_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, 40, size=2))
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        k = int(rng.integers(0, 5))
        x1 = rng.uniform(0, w / 2, k)
        y1 = rng.uniform(0, h / 2, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, k), y1 + rng.uniform(1, h / 2, k)], 1)
        rec = {
            "id": f"rec-{i}",
            "source": "unit-test",
            "image": _encode(img, fmt),
            "image_format": fmt.lower(),
            "height": h,
            "width": w,
            "captions": [f"caption {j} of record {i} \u00e9\u6771" for j in range(1 + i % 3)],
            "boxes": boxes.astype(np.float32) if i % 3 else None,
            "category_ids": rng.integers(1, 90, k).astype(np.int32) if i % 3 else None,
            "iscrowd": (rng.random(k) < 0.3) if i % 3 else None,
            "proposals": None,
            "objectness": None,
        }
        if i % 4 == 1:
            p = int(rng.integers(0, 6))
            px = rng.uniform(0, w / 2, p)
            py = rng.uniform(0, h / 2, p)
            rec["proposals"] = np.stack([px, py, px + 2, py + 3], 1).astype(np.float32)
            rec["objectness"] = rng.normal(size=p).astype(np.float32)
        out.append(rec)
    return out


def test_round_trip_reproduces_every_field(tmp_path):
    records = _random_records(11)
    with ShardWriter(tmp_path, "rt", records_per_shard=4) as w:
        for r in records:
            assert w.write(r)
    files = sorted(f for f in os.listdir(tmp_path))
    assert files == [
        MANIFEST_NAME,
        "rt-00000-of-00003.array_record",
        "rt-00001-of-00003.array_record",
        "rt-00002-of-00003.array_record",
    ], "no temporary files may remain"
    manifest = load_manifest(tmp_path)
    assert manifest["num_records"] == 11 and manifest["input_records"] == 11
    assert [s["num_records"] for s in manifest["shards"]] == [4, 4, 3]
    assert manifest["skipped"] == {} and manifest["repaired"] == {}

    with ShardReader(tmp_path) as reader:
        assert len(reader) == 11
        got = list(reader)
        assert [reader[i]["id"] for i in (0, 5, -1)] == ["rec-0", "rec-5", "rec-10"]
    for r, g in zip(records, got):
        assert g["schema_version"] == schema.SCHEMA_VERSION
        for key in ("id", "source", "image", "image_format", "height", "width", "captions"):
            assert g[key] == r[key], key
        # Decoded pixels equal those of the input bytes.
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(g["image"]))),
            np.asarray(Image.open(io.BytesIO(r["image"]))),
        )
        for key, dtype in [
            ("boxes", np.float32),
            ("category_ids", np.int32),
            ("iscrowd", bool),
            ("proposals", np.float32),
            ("objectness", np.float32),
        ]:
            if r[key] is None:
                assert g[key] is None, key
            else:
                assert g[key].dtype == dtype, key
                np.testing.assert_array_equal(g[key], np.asarray(r[key]).astype(dtype), err_msg=key)


def test_record_bytes_are_plain_msgpack():
    # Portability: any msgpack reader gets the fields; arrays are dtype/shape/bytes maps.
    rec = _random_records(2)[1]
    data = schema.encode_record(rec)
    m = msgpack.unpackb(data, raw=False)
    assert m["schema_version"] == 1 and m["id"] == "rec-1"
    b = m["boxes"]
    arr = np.frombuffer(b["data"], dtype=np.dtype(b["dtype"])).reshape(b["shape"])
    np.testing.assert_array_equal(arr, rec["boxes"])
    assert b"pickle" not in data and not data.startswith(b"\x80")  # not a pickle stream


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    rec = _random_records(1)[0]
    with ShardWriter(tmp_path / "ok", "x") as w:
        w.write(rec)

    # A record of version 2 inside a version-1 manifest: the file is named.
    m = msgpack.unpackb(schema.encode_record(rec), raw=False)
    m["schema_version"] = 2
    bad = tmp_path / "ok" / "x-00000-of-00001.array_record"
    writer = array_record_module.ArrayRecordWriter(str(bad), "group_size:1")
    writer.write(msgpack.packb(m, use_bin_type=True))
    writer.close()
    with pytest.raises(
        schema.SchemaVersionError, match=r"x-00000-of-00001.*version 2.*reads version 1"
    ):
        open_shards(tmp_path / "ok")
    with pytest.raises(schema.SchemaVersionError, match="newer"):
        schema.decode_record(msgpack.packb(m, use_bin_type=True))

    # A manifest of another version.
    mpath = tmp_path / "ok" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["schema_version"] = 0
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(schema.SchemaVersionError, match=r"manifest.json.*version 0"):
        open_shards(tmp_path / "ok")


def _png(h=10, w=12, value=100) -> bytes:
    return _encode(np.full((h, w, 3), value, np.uint8), "PNG")


def test_bad_records_are_counted_repaired_or_skipped(tmp_path):
    good = dict(id="g", image=_png(), height=10, width=12, captions=["ok"])
    boxes_in = np.array(
        [
            [1, 1, 5, 5],  # fine
            [-3, 2, 4, 20],  # out of the image: clipped to [0, 2, 4, 10]
            [5, 5, 5, 9],  # zero width: degenerate
            [8, 2, 3, 6],  # inverted: degenerate
            [20, 1, 30, 5],  # entirely right of the image: degenerate after clipping
            [np.nan, 0, 3, 3],  # non-finite
        ],
        np.float64,
    )
    cats_in = np.array([1, 2, 3, 4, 5, 6])
    inputs = [
        dict(good, id="a"),
        dict(good, id="corrupt", image=_png()[:30]),  # truncated PNG
        dict(good, id="garbage", image=b"not an image at all"),
        dict(good, id="nocap", captions=["", "   "]),
        dict(good, id="somecap", captions=["", " two  spaces ", "x"]),
        dict(good, id="boxes", boxes=boxes_in, category_ids=cats_in),
        dict(good, id="zero", boxes=np.zeros((0, 4)), category_ids=[]),
        dict(good, id="lenmismatch", boxes=boxes_in[:2], category_ids=[1]),
        dict(good, id="a"),  # duplicate id
        dict(good, id="size", height=99, width=1),  # wrong size: repaired from the image
        dict(good, id="bmp", image=_encode(np.full((10, 12, 3), 7, np.uint8), "BMP")),
        dict(good, id="", captions=["no id"]),
        dict(
            good,
            id="props",
            proposals=[[0, 0, 4, 4], [2, 2, 2, 2], [0, 0, 50, 50]],
            objectness=[1, 2, 3],
        ),
    ]
    with ShardWriter(tmp_path, "bad", records_per_shard=100) as w:
        written = [w.write(r) for r in inputs]
    assert written == [
        True,
        False,
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        True,
        True,
        False,
        True,
    ]
    m = load_manifest(tmp_path)
    assert m["input_records"] == len(inputs) == m["num_records"] + sum(m["skipped"].values())
    assert m["skipped"] == {"corrupt_image": 2, "duplicate_id": 1, "malformed": 2, "no_captions": 1}
    assert m["repaired"] == {
        "box_clipped": 1,
        "box_degenerate_dropped": 3,
        "box_nonfinite_dropped": 1,
        "empty_caption_dropped": 1,
        "image_reencoded": 1,
        "proposal_clipped": 1,
        "proposal_degenerate_dropped": 1,
        "size_repaired": 1,
    }
    assert [e[0] for e in m["skipped_examples"]["corrupt_image"]] == ["corrupt", "garbage"]

    recs = {r["id"]: r for r in ShardReader(tmp_path)}
    assert recs["somecap"]["captions"] == ["two spaces", "x"]
    expect = np.clip(boxes_in[[0, 1]], 0, [12, 10, 12, 10]).astype(np.float32)
    np.testing.assert_array_equal(recs["boxes"]["boxes"], expect)
    np.testing.assert_array_equal(recs["boxes"]["category_ids"], [1, 2])
    np.testing.assert_array_equal(recs["boxes"]["iscrowd"], [False, False])
    assert recs["zero"]["boxes"].shape == (0, 4) and recs["a"]["boxes"] is None
    assert (recs["size"]["height"], recs["size"]["width"]) == (10, 12)
    assert recs["bmp"]["image_format"] == "png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(recs["bmp"]["image"]))), 7)
    np.testing.assert_array_equal(recs["props"]["proposals"], [[0, 0, 4, 4], [0, 0, 12, 10]])
    np.testing.assert_array_equal(recs["props"]["objectness"], [1, 3])

    # Detection data: a record without a valid box is skipped when boxes are required.
    with ShardWriter(tmp_path / "det", "det", require_boxes=True) as w:
        assert not w.write(dict(good, id="z", boxes=np.zeros((0, 4)), category_ids=[]))
        assert not w.write(dict(good, id="d", boxes=[[3, 3, 3, 8]], category_ids=[1]))
        assert w.write(dict(good, id="k", boxes=[[3, 3, 4, 8]], category_ids=[1]))
    assert load_manifest(tmp_path / "det")["skipped"] == {"no_boxes": 2}


def _write_two_shards(d) -> list[dict]:
    records = _random_records(8, seed=3)
    with ShardWriter(d, "s", records_per_shard=4) as w:
        for r in records:
            w.write(r)
    return records


def test_truncated_shard_is_named_or_skipped(tmp_path):
    records = _write_two_shards(tmp_path)
    victim = tmp_path / "s-00001-of-00002.array_record"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])

    with pytest.raises(ShardError, match="s-00001-of-00002.array_record"):
        open_shards(tmp_path)
    shards = open_shards(tmp_path, on_bad_shard="skip")
    assert len(shards) == 4 and shards.paths == (str(tmp_path / "s-00000-of-00002.array_record"),)
    assert [p for p, _ in shards.skipped] == [str(victim)]
    assert [r["id"] for r in ShardReader(shards)] == [r["id"] for r in records[:4]]

    # A shard replaced by one with a different record count, and a missing one.
    victim.write_bytes(data)
    other = tmp_path / "s-00000-of-00002.array_record"
    os.remove(other)
    with pytest.raises(ShardError, match="s-00000-of-00002.array_record: file not found"):
        open_shards(tmp_path)
    # Bare file lists (no manifest) still detect a damaged file.
    victim.write_bytes(data[:100])
    with pytest.raises(ShardError, match="truncated or damaged"):
        open_shards(str(victim))


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "a", "p", records_per_shard=1) as w:
            for r in _random_records(3):
                w.write(r)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "a") == []  # no manifest, no shards, no temporaries
    with pytest.raises(ShardError, match="manifest"):
        open_shards(tmp_path / "a")

    _write_two_shards(tmp_path / "b")
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "b", "s")
    with ShardWriter(tmp_path / "b", "s", records_per_shard=10, overwrite=True) as w:
        w.write(_random_records(1)[0])
    assert sorted(os.listdir(tmp_path / "b")) == [MANIFEST_NAME, "s-00000-of-00001.array_record"]
    assert len(open_shards(tmp_path / "b")) == 1


# ---------------------------------------------------------------------------------------------
# Instance masks (optional `masks` field).


def _mask_record(masks) -> dict:
    return {
        "id": "m",
        "image": _png(10, 12),
        "height": 10,
        "width": 12,
        "captions": [],
        "boxes": [[1, 1, 6, 5], [2, 3, 11, 9], [0, 0, 4, 4]],
        "category_ids": [1, 2, 3],
        "masks": masks,
    }


def test_masks_round_trip_as_compressed_rle(tmp_path):
    from pycocotools import mask as mask_util

    bits = np.zeros((2, 10, 12), np.uint8)
    bits[0, 1:5, 1:6] = 1
    bits[1, 3:9, 2:11] = np.random.default_rng(0).random((6, 9)) < 0.6
    rles = [mask_util.encode(np.asfortranarray(b)) for b in bits]
    with ShardWriter(tmp_path, "m", require_captions=False) as w:
        assert w.write(_mask_record([rles[0], rles[1], None]))
    manifest = load_manifest(tmp_path)
    assert manifest["repaired"] == {"missing_segmentation": 1}
    (got,) = list(ShardReader(tmp_path))
    assert len(got["masks"]) == 3 and got["masks"][2] is None
    for b, rle in zip(bits, got["masks"]):
        assert rle["size"] == [10, 12] and isinstance(rle["counts"], bytes)
        np.testing.assert_array_equal(mask_util.decode(rle), b)
    # On disk: an array of {"size", "counts": bin} maps or nil, readable by any msgpack reader.
    raw = msgpack.unpackb(schema.encode_record(got), raw=False)["masks"]
    assert raw[2] is None and raw[0] == {"size": [10, 12], "counts": rles[0]["counts"]}


def test_shards_written_before_masks_still_read(tmp_path):
    """A record map without the `masks` key (as every shard written before it) decodes with
    masks None, in a shard read through the usual reader."""
    m = msgpack.unpackb(schema.encode_record(_random_records(3)[2]), raw=False)
    del m["masks"]
    with ShardWriter(tmp_path, "old") as w:
        w.write(_random_records(1)[0])
    path = tmp_path / "old-00000-of-00001.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    writer.write(msgpack.packb(m, use_bin_type=True))
    writer.close()
    (rec,) = list(ShardReader(tmp_path))
    assert rec["masks"] is None and rec["id"] == "rec-2"
    assert len(rec["boxes"]) == len(m["boxes"]["data"]) // 16


def test_masks_follow_the_box_policy(tmp_path):
    from pycocotools import mask as mask_util

    full = mask_util.encode(np.asfortranarray(np.ones((10, 12), np.uint8)))
    rec = _mask_record([full, full, [[1.0, 1.0, 3.0, 1.0]]])  # the last one: a 2-point polygon
    rec["boxes"][1] = [5, 5, 5, 9]  # degenerate: dropped with its mask
    out, repairs = schema.sanitize_record(rec, require_captions=False)
    assert repairs == {"box_degenerate_dropped": 1, "bad_segmentation": 1}
    assert len(out["masks"]) == 2 and out["masks"][1] is None
    with pytest.raises(schema.SkipRecord, match="one per box"):
        schema.sanitize_record(_mask_record([full]), require_captions=False)
    bad = {"size": [10, 12], "counts": full["counts"][:-1] + b"z"}  # runs no longer cover 10x12
    out, repairs = schema.sanitize_record(_mask_record([bad, None, full]), require_captions=False)
    assert repairs == {"bad_segmentation": 1, "missing_segmentation": 1}
    assert out["masks"][0] is None and out["masks"][2] is not None
