"""ShapesWorld: determinism, boxes against an independent rasteriser, caption truth, the split,
COCO json through pycocotools, and the `shapesworld` command."""

from __future__ import annotations

import argparse
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from regionclip_jax.data import shapesworld as sw
from regionclip_jax.data.shards import ShardReader, load_manifest


def _inside(polygon: np.ndarray, size: int) -> np.ndarray:
    """Reference mask: even-odd ray casting from every pixel centre over all edges."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    inside = np.zeros((size, size), bool)
    for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = ((y1 > yy) != (y2 > yy)) & (xx < x1 + (yy - y1) * (x2 - x1) / (y2 - y1))
        inside ^= crosses
    return inside


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw") / "a"
    sw.generate(out, num_train=40, num_val=12, seed=0, image_size=96, records_per_shard=16)
    return out


def _files(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_deterministic_by_seed_and_index(dataset, tmp_path):
    # Same arguments, rendered by 2 worker processes: every file byte-identical.
    sw.generate(tmp_path / "b", 40, 12, seed=0, image_size=96, records_per_shard=16, num_workers=2)
    a, b = _files(dataset), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert "train/shapesworld_train-00002-of-00003.array_record" in a
    for name in a:
        assert a[name] == b[name], name

    # Another seed: other images and annotations.
    sw.generate(tmp_path / "c", 40, 12, seed=1, image_size=96, records_per_shard=16)
    c = _files(tmp_path / "c")
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    imgs_a = [r["image"] for r in ShardReader(dataset / "train")]
    imgs_c = [r["image"] for r in ShardReader(tmp_path / "c" / "train")]
    assert all(x != y for x, y in zip(imgs_a, imgs_c))

    # Any scene regenerates alone; train and val scenes differ.
    config = sw.ShapesWorldConfig(image_size=96)
    with ShardReader(dataset / "val") as reader:
        for i in (0, 7, 11):
            rec = reader[i]
            scene = sw.render_scene(i, seed=0, split="val", config=config)
            np.testing.assert_array_equal(
                np.asarray(Image.open(io.BytesIO(rec["image"]))), scene.image
            )
            assert rec["captions"] == list(scene.captions)
    assert not np.array_equal(
        sw.render_scene(3, split="train", config=config).image,
        sw.render_scene(3, split="val", config=config).image,
    )


def test_boxes_are_the_tight_extent_of_each_objects_pixels():
    size = 128
    config = sw.ShapesWorldConfig(image_size=size)
    n_objects = n_occluded = 0
    for i in range(60):
        scene = sw.render_scene(i, seed=5, config=config)
        masks = [_inside(o.polygon, size) for o in scene.objects]
        for j, (obj, mask) in enumerate(zip(scene.objects, masks)):
            rows, cols = np.nonzero(mask)
            expect = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            np.testing.assert_array_equal(obj.box, expect, err_msg=f"scene {i} object {j}")
            assert obj.area == mask.sum()
            covered = np.zeros_like(mask)
            for later in masks[j + 1 :]:
                covered |= later
            visible = mask & ~covered
            assert obj.visible_area == visible.sum()
            # The image shows the object, in its colour, exactly where it is visible.
            assert (scene.image[visible] == np.array(obj.rgb, np.uint8)).all()
            assert obj.kept == (visible.sum() >= config.min_visible * mask.sum())
            # Objects lie inside the image.
            assert obj.box[0] >= 0 and obj.box[1] >= 0 and obj.box[2] <= size and obj.box[3] <= size
            n_objects += 1
            n_occluded += 0 < obj.visible_area < obj.area
        # Pixels no object covers keep the background: no object colour leaks there.
        background = ~np.logical_or.reduce(masks)
        for obj in scene.objects:
            assert not (scene.image[background] == np.array(obj.rgb, np.uint8)).all(axis=1).any()
    assert n_objects > 150 and n_occluded > 10  # occlusion does happen


def test_mostly_hidden_objects_are_left_out_of_boxes_and_captions():
    config = sw.ShapesWorldConfig(image_size=64)
    found = 0
    for i in range(400):
        rec, scene = sw.scene_record(i, seed=9, config=config)
        hidden = [o for o in scene.objects if not o.kept]
        if not hidden:
            continue
        found += 1
        kept_boxes = {tuple(o.box) for o in scene.kept}
        assert {tuple(b) for b in rec["boxes"]} == kept_boxes and len(rec["boxes"]) == len(
            scene.kept
        )
        for o in hidden:
            assert o.visible_area < config.min_visible * o.area
            if all(k.shape != o.shape for k in scene.kept):
                assert not any(o.shape in c or sw.PLURALS[o.shape] in c for c in scene.captions)
    assert found >= 3


_NUM = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_SIZE = {w: size for size, words in sw.SIZE_WORDS.items() for w in words}
_SHAPE = {**{s: s for s in sw.SHAPES}, **{p: s for s, p in sw.PLURALS.items()}}
_NP = re.compile(
    r"\b(a|an|two|three|four|five) (?:({sizes}) )?(?:({colors}) )?({shapes})\b".format(
        sizes="|".join(_SIZE),
        colors="|".join(sw.COLORS),
        shapes="|".join(sorted(_SHAPE, key=len, reverse=True)),
    )
)


def test_captions_mention_only_what_is_there():
    config = sw.ShapesWorldConfig(image_size=64)
    mentioned = set()
    for i in range(250):
        scene = sw.render_scene(i, seed=2, config=config)
        kept = scene.kept
        assert len(scene.captions) == config.captions_per_image
        for cap in scene.captions:
            words = cap.split()
            nps = _NP.findall(cap)
            assert nps, cap
            # Every shape and colour word in a caption belongs to a parsed noun phrase.
            assert sum(w.strip(",") in _SHAPE for w in words) == len(nps), cap
            assert sum(w in sw.COLORS for w in words) == sum(1 for n in nps if n[2]), cap
            assert len(nps) <= config.max_mentions
            for det, size_word, color, noun in nps:
                shape, size = _SHAPE[noun], _SIZE.get(size_word)
                match = [
                    o
                    for o in kept
                    if o.shape == shape and color in ("", o.color) and size in (None, o.size)
                ]
                assert len(match) == _NUM[det], (cap, det, size_word, color, noun)
                assert (noun == shape) == (_NUM[det] == 1), cap  # singular iff one
                mentioned.add(shape)
            if "background" in words:
                assert words[words.index("background") - 1] == scene.background, cap
            # Captions say what, never where.
            assert not set(words) & {
                "left",
                "right",
                "top",
                "bottom",
                "above",
                "below",
                "behind",
                "corner",
            }
    assert mentioned == set(sw.SHAPES)


def test_base_novel_split_is_disjoint_and_covering(dataset):
    assert set(sw.BASE_SHAPES).isdisjoint(sw.NOVEL_SHAPES)
    assert set(sw.BASE_SHAPES) | set(sw.NOVEL_SHAPES) == set(sw.SHAPES)
    assert (len(sw.BASE_SHAPES), len(sw.NOVEL_SHAPES)) == (7, 3)
    for mode, n in (("shape", 10), ("shape_color", 80)):
        cats = sw.categories(sw.ShapesWorldConfig(categories=mode))
        assert len(cats) == n and len({c["id"] for c in cats}) == n
        for c in cats:
            shape = c["name"].split()[-1]
            assert c["split"] == ("novel" if shape in sw.NOVEL_SHAPES else "base")
    summary = json.loads((dataset / "shapesworld.json").read_text())
    assert summary["novel_categories"] == [s for s in sw.SHAPES if s in sw.NOVEL_SHAPES]
    assert sorted(summary["base_categories"] + summary["novel_categories"]) == sorted(sw.SHAPES)


def test_train_novel_weight_thins_novel_shapes_in_train_only():
    # 7 base + 3 novel shapes at weight w: the novel share of drawn objects is 3w / (7 + 3w).
    uniform = sw.ShapesWorldConfig(image_size=64)
    rare = sw.ShapesWorldConfig(image_size=64, train_novel_weight=7 / 18)  # 1 object in 7

    def novel_share(config, split, n=400):
        shapes = [
            o.shape
            for i in range(n)
            for o in sw.render_scene(i, split=split, config=config).objects
        ]
        return np.mean([s in sw.NOVEL_SHAPES for s in shapes]), len(shapes)

    share, count = novel_share(rare, "train")
    # Binomial standard error at p = 1/7 over ~1,400 objects is ~0.009: 4 sigma either side.
    assert abs(share - 1 / 7) < 4 * np.sqrt((1 / 7) * (6 / 7) / count), share
    share, count = novel_share(uniform, "train")
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / count), share
    # Held-out scenes do not depend on the weight: the same images, pixel for pixel.
    for i in range(20):
        a = sw.render_scene(i, split="val", config=rare)
        b = sw.render_scene(i, split="val", config=uniform)
        np.testing.assert_array_equal(a.image, b.image)
        assert a.captions == b.captions
    # Weight 0: a training set without a single novel object.
    none = sw.ShapesWorldConfig(image_size=64, train_novel_weight=0.0)
    assert novel_share(none, "train", 100)[0] == 0.0
    with pytest.raises(ValueError, match="train_novel_weight"):
        sw.ShapesWorldConfig(train_novel_weight=-1.0)


def test_coco_json_loads_in_pycocotools_and_matches_the_shards(dataset):
    from pycocotools.coco import COCO

    for split, n in (("train", 40), ("val", 12)):
        coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert {c["name"]: c["split"] for c in coco.loadCats(coco.getCatIds())} == {
            s: "novel" if s in sw.NOVEL_SHAPES else "base" for s in sw.SHAPES
        }
        caps = COCO(str(dataset / "annotations" / f"captions_{split}.json"))
        manifest = load_manifest(dataset / split)
        assert manifest["num_records"] == n and manifest["skipped"] == {}
        assert manifest["totals"]["boxes"] == len(coco.getAnnIds())
        for i, rec in enumerate(ShardReader(dataset / split)):
            img = coco.loadImgs(i + 1)[0]
            assert img["record_id"] == rec["id"] and (img["height"], img["width"]) == (96, 96)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=i + 1))
            xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            np.testing.assert_array_equal(xyxy, rec["boxes"])
            np.testing.assert_array_equal([a["category_id"] for a in anns], rec["category_ids"])
            assert all(a["visible_fraction"] >= 0.3 for a in anns)
            assert [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=i + 1))] == rec[
                "captions"
            ]


def test_shapesworld_command(tmp_path, capsys):
    from regionclip_jax.data import commands

    parser = argparse.ArgumentParser()
    commands.add_shapesworld_parser(parser.add_subparsers())
    out = tmp_path / "cmd"
    argv = [
        "shapesworld",
        "--out",
        str(out),
        "--num-train",
        "200",
        "--num-val",
        "20",
        "--seed",
        "3",
    ]
    argv += ["--image-size", "64", "--quiet", "--write-images"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "ShapesWorld: 220 images of 64x64" in text and "novel 3: star, cross, heart" in text
    assert load_manifest(out / "train")["num_records"] == 200
    assert len(os.listdir(out / "images" / "val")) == 20
    first = json.loads((out / "annotations" / "instances_val.json").read_text())["images"][0]
    assert (out / "images" / first["file_name"]).exists()
    # A second run into the same directory refuses instead of mixing two data sets.
    with pytest.raises(FileExistsError):
        args.func(args)


def _shoelace(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_masks_are_each_objects_visible_pixels():
    """Shard masks against the independent rasteriser `_inside`: object i's pixels minus those of
    every later object (COCO's visible-part masks); area against the polygon's own area."""
    from pycocotools import mask as mask_util

    checked = unoccluded = 0
    for index in range(8):
        record, scene = sw.scene_record(index, seed=4, config=sw.ShapesWorldConfig(image_size=96))
        polys = [_inside(o.polygon, 96) for o in scene.objects]
        assert len(record["masks"]) == len(record["boxes"])
        for slot, (rle, i) in enumerate(zip(record["masks"], scene.kept_indices)):
            visible = polys[i] & ~np.logical_or.reduce([np.zeros((96, 96), bool), *polys[i + 1 :]])
            mask = mask_util.decode(rle).astype(bool)
            np.testing.assert_array_equal(mask, visible)
            assert mask.sum() == scene.objects[i].visible_area
            ys, xs = np.nonzero(mask)
            box = record["boxes"][slot]
            assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1]
            if mask.sum() == scene.objects[i].area:  # unoccluded: the pixel count ~ the area
                perimeter = np.linalg.norm(
                    np.diff(scene.objects[i].polygon, axis=0, append=scene.objects[i].polygon[:1]),
                    axis=1,
                ).sum()
                assert abs(mask.sum() - _shoelace(scene.objects[i].polygon)) < 0.5 * perimeter
                unoccluded += 1
            checked += 1
    assert checked > 20 and unoccluded > 10


def test_coco_json_segmentation_equals_the_shard_masks(dataset):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    coco = COCO(str(dataset / "annotations" / "instances_val.json"))
    n = 0
    for i, rec in enumerate(ShardReader(dataset / "val")):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=i + 1))
        assert len(anns) == len(rec["masks"])
        for a, rle in zip(anns, rec["masks"]):
            m = coco.annToMask(a)
            np.testing.assert_array_equal(m, mask_util.decode(rle))
            assert m.sum() == a["area"]
            n += 1
    assert n > 20
