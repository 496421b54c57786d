"""Detection pipeline: COCO json -> converter -> pipeline round trip, repeat factors, determinism,
exact resume (also with worker processes), process sharding, tfds source.

References are independent: pixels from PIL (bicubic resize of the source PNG), boxes from the
COCO json (xywh -> xyxy, scaled and mirrored here with NumPy), repeat factors from the formula of
detectron2's RepeatFactorTrainingSampler written out below.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from regionclip_jax.data import shapesworld
from regionclip_jax.data.convert_detection import convert_detection
from regionclip_jax.data.detection_pipeline import (
    RepeatFactorSampler,
    make_detection_dataset,
    repeat_factor_epoch,
    repeat_factors,
)

N = 12
SIZES = (48, 56, 64)
CANVAS = (64, 64)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    shapesworld.generate(
        str(root / "sw"), num_train=N, num_val=0, seed=2, image_size=64, write_images=True
    )
    ann = root / "sw" / "annotations" / "instances_train.json"
    out = root / "shards"
    convert_detection(str(ann), str(root / "sw" / "images"), str(out), part_size=5)
    return out, json.loads(ann.read_text()), root / "sw" / "images"


def _ds(d, **kw):
    args = dict(
        batch_size=3,
        canvas=CANVAS,
        train_sizes=SIZES,
        max_size=64,
        max_boxes=6,
        seed=1,
        normalize=False,
    )
    args.update(kw)
    return make_detection_dataset(d, **args)


def _take(ds, n, state=None):
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    out = [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
    it.close()
    return out


def test_round_trip_pixels_and_boxes(coco):
    d, data, img_root = coco
    images = {i + 0: im for i, im in enumerate(data["images"])}
    batches = _take(_ds(d, num_epochs=1, shuffle=False), N // 3)
    seen_sizes = set()
    for b in batches:
        for j in range(3):
            idx = int(b["source_index"][j])
            im = images[idx]  # the converter keeps the json's image order
            src = np.asarray(Image.open(img_root / im["file_name"]).convert("RGB"))
            h, w = (int(v) for v in b["image_hw"][j])
            assert h == w and h in SIZES  # square images: shorter side = the chosen size
            seen_sizes.add(h)
            want = np.asarray(Image.fromarray(src).resize((w, h), Image.BICUBIC))
            if b["flipped"][j]:
                want = want[:, ::-1]
            np.testing.assert_array_equal(b["images"][j, :h, :w], want)
            assert not b["images"][j, h:].any() and not b["images"][j, :, w:].any()
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]][:6]
            s = h / 64
            exp = np.array(
                [
                    [x * s, y * s, (x + bw) * s, (y + bh) * s]
                    for x, y, bw, bh in (a["bbox"] for a in anns)
                ]
            ).reshape(-1, 4)
            if b["flipped"][j]:
                exp = np.stack([w - exp[:, 2], exp[:, 1], w - exp[:, 0], exp[:, 3]], 1)
            k = len(anns)
            np.testing.assert_allclose(b["boxes"][j, :k], exp, rtol=1e-5, atol=1e-4)
            assert b["box_mask"][j].tolist() == [True] * k + [False] * (6 - k)
            assert b["labels"][j, :k].tolist() == [a["category_id"] for a in anns]
            assert (b["labels"][j, k:] == -1).all() and not b["boxes"][j, k:].any()
    assert len(seen_sizes) > 1  # multi-scale


def _reference_factors(cat_sets, t):
    n = len(cat_sets)
    f = {}
    for cats in cat_sets:
        for c in set(cats):
            f[c] = f.get(c, 0) + 1 / n
    rc = {c: max(1.0, math.sqrt(t / fc)) for c, fc in f.items()}
    return [max([rc[c] for c in cats], default=1.0) for cats in cat_sets]


@pytest.mark.learning
def test_repeat_factors_follow_the_formula_and_stochastic_rounding(learning_seed, report_margin):
    rng = np.random.default_rng(learning_seed)
    cat_sets = [list(rng.choice(20, rng.integers(0, 4), replace=False)) for _ in range(200)]
    cat_sets[0] = [99]  # a rare category: r = sqrt(0.3 / (1/200)) ~ 7.7
    t = 0.3
    got = repeat_factors(cat_sets, t)
    np.testing.assert_allclose(got, _reference_factors(cat_sets, t))
    counts = []
    for e in range(1200):
        idx = repeat_factor_epoch(got, seed=4 + learning_seed, epoch=e)
        c = np.bincount(idx, minlength=len(got))
        assert ((c == np.floor(got)) | (c == np.floor(got) + 1)).all()
        counts.append(c)
    mean = np.mean(counts, axis=0)
    # Stochastic rounding is unbiased: over 1200 epochs the mean count is the factor (the standard
    # error of one mean is at most 0.5 / sqrt(1200) = 0.014; the largest of 200 is about 3 of them,
    # the threshold 0.1 is 7; rounding always down or up would be off by up to 1).
    err = np.abs(mean - got).max()
    report_margin(err, 0.1, higher_is_better=False, what="max |mean count - factor|")
    assert err < 0.1
    # Processes take disjoint slices of the same epoch list that together cover it.
    s = [
        RepeatFactorSampler(got, seed=4, shard_index=i, shard_count=3, num_epochs=2)
        for i in range(3)
    ]
    full = np.concatenate([repeat_factor_epoch(got, 4, 0), repeat_factor_epoch(got, 4, 1)])
    parts = [[s[i][k] for k in range(len(s[i]))] for i in range(3)]
    assert sum(len(p) for p in parts) == len(full)
    assert sorted(sum(parts, [])) == sorted(full.tolist())


def test_repeat_factor_pipeline_epoch_counts(coco):
    d, data, _ = coco
    per_image = [
        sorted({a["category_id"] for a in data["annotations"] if a["image_id"] == im["id"]})
        for im in data["images"]
    ]
    r = np.array(_reference_factors(per_image, 0.9))
    assert r.max() > 1.5  # some images are repeated
    ds = _ds(d, repeat_threshold=0.9, num_epochs=1, batch_size=1, drop_remainder=False)
    it = iter(ds)
    idx = np.array([int(b["source_index"][0]) for b in it])
    c = np.bincount(idx, minlength=N)
    assert ((c == np.floor(r)) | (c == np.floor(r) + 1)).all(), (c, r)


def test_determinism_resume_and_sharding(coco):
    d, _, _ = coco
    a, b = _take(_ds(d), 6), _take(_ds(d), 6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    it = iter(_ds(d, repeat_threshold=0.5))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [{k: np.array(v) for k, v in next(it).items()} for _ in range(4)]
    it.close()
    got = _take(_ds(d, repeat_threshold=0.5), 4, state=state)
    for x, y in zip(want, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    shares = [
        np.concatenate(
            [
                x["source_index"]
                for x in _take(_ds(d, shard_index=i, shard_count=2, num_epochs=1, batch_size=2), 3)
            ]
        )
        for i in range(2)
    ]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(np.concatenate(shares)) == list(range(N))


def _global_batches(d, processes: int, n: int, **kw) -> list[dict[str, np.ndarray]]:
    """The first `n` global batches of 4 examples as `processes` processes read them (each
    its block of every global batch, blocks concatenated in process order)."""
    parts = [
        _take(_ds(d, batch_size=4 // processes, shard_index=p, shard_count=processes, **kw), n)
        for p in range(processes)
    ]
    return [
        {k: np.concatenate([parts[p][i][k] for p in range(processes)]) for k in parts[0][i]}
        for i in range(n)
    ]


@pytest.mark.parametrize("repeat_threshold", [None, 0.5], ids=["plain", "repeat_factors"])
def test_global_batches_do_not_depend_on_the_process_count(coco, repeat_threshold):
    # 7 global batches of 4 from 12 records: more than two epochs, so the reshuffle and (with
    # repeat factors) the epoch boundaries are crossed.
    d, _, _ = coco
    one = _global_batches(d, 1, 7, repeat_threshold=repeat_threshold)
    flips = np.concatenate([b["flipped"] for b in one])
    assert 0 < flips.sum() < len(flips)  # the draws vary, so equal draws mean equal seeds
    assert len({int(x) for b in one for x in b["image_hw"][:, 0]}) > 1
    for processes in (2, 4):
        got = _global_batches(d, processes, 7, repeat_threshold=repeat_threshold)
        for i, (want, have) in enumerate(zip(one, got)):
            for k in want:  # records, order, scale, flip, pixels and boxes
                np.testing.assert_array_equal(
                    have[k], want[k], err_msg=f"{processes} processes, batch {i}, {k}"
                )


@pytest.mark.slow
def test_resume_with_worker_processes(coco):
    d, _, _ = coco
    make = lambda: _ds(d, num_workers=2, batch_size=2, repeat_threshold=0.5)
    it = iter(make())
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [{k: np.array(v) for k, v in next(it).items()} for _ in range(3)]
    it.close()
    got = _take(make(), 3, state=state)
    for x, y in zip(want, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_tfds_source_feeds_the_pipeline(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from regionclip_jax.data.tfds_shapesworld import TfdsDetectionSource, build_shapesworld_tfds

    builder = build_shapesworld_tfds(tmp_path, num_train=4, num_val=0, seed=0, image_size=32)
    src = TfdsDetectionSource(
        builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})["train"],
        label_offset=1,
    )
    (b,) = _take(
        make_detection_dataset(
            source=src,
            batch_size=4,
            canvas=(32, 32),
            train_sizes=(32,),
            max_size=32,
            max_boxes=6,
            num_epochs=1,
            flip=False,
            normalize=False,
        ),
        1,
    )
    for j in range(4):
        rid = int(src.record(int(b["source_index"][j]))["id"].split("-")[1])
        scene = shapesworld.render_scene(
            rid, seed=0, config=shapesworld.ShapesWorldConfig(image_size=32)
        )
        np.testing.assert_array_equal(b["images"][j], scene.image)
        k = len(scene.kept)
        np.testing.assert_allclose(b["boxes"][j, :k], [o.box for o in scene.kept][:6], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Instance masks (mask_scale). References: the json's masks decoded by pycocotools, their
# extents scaled / mirrored here with NumPy.


def _extent(mask: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] (exclusive) of a mask's nonzero pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def test_masks_are_resized_and_flipped_with_their_boxes(coco):
    from pycocotools.coco import COCO

    from regionclip_jax.data.detection_pipeline import detection_batch_spec

    d, data, _ = coco
    gt = COCO(str(d.parent / "sw" / "annotations" / "instances_train.json"))
    s, r = 0.5, 6
    batches = _take(_ds(d, num_epochs=1, shuffle=False, mask_scale=s), N // 3)
    spec = detection_batch_spec(
        batch_size=3, canvas=CANVAS, max_boxes=r, normalize=False, mask_scale=s
    )
    assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == spec
    assert spec["gt_masks"][0] == (3, r, 32, 32)
    flips = set()
    for b in batches:
        for j in range(3):
            im = data["images"][int(b["source_index"][j])]
            anns = gt.loadAnns(gt.getAnnIds(imgIds=im["id"]))[:r]
            k, (h, w) = len(anns), (int(v) for v in b["image_hw"][j])
            assert (
                b["mask_valid"][j].tolist()
                == b["box_mask"][j].tolist()
                == [True] * k + [False] * (r - k)
            )
            assert not b["gt_masks"][j, k:].any()  # padded slots
            # nothing outside the resized image (its mask-canvas extent rounded up)
            assert not b["gt_masks"][j, :, math.ceil(h * s) :].any()
            assert not b["gt_masks"][j, :, :, math.ceil(w * s) :].any()
            flips.add(bool(b["flipped"][j]))
            for slot, a in enumerate(anns):
                ext = _extent(gt.annToMask(a)) * (h / 64) * s  # square 64 px images
                if b["flipped"][j]:
                    ext = np.array([w * s - ext[2], ext[1], w * s - ext[0], ext[3]])
                got = _extent(b["gt_masks"][j, slot])
                # Point sampling may miss a thin tip (a triangle's apex) by a pixel more.
                np.testing.assert_allclose(got, ext, atol=2.0, err_msg=f"{im['id']} {slot}")
                # and the mask lies inside its box (boxes: unoccluded extent, masks: visible part)
                box = b["boxes"][j, slot] * s
                assert (got[:2] >= np.floor(box[:2]) - 1).all() and (got[2:] <= box[2:] + 1).all()
                area = gt.annToMask(a).sum() * (h / 64 * s) ** 2
                assert abs(b["gt_masks"][j, slot].sum() - area) <= 0.25 * area + 4
    assert flips == {True, False}


def test_mask_scale_none_leaves_batches_unchanged_and_maskless_records_are_invalid(coco, tmp_path):
    d, data, img_root = coco
    plain = _take(_ds(d, num_epochs=1, shuffle=False), 2)
    masked = _take(_ds(d, num_epochs=1, shuffle=False, mask_scale=0.25), 2)
    for p, m in zip(plain, masked):
        assert "gt_masks" not in p and "mask_valid" not in p
        assert set(m) - set(p) == {"gt_masks", "mask_valid"}
        for key in p:
            np.testing.assert_array_equal(p[key], m[key], err_msg=key)
        assert m["gt_masks"].shape[2:] == (16, 16) and m["mask_valid"].any()

    # The same json without segmentations: masks None in the shards, all-zero and invalid slots.
    stripped = dict(data, annotations=[{**a, "segmentation": None} for a in data["annotations"]])
    for a in stripped["annotations"]:
        del a["segmentation"]
    (tmp_path / "i.json").write_text(json.dumps(stripped))
    convert_detection(str(tmp_path / "i.json"), str(img_root), str(tmp_path / "s"))
    (b,) = _take(_ds(tmp_path / "s", num_epochs=1, shuffle=False, mask_scale=0.25), 1)
    assert b["box_mask"].any() and not b["mask_valid"].any() and not b["gt_masks"].any()
