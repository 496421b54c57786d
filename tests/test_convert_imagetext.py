"""Image-text converters: round trip through ShardReader, bad input counted, resume, workers.

All inputs are built here (tiny images, tar files via `tarfile`, json/TSV/CSV written here);
expected pixels come from PIL decoding the source files, expected captions from the inputs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from regionclip_jax.data.convert_imagetext import convert_imagetext, format_summary
from regionclip_jax.data.shards import ShardReader, load_manifest


def _img_bytes(seed: int, fmt: str = "PNG", size=(12, 17)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _records_by_id(path) -> dict:
    with ShardReader(path) as r:
        return {rec["id"]: rec for rec in r}


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        fmt = "PNG" if i % 2 else "JPEG"
        (d / f"im{i}.{'png' if i % 2 else 'jpg'}").write_bytes(_img_bytes(i, fmt))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return d


def _expected_list(image_dir):
    # (file, captions) as the lists below describe them; im5 has two rows (merged).
    return {
        "im0.jpg": ["a red  cat "],
        "im1.png": ["two dogs", " "],  # a blank one among others: dropped
        "im2.jpg": ["a tree"],
        "im3.png": ["x", "y"],
        "im4.jpg": ["", "  "],  # only blank captions -> no_captions
        "im5.png": ["first", "second"],
        "corrupt.jpg": ["bad bytes"],
        "missing.jpg": ["no such file"],
    }


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv"])
def test_caption_list_round_trip_and_bad_input(tmp_path, image_dir, fmt):
    expected = _expected_list(image_dir)
    rows = [(k, c) for k, caps in expected.items() for c in caps]
    lst = image_dir / f"list.{fmt}"
    if fmt == "jsonl":
        lst.write_text("".join(json.dumps({"image": k, "caption": c}) + "\n" for k, c in rows))
    else:
        with open(lst, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow(["filepath", "title"])
            w.writerows(rows)
    out = tmp_path / "out"
    m = convert_imagetext([str(lst)], str(out), part_size=3)
    assert m["input_records"] == 8
    assert m["skipped"] == {"corrupt_image": 1, "missing_file": 1, "no_captions": 1}
    assert m["repaired"] == {"empty_caption_dropped": 1}
    assert load_manifest(out)["num_records"] == 5
    recs = _records_by_id(out)
    assert sorted(recs) == ["im0.jpg", "im1.png", "im2.jpg", "im3.png", "im5.png"]
    for name, rec in recs.items():
        src = (image_dir / name).read_bytes()
        assert rec["image"] == src  # PNG/JPEG stored as they come
        np.testing.assert_array_equal(_pixels(rec["image"]), _pixels(src))
        assert (rec["height"], rec["width"]) == (12, 17)
        assert rec["captions"] == [" ".join(c.split()) for c in expected[name] if c.strip()]
    text = format_summary(str(out), m)
    assert "missing_file 1" in text and "corrupt_image 1" in text


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_resume_and_workers(tmp_path):
    tars = []
    for t in range(3):
        samples = []
        for i in range(4):
            key = f"{t:05d}{i:04d}"
            samples.append((f"{key}.jpg", _img_bytes(10 * t + i, "JPEG")))
            if not (t == 1 and i == 2):  # one sample without its caption
                samples.append((f"{key}.txt", f"caption {t} {i}".encode()))
            samples.append((f"{key}.json", json.dumps({"key": key}).encode()))
        if t == 2:
            samples[0] = (samples[0][0], b"garbage")  # corrupt image bytes
        p = tmp_path / f"{t:05d}.tar"
        _write_tar(p, samples)
        tars.append(str(p))
    out = tmp_path / "wds"
    seen = []
    m = convert_imagetext([str(tmp_path / "*.tar")], str(out), progress=seen.append)
    assert m["metadata"]["format"] == "webdataset"
    assert m["input_records"] == 12 and m["num_records"] == 10
    assert m["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    assert sum(seen) == 12
    recs = _records_by_id(out)
    for t in range(3):
        with tarfile.open(tars[t]) as tar:
            for i in range(4):
                key = f"{t:05d}{i:04d}"
                if key not in recs:
                    continue
                assert recs[key]["captions"] == [f"caption {t} {i}"]
                src = tar.extractfile(f"{key}.jpg").read()
                np.testing.assert_array_equal(_pixels(recs[key]["image"]), _pixels(src))

    # Rerun: every part is resumed, the merged manifest is unchanged.
    m2 = convert_imagetext(tars, str(out))
    assert all(p["resumed"] for p in m2["metadata"]["parts"])
    assert m2["shards"] == m["shards"] and m2["skipped"] == m["skipped"]
    # Change one tar: only its part is rewritten.
    _write_tar(tars[1], [("x.jpg", _img_bytes(99, "JPEG")), ("x.txt", b"new")])
    m3 = convert_imagetext(tars, str(out), num_workers=2)
    assert [p["resumed"] for p in m3["metadata"]["parts"]] == [True, False, True]
    recs3 = _records_by_id(out)
    assert recs3["x"]["captions"] == ["new"] and "000010000" not in recs3
    assert m3["num_records"] == 4 + 1 + 3


def test_workers_match_single_process(tmp_path, image_dir):
    lst = image_dir / "l.jsonl"
    names = [f"im{i}.{'png' if i % 2 else 'jpg'}" for i in range(6)]
    lst.write_text("".join(json.dumps({"image": n, "captions": [n, "b"]}) + "\n" for n in names))
    m0 = convert_imagetext([str(lst)], str(tmp_path / "a"), part_size=2)
    m2 = convert_imagetext([str(lst)], str(tmp_path / "b"), part_size=2, num_workers=2)
    assert m0["shards"] == m2["shards"] and m0["totals"] == m2["totals"]
    ra, rb = _records_by_id(tmp_path / "a"), _records_by_id(tmp_path / "b")
    assert list(ra) == list(rb) == names
    for k in names:
        assert ra[k]["image"] == rb[k]["image"] and ra[k]["captions"] == [k, "b"]


def test_folder_and_coco_captions(tmp_path, image_dir):
    (image_dir / "im0.txt").write_text("a cat\nsecond line\n")
    (image_dir / "im1.txt").write_text("a dog\n")
    m = convert_imagetext([str(image_dir)], str(tmp_path / "f"))
    assert m["metadata"]["format"] == "folder"
    recs = _records_by_id(tmp_path / "f")
    assert recs["im0.jpg"]["captions"] == ["a cat", "second line"]
    assert recs["im1.png"]["captions"] == ["a dog"]
    # 5 images without a .txt and the corrupt file are skipped and counted.
    assert m["skipped"] == {"corrupt_image": 1, "no_captions": 4}

    coco = {
        "images": [
            {"id": 7, "file_name": "im2.jpg", "height": 12, "width": 17},
            {"id": 9, "file_name": "im3.png", "height": 1, "width": 1},  # wrong size: repaired
            {"id": 11, "file_name": "gone.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "A tree."},
            {"id": 2, "image_id": 9, "caption": "x"},
            {"id": 3, "image_id": 7, "caption": "another"},
        ],
    }
    j = tmp_path / "captions.json"
    j.write_text(json.dumps(coco))
    m = convert_imagetext([str(j)], str(tmp_path / "c"), image_root=str(image_dir))
    assert m["metadata"]["format"] == "coco_captions"
    recs = _records_by_id(tmp_path / "c")
    assert recs["7"]["captions"] == ["A tree.", "another"] and recs["9"]["captions"] == ["x"]
    assert m["skipped"] == {"missing_file": 1} and m["repaired"]["size_repaired"] == 1
    np.testing.assert_array_equal(
        _pixels(recs["9"]["image"]), _pixels((image_dir / "im3.png").read_bytes())
    )


def test_list_errors_are_clear(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no image column"):
        convert_imagetext([str(bad)], str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_make_shards_command(tmp_path, image_dir, capsys):
    import argparse

    from regionclip_jax.data.commands import add_make_shards_arguments, make_shards_command

    lst = image_dir / "l.tsv"
    lst.write_text("im0.jpg\ta cat\nmissing.jpg\tx\n")  # headerless TSV
    parser = argparse.ArgumentParser()
    add_make_shards_arguments(parser)
    args = parser.parse_args(["imagetext", str(lst), "--out", str(tmp_path / "o"), "--quiet"])
    assert make_shards_command(args) == 0
    out = capsys.readouterr().out
    assert "1 of 2 images written" in out and "missing_file 1" in out
    assert [r["captions"] for r in ShardReader(tmp_path / "o")] == [["a cat"]]
    # Rerun: the part is kept, nothing is rewritten.
    assert make_shards_command(args) == 0
    assert "0 part(s) written, 1 already complete" in capsys.readouterr().out


def test_pretrain_pipeline_reads_converted_shards(tmp_path, image_dir):
    from regionclip_jax.data.pipeline import make_pretrain_dataset
    from regionclip_jax.text.tokenizer import tokenize

    names = [f"im{i}.{'png' if i % 2 else 'jpg'}" for i in range(6)]
    lst = image_dir / "l.jsonl"
    lst.write_text("".join(json.dumps({"image": n, "caption": f"cap {n}"}) + "\n" for n in names))
    convert_imagetext([str(lst)], str(tmp_path / "o"), part_size=4)  # two parts
    ds = make_pretrain_dataset(
        tmp_path / "o",
        batch_size=3,
        canvas=(12, 17),
        min_size=12,
        max_size=17,
        flip=False,
        shuffle=False,
        num_epochs=1,
        normalize=False,
    )
    it = iter(ds)
    batches = [{k: np.array(v) for k, v in b.items()} for b in it]
    assert len(batches) == 2
    for b in batches:
        for j, idx in enumerate(b["source_index"]):
            name = names[int(idx)]
            np.testing.assert_array_equal(b["images"][j], _pixels((image_dir / name).read_bytes()))
            np.testing.assert_array_equal(b["tokens"][j], tokenize([f"cap {name}"])[0])


@pytest.mark.parametrize("cut", [0.5, 0.55])  # at a block boundary / inside a member
def test_truncated_tar_keeps_what_was_read(tmp_path, cut):
    samples = []
    for i in range(6):
        samples += [(f"{i:04d}.jpg", _img_bytes(i, "JPEG", (64, 64))), (f"{i:04d}.txt", b"c")]
    p = tmp_path / "00000.tar"
    _write_tar(p, samples)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut)])
    m = convert_imagetext([str(p)], str(tmp_path / "o"))
    assert m["skipped"].get("truncated_tar") == 1
    n = m["num_records"]
    assert 1 <= n < 6 and m["input_records"] == n + sum(m["skipped"].values())
    for rec in ShardReader(tmp_path / "o"):
        i = int(rec["id"])
        np.testing.assert_array_equal(_pixels(rec["image"]), _pixels(samples[2 * i][1]))


def test_same_id_in_two_parts_is_kept_and_counted(tmp_path):
    for t in range(2):
        _write_tar(tmp_path / f"{t}.tar", [("a.jpg", _img_bytes(t, "JPEG")), ("a.txt", b"x")])
    m = convert_imagetext([str(tmp_path / "0.tar"), str(tmp_path / "1.tar")], str(tmp_path / "o"))
    assert m["num_records"] == 2 and m["metadata"]["duplicate_ids_across_parts"] == 1
    assert "1 id(s) occur in more than one part" in format_summary("o", m)


def test_unreadable_lists_name_the_file_and_line(tmp_path, image_dir):
    """A non-UTF-8 list, a bad JSONL line and a zero-byte COCO json: errors naming file (+ line)."""
    tsv = image_dir / "latin1.tsv"
    tsv.write_bytes(b"im0.jpg\ta cat\nim1.png\ta caf\xe9\n")
    with pytest.raises(
        ValueError, match=r"latin1.tsv:2: caption list is not UTF-8 text \(byte 0xe9"
    ):
        convert_imagetext([str(tsv)], str(tmp_path / "o"))
    jsonl = image_dir / "l.jsonl"
    jsonl.write_text('{"image": "im0.jpg", "caption": "a"}\n{"image": "im1.png", "caption": \n')
    with pytest.raises(ValueError, match=r"l.jsonl:2: not valid JSON"):
        convert_imagetext([str(jsonl)], str(tmp_path / "o"))
    empty = tmp_path / "captions.json"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"captions.json: empty file \(0 bytes\)"):
        convert_imagetext(
            [str(empty)], str(tmp_path / "o"), input_format="coco_captions", image_root="."
        )
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_empty_inputs_are_errors(tmp_path, image_dir):
    """An empty list, a folder without images, and a conversion writing nothing fail."""
    for text in ("", "image\tcaption\n"):  # empty, header only
        lst = image_dir / "empty.tsv"
        lst.write_text(text)
        with pytest.raises(ValueError, match=r"empty.tsv: the caption list is empty"):
            convert_imagetext([str(lst)], str(tmp_path / "o"))
    (tmp_path / "no_images").mkdir()
    with pytest.raises(ValueError, match=r"no_images: no image files"):
        convert_imagetext([str(tmp_path / "no_images")], str(tmp_path / "o"))
    # Every image missing (a wrong --image-root): an error, not "0 of 2 written" and exit 0.
    lst = image_dir / "l.tsv"
    lst.write_text("im0.jpg\ta cat\nim1.png\ta dog\n")
    with pytest.raises(
        ValueError,
        match=r"all 2 input image\(s\) were skipped \(missing_file 2\) \(is --image-root",
    ):
        convert_imagetext([str(lst)], str(tmp_path / "o2"), image_root=str(tmp_path))
