"""Detection converters (COCO / LVIS json): round trip, checks of the json, the OV splits.

Expected boxes are computed here from the json (xywh -> xyxy, clipping with NumPy); the pipeline
check reads the shards through `make_pretrain_dataset` with boxes="gt".
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from regionclip_jax.data import ov_splits
from regionclip_jax.data.convert_detection import AnnotationError, convert_detection
from regionclip_jax.data.shards import ShardReader

H, W = 20, 30


def _write_images(root, n):
    root.mkdir(exist_ok=True)
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")


def _coco(n_images=4):
    cats = [{"id": 3, "name": "car"}, {"id": 5, "name": "airplane"}, {"id": 10, "name": "light"}]
    images = [
        {"id": 100 + i, "file_name": f"{i}.png", "height": H, "width": W} for i in range(n_images)
    ]
    anns = [
        {"id": 1, "image_id": 100, "category_id": 3, "bbox": [1.5, 2.0, 10.0, 5.0], "iscrowd": 0},
        {"id": 2, "image_id": 100, "category_id": 5, "bbox": [25.0, 10.0, 10.0, 20.0]},  # clipped
        {"id": 3, "image_id": 100, "category_id": 10, "bbox": [3.0, 3.0, 0.0, 4.0]},  # degenerate
        {"id": 4, "image_id": 101, "category_id": 5, "bbox": [0, 0, 30, 20], "iscrowd": 1},
        {"id": 5, "image_id": 101, "category_id": 77, "bbox": [0, 0, 5, 5]},  # unknown category
        {"id": 6, "image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5]},  # unknown image
        {"id": 7, "image_id": 103, "category_id": 3, "bbox": [40, 0, 5, 5]},  # fully outside
    ]
    return {"images": images, "annotations": anns, "categories": cats}


def _expected_boxes(data, image_id):
    out = []
    for a in data["annotations"]:
        if a["image_id"] != image_id or a["category_id"] not in {3, 5, 10}:
            continue
        x, y, w, h = a["bbox"]
        b = np.clip([x, y, x + w, y + h], 0, [W, H, W, H])
        if b[2] - b[0] > 0 and b[3] - b[1] > 0:
            out.append((list(b), a["category_id"], bool(a.get("iscrowd", 0))))
    return out


def test_coco_round_trip_and_policy(tmp_path):
    _write_images(tmp_path / "img", 4)
    data = _coco()
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")  # corrupt image, no annotations
    data["images"].append({"id": 104, "file_name": "missing.png"})
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(data))
    m = convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "out"), part_size=2)
    assert m["input_records"] == 5
    assert m["skipped"] == {"corrupt_image": 1, "missing_file": 1}
    assert m["repaired"]["annotation_unknown_category_dropped"] == 1
    assert m["repaired"]["annotation_unknown_image_dropped"] == 1
    assert m["repaired"]["box_clipped"] == 1
    assert m["repaired"]["box_degenerate_dropped"] == 2
    recs = {r["id"]: r for r in ShardReader(tmp_path / "out")}
    assert sorted(recs) == ["100", "101", "103"]
    for rid, rec in recs.items():
        exp = _expected_boxes(data, int(rid))
        np.testing.assert_allclose(rec["boxes"], np.array([e[0] for e in exp]).reshape(-1, 4))
        assert rec["category_ids"].tolist() == [e[1] for e in exp]
        assert rec["iscrowd"].tolist() == [e[2] for e in exp]
        src = np.asarray(Image.open(tmp_path / "img" / f"{int(rid) - 100}.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), src)
    assert recs["103"]["boxes"].shape == (0, 4)  # kept as "annotated, no objects"
    assert m["metadata"]["category_map"] == {"3": 0, "5": 1, "10": 2}

    # empty_images="skip": the image left without boxes is skipped and counted.
    m = convert_detection(
        str(js), str(tmp_path / "img"), str(tmp_path / "out2"), empty_images="skip"
    )
    assert m["skipped"]["no_boxes"] == 1 and m["num_records"] == 2


def test_json_errors_are_clear(tmp_path):
    _write_images(tmp_path / "img", 1)
    bad = {"images": [{"id": 1, "file_name": "0.png"}], "categories": [{"id": 1, "name": "a"}]}
    js = tmp_path / "a.json"
    js.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match="no 'annotations' list"):
        convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    bad["annotations"] = [{"id": 4, "image_id": 1, "category_id": 1}]
    js.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=r"1 annotations without .*id 4"):
        convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    bad["annotations"] = [{"id": 4, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]
    js.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match="category_id 9"):
        convert_detection(
            str(js), str(tmp_path / "img"), str(tmp_path / "o"), unknown_categories="error"
        )


# The 80 COCO category names in id order (COCO 2017 `categories`), written out here as data.
COCO80 = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon "
    "bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
COCO80_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_coco_ovd_split_and_filtering(tmp_path):
    cats = [{"id": i, "name": n.replace("_", " ")} for i, n in zip(COCO80_IDS, COCO80)]
    sides = ov_splits.coco_ovd_split(cats)
    assert sum(s == "base" for s in sides.values()) == 48
    assert sum(s == "novel" for s in sides.values()) == 17
    # Novel classes named in OVR-CNN / RegionCLIP papers; excluded ones are outside the 65.
    by_name = {c["name"]: sides[c["id"]] for c in cats}
    for n in ("bus", "dog", "cow", "elephant", "umbrella", "couch", "keyboard", "scissors"):
        assert by_name[n] == "novel"
    for n in ("traffic light", "hot dog", "dining table", "teddy bear", "hair drier"):
        assert by_name[n] == "excluded"
    assert by_name["person"] == by_name["toothbrush"] == "base"

    _write_images(tmp_path / "img", 2)
    anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [0, 0, 5, 5]},  # person: base
        {"id": 2, "image_id": 0, "category_id": 18, "bbox": [0, 0, 6, 6]},  # dog: novel
        {"id": 3, "image_id": 1, "category_id": 10, "bbox": [0, 0, 7, 7]},  # traffic light
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(2)],
        "annotations": anns,
        "categories": cats,
    }
    js = tmp_path / "c.json"
    js.write_text(json.dumps(data))
    m = convert_detection(
        str(js),
        str(tmp_path / "img"),
        str(tmp_path / "b"),
        split="coco48_17",
        keep="base",
        empty_images="skip",
    )
    assert m["metadata"]["annotations"]["outside_split"] == 1
    assert m["metadata"]["annotations"]["other_side"] == 1
    assert m["skipped"] == {"no_boxes": 1}
    (rec,) = list(ShardReader(tmp_path / "b"))
    assert rec["category_ids"].tolist() == [1]
    assert len(m["metadata"]["category_map"]) == 48


def test_lvis_split(tmp_path):
    _write_images(tmp_path / "train2017", 2)
    cats = [
        {"id": 1, "name": "a", "frequency": "f"},
        {"id": 2, "name": "b", "frequency": "c"},
        {"id": 3, "name": "c", "frequency": "r"},
    ]
    data = {
        "images": [
            {"id": i, "coco_url": f"http://images.cocodataset.org/train2017/{i}.png"}
            for i in range(2)
        ],
        "annotations": [
            {"id": k, "image_id": k % 2, "category_id": 1 + k % 3, "bbox": [0, 0, 4, 4]}
            for k in range(6)
        ],
        "categories": cats,
    }
    js = tmp_path / "lvis.json"
    js.write_text(json.dumps(data))
    m = convert_detection(str(js), str(tmp_path), str(tmp_path / "n"), split="lvis", keep="novel")
    recs = list(ShardReader(tmp_path / "n"))
    assert sorted(c for r in recs for c in r["category_ids"].tolist()) == [3, 3]
    assert {c["id"]: c["split"] for c in m["metadata"]["categories"]} == {
        1: "base",
        2: "base",
        3: "novel",
    }
    del cats[0]["frequency"]
    js.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="frequency"):
        convert_detection(str(js), str(tmp_path), str(tmp_path / "n2"), split="lvis")


def test_make_shards_detection_command(tmp_path, capsys):
    import argparse

    from regionclip_jax.data.commands import add_make_shards_arguments, make_shards_command

    _write_images(tmp_path / "img", 4)
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(_coco()))
    parser = argparse.ArgumentParser()
    add_make_shards_arguments(parser)
    argv = ["detection", "--annotations", str(js), "--image-root", str(tmp_path / "img")]
    args = parser.parse_args([*argv, "--out", str(tmp_path / "o"), "--quiet", "--workers", "2",
                              "--part-size", "2", "--empty-images", "skip"])  # fmt: skip
    assert make_shards_command(args) == 0
    out = capsys.readouterr().out
    assert "2 of 4 images written" in out and "no_boxes 2" in out  # 102 empty, 103 outside
    assert "annotation_unknown_category_dropped 1" in out


def test_unreadable_or_empty_json_is_an_error_naming_it(tmp_path):
    _write_images(tmp_path / "img", 1)
    js = tmp_path / "inst.json"
    js.write_bytes(b"")
    with pytest.raises(ValueError, match=r"inst.json: empty file \(0 bytes\), expected a COCO"):
        convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    js.write_bytes(b'{"images": [\n{"id": 1, "file_name": "caf\xe9.png"}]}')
    with pytest.raises(
        ValueError, match=r"inst.json:2: .* not UTF-8 text \(byte 0xe9 at column 28"
    ):
        convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    js.write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(ValueError, match=r"inst.json:2: not valid JSON"):
        convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    for key in ("images", "annotations"):
        data = _coco(1)
        data[key] = []
        js.write_text(json.dumps(data))
        with pytest.raises(AnnotationError, match=f"the '{key}' list is empty"):
            convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_size_mismatch_is_an_error_or_rescaled(tmp_path, capsys):
    """A json size that is not the file's: an error naming the image, or boxes rescaled."""
    import argparse

    from regionclip_jax.data.commands import add_make_shards_arguments, make_shards_command
    from regionclip_jax.data.convert_detection import SizeMismatchError

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "img" / "small.png")
    data = {
        "images": [{"id": 1, "file_name": "small.png", "width": 128, "height": 96}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [60, 40, 40, 32]}],
        "categories": [{"id": 3, "name": "car"}],
    }
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(data))
    with pytest.raises(
        SizeMismatchError,
        match=r"image 1 \(.*small.png\): the annotations give its size as 128x96 \(width x "
        r"height\) but the file is 64x48",
    ):
        convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "o"))
    parser = argparse.ArgumentParser()
    add_make_shards_arguments(parser)
    argv = ["detection", "--annotations", str(js), "--image-root", str(tmp_path / "img")]
    args = parser.parse_args([*argv, "--out", str(tmp_path / "o"), "--quiet", "--size-mismatch",
                              "rescale"])  # fmt: skip
    assert make_shards_command(args) == 0
    assert "boxes_rescaled_to_image 1" in capsys.readouterr().out
    (rec,) = list(ShardReader(tmp_path / "o"))
    assert (rec["height"], rec["width"]) == (48, 64)
    np.testing.assert_allclose(rec["boxes"], [[30, 20, 50, 36]])  # the 128x96 box, halved


# ---------------------------------------------------------------------------------------------
# Instance masks. The reference is pycocotools' own reading of the json (COCO.annToMask).


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a 0/1 mask, from the definition: run lengths in
    column-major order, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] == 1 else runs


def _mask_coco():
    """A json whose annotations carry every segmentation form, good and bad."""
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(3)
    blob = np.zeros((H, W), np.uint8)
    blob[4:15, 6:20] = rng.random((11, 14)) < 0.7
    ring = np.zeros((H, W), np.uint8)
    ring[2:18, 10:28] = 1
    ring[6:14, 15:23] = 0
    compressed = mask_util.encode(np.asfortranarray(ring))["counts"].decode("ascii")
    segs = {
        # two polygons of one instance (a triangle and a quadrilateral)
        1: [[2.0, 2.0, 12.5, 3.0, 5.0, 11.0], [20.0, 5.0, 28.0, 5.0, 28.0, 15.0, 21.0, 12.0]],
        2: {"size": [H, W], "counts": _runs(blob)},  # uncompressed RLE (as COCO's crowds)
        3: {"size": [H, W], "counts": compressed},  # compressed RLE, counts a str
        4: [],  # bad: no polygon
        5: [[1.0, 1.0, 8.0, 8.0]],  # bad: 2 points
        6: [[1.0, 1.0, 8.0, float("nan"), 3.0, 9.0]],  # bad: non-finite
        7: {"size": [H + 1, W], "counts": _runs(np.zeros((H + 1, W)))},  # bad: not the image size
        8: None,  # no segmentation, in a json that has them elsewhere
    }
    anns = []
    for k, seg in segs.items():
        a = {"id": k, "image_id": 100 + k % 2, "category_id": 3, "bbox": [1.0, 1.0, 20.0, 15.0]}
        if seg is not None:
            a["segmentation"] = seg
        anns.append(a)
    images = [{"id": 100 + i, "file_name": f"{i}.png", "height": H, "width": W} for i in (0, 1)]
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "car"}]}


def test_polygon_and_rle_segmentations_become_masks(tmp_path):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    _write_images(tmp_path / "img", 2)
    data = _mask_coco()
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(data))  # NaN is written as the (Python-readable) NaN token
    m = convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "out"), part_size=1)
    assert m["repaired"]["bad_segmentation"] == 4
    assert m["repaired"]["missing_segmentation"] == 1
    assert m["metadata"]["masks"] is True
    coco = COCO(str(js))
    good = {1, 2, 3}
    seen = set()
    for rec in ShardReader(tmp_path / "out"):
        ids = [a["id"] for a in data["annotations"] if a["image_id"] == int(rec["id"])]
        assert len(rec["masks"]) == len(rec["boxes"]) == len(ids)  # bad ones keep their box
        for ann_id, rle in zip(ids, rec["masks"]):
            if ann_id not in good:
                assert rle is None, ann_id
                continue
            seen.add(ann_id)
            assert rle["size"] == [H, W] and isinstance(rle["counts"], bytes)
            expected = coco.annToMask(coco.anns[ann_id])
            assert expected.sum() > 20  # a real shape, not an empty mask
            np.testing.assert_array_equal(mask_util.decode(rle), expected, err_msg=str(ann_id))
    assert seen == good


def test_json_without_segmentation_stores_no_masks(tmp_path):
    _write_images(tmp_path / "img", 4)
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(_coco()))
    m = convert_detection(str(js), str(tmp_path / "img"), str(tmp_path / "out"))
    assert m["metadata"]["masks"] is False
    assert "missing_segmentation" not in m["repaired"]
    assert all(rec["masks"] is None for rec in ShardReader(tmp_path / "out"))


def test_rescaled_images_rescale_their_masks(tmp_path):
    """--size-mismatch rescale: polygons scaled exactly, RLEs resampled at pixel centres."""
    from pycocotools import mask as mask_util

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "img" / "small.png")
    big = np.zeros((96, 128), np.uint8)
    big[40:72, 60:100] = 1  # the box below, in the json's 128x96 frame
    poly = [60.0, 40.0, 100.0, 40.0, 100.0, 72.0, 60.0, 72.0]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [60, 40, 40, 32], "segmentation": [poly]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 40, 40, 32],
         "segmentation": {"size": [96, 128], "counts": _runs(big)}},
    ]  # fmt: skip
    data = {
        "images": [{"id": 1, "file_name": "small.png", "width": 128, "height": 96}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "car"}],
    }
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(data))
    m = convert_detection(
        str(js), str(tmp_path / "img"), str(tmp_path / "o"), size_mismatch="rescale"
    )
    assert "bad_segmentation" not in m["repaired"]
    (rec,) = list(ShardReader(tmp_path / "o"))
    half = np.zeros((48, 64), np.uint8)
    half[20:36, 30:50] = 1  # the halved box [30, 20, 50, 36]
    for rle in rec["masks"]:
        assert rle["size"] == [48, 64]
        np.testing.assert_array_equal(mask_util.decode(rle), half)
