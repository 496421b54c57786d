"""Pretraining pipeline: shapes, every transform against a NumPy/PIL reference written here,
determinism, exact resume (also with worker processes), process sharding, bad records."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from regionclip_jax.data.pipeline import make_pretrain_dataset, pretrain_batch_spec
from regionclip_jax.data.shards import ShardWriter
from regionclip_jax.text.tokenizer import tokenize

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CANVAS = (96, 96)
MIN_SIZE, MAX_SIZE = 48, 90
N_RECORDS = 24


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        # Portrait, landscape, square and very elongated images (the latter hit max_size).
        h, w = [(40, 60), (70, 30), (50, 50), (20, 100), (30, 41), (90, 45)][i % 6]
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        k = i % 5  # 0..4 GT boxes
        x1, y1 = rng.uniform(0, w - 6, k), rng.uniform(0, h - 6, k)
        gt = np.stack([x1, y1, x1 + rng.uniform(2, 6, k), y1 + rng.uniform(2, 6, k)], 1)
        p = 3 + i % 7  # 3..9 proposals
        px, py = rng.uniform(0, w - 6, p), rng.uniform(0, h - 6, p)
        recs.append(
            {
                "id": f"r{i}",
                "image": buf.getvalue(),
                "height": h,
                "width": w,
                "captions": [f"caption {j} of image {i}" for j in range(1 + i % 3)],
                "boxes": gt,
                "category_ids": np.arange(k) + 10 * (i % 2),
                "iscrowd": np.arange(k) == 3,  # the 4th box of 4-box records is a crowd box
                "proposals": np.stack([px, py, px + 5, py + 4], 1),
                "objectness": rng.normal(size=p),
            }
        )
    return recs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    recs = _records(N_RECORDS)
    with ShardWriter(d, "p", records_per_shard=10) as w:
        for r in recs:
            assert w.write(r)
    return d, recs


def _ds(path, **kw):
    args = dict(batch_size=4, canvas=CANVAS, min_size=MIN_SIZE, max_size=MAX_SIZE, seed=0)
    args.update(kw)
    return make_pretrain_dataset(path, **args)


def _take(ds, n: int, state=None) -> list[dict]:
    """n batches as plain NumPy copies (worker outputs live in shared memory)."""
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    out = [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
    it.close()
    return out


def _ref_size(h: int, w: int) -> tuple[int, int]:
    """Shortest edge to MIN_SIZE, longest capped at MAX_SIZE (truncating, as torchvision)."""
    if h <= w:
        nh, nw = MIN_SIZE, int(MIN_SIZE * w / h)
        if nw > MAX_SIZE:
            nh, nw = int(MAX_SIZE * nh / nw), MAX_SIZE
    else:
        nw, nh = MIN_SIZE, int(MIN_SIZE * h / w)
        if nh > MAX_SIZE:
            nw, nh = int(MAX_SIZE * nw / nh), MAX_SIZE
    return nh, nw


def test_batches_have_fixed_shapes_and_dtypes(shards):
    d, _ = shards
    for boxes, extra in ((None, None), ("gt", "labels"), ("proposals", "objectness")):
        spec = pretrain_batch_spec(batch_size=4, canvas=CANVAS, boxes=boxes, max_boxes=5)
        batches = _take(_ds(d, boxes=boxes, max_boxes=5), 7)  # crosses an epoch (6 per epoch)
        for b in batches:
            assert {k: (v.shape, v.dtype) for k, v in b.items()} == spec
        assert spec["images"] == ((4, 96, 96, 3), np.float32) and spec["tokens"][0] == (4, 77)
        if boxes:
            assert spec["boxes"][0] == (4, 5, 4) and spec[extra][0] == (4, 5)


def test_every_transform_equals_a_numpy_reference(shards):
    d, recs = shards
    seen_flip = set()
    for b in _take(_ds(d, boxes="gt", max_boxes=3), 12):
        for row in range(4):
            rec = recs[b["source_index"][row]]
            h, w = rec["height"], rec["width"]
            nh, nw = _ref_size(h, w)
            flipped = bool(b["flipped"][row])
            seen_flip.add(flipped)
            np.testing.assert_array_equal(b["image_hw"][row], [nh, nw])
            np.testing.assert_array_equal(b["orig_hw"][row], [h, w])
            np.testing.assert_allclose(b["scale"][row], [nh / h, nw / w], rtol=1e-6)

            # Image: PIL bicubic resize, mirror, (x/255 - mean)/std, zero padding.
            src = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
            resized = np.asarray(Image.fromarray(src).resize((nw, nh), Image.BICUBIC)).astype(
                np.float32
            )
            if flipped:
                resized = resized[:, ::-1]
            expect = np.zeros(CANVAS + (3,), np.float32)
            expect[:nh, :nw] = (resized / 255.0 - MEAN) / STD
            np.testing.assert_allclose(b["images"][row], expect, rtol=0, atol=1e-6)
            assert (b["images"][row][nh:] == 0).all() and (b["images"][row][:, nw:] == 0).all()

            # GT boxes: crowd boxes dropped, scaled by the size ratios, mirrored, first 3 kept.
            keep = ~np.asarray(rec["iscrowd"])
            gt = np.asarray(rec["boxes"], np.float64)[keep][:3]
            sx, sy = nw / w, nh / h
            gt = gt * [sx, sy, sx, sy]
            if flipped:
                gt = np.stack([nw - gt[:, 2], gt[:, 1], nw - gt[:, 0], gt[:, 3]], 1)
            k = len(gt)
            np.testing.assert_allclose(b["boxes"][row][:k], gt, rtol=1e-5, atol=1e-4)
            assert (b["boxes"][row][k:] == 0).all()
            np.testing.assert_array_equal(b["box_mask"][row], np.arange(3) < k)
            labels = np.asarray(rec["category_ids"])[keep][:3]
            np.testing.assert_array_equal(b["labels"][row], np.r_[labels, -np.ones(3 - k)])

            # Tokens: one of the record's captions, tokenized.
            options = tokenize(rec["captions"])
            assert any((b["tokens"][row] == t).all() for t in options)
    assert seen_flip == {True, False}


@pytest.mark.torch_ref
def test_torchvision_resize_gives_the_same_pixels(shards):
    # RegionCLIP's pretraining Resize(min, max_size) is torchvision's; ours must equal it.
    pytest.importorskip("torchvision")
    from torchvision import transforms as tvt

    d, recs = shards
    resize = tvt.Resize(MIN_SIZE, max_size=MAX_SIZE, interpolation=tvt.InterpolationMode.BICUBIC)
    for b in _take(_ds(d, normalize=False, flip=False), 6):
        assert b["images"].dtype == np.uint8
        for row in range(4):
            rec = recs[b["source_index"][row]]
            ref = np.asarray(resize(Image.open(io.BytesIO(rec["image"])).convert("RGB")))
            nh, nw = b["image_hw"][row]
            assert ref.shape[:2] == (nh, nw)
            np.testing.assert_array_equal(b["images"][row][:nh, :nw], ref)


def test_proposals_are_subsampled_scaled_and_padded(shards):
    d, recs = shards
    for b in _take(_ds(d, boxes="proposals", max_boxes=6, flip=False), 6):
        for row in range(4):
            rec = recs[b["source_index"][row]]
            nh, nw = b["image_hw"][row]
            sx, sy = nw / rec["width"], nh / rec["height"]
            props = np.asarray(rec["proposals"]) * [sx, sy, sx, sy]
            n = min(6, len(props))
            np.testing.assert_array_equal(b["box_mask"][row], np.arange(6) < n)
            assert (b["objectness"][row][n:] == -np.inf).all()
            # Each kept slot is one of the record's proposals (a subset without repeats when
            # there are more than 6), in the record's order, with its objectness.
            idx = [int(np.argmin(np.abs(props - bx).sum(1))) for bx in b["boxes"][row][:n]]
            assert idx == sorted(set(idx))
            np.testing.assert_allclose(b["boxes"][row][:n], props[idx], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(
                b["objectness"][row][:n], np.asarray(rec["objectness"])[idx], rtol=1e-6
            )


def test_same_seed_same_batches_other_seed_other_order(shards):
    d, _ = shards
    a = _take(_ds(d, boxes="gt", max_boxes=3), 8)
    b = _take(_ds(d, boxes="gt", max_boxes=3), 8)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    c = _take(_ds(d, boxes="gt", max_boxes=3, seed=1), 8)
    assert any(not np.array_equal(x["source_index"], y["source_index"]) for x, y in zip(a, c))
    # Epochs are reshuffled, and each covers every record once.
    epochs = (
        np.concatenate([x["source_index"] for x in a[:6]]),
        np.concatenate([x["source_index"] for x in _take(_ds(d), 12)[6:]]),
    )
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N_RECORDS))
    assert not np.array_equal(epochs[0], epochs[1])


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _run_and_resume(make, n_before: int, n_after: int) -> tuple[list[dict], list[dict]]:
    """(batches n_before.. of one uninterrupted run, the same count after restoring its state)."""
    it = iter(make())
    for _ in range(n_before):
        next(it)
    state = it.get_state()
    uninterrupted = [{k: np.array(v) for k, v in next(it).items()} for _ in range(n_after)]
    it.close()
    return uninterrupted, _take(make(), n_after, state=state)


def test_restored_state_continues_exactly(shards):
    d, _ = shards
    # 4 + 6 batches of 4 cross the epoch boundary (6 batches per epoch).
    want, got = _run_and_resume(lambda: _ds(d, boxes="proposals", max_boxes=4), 4, 6)
    _assert_same(got, want)


def test_restored_state_continues_exactly_with_worker_processes(shards):
    d, _ = shards
    want, got = _run_and_resume(lambda: _ds(d, num_workers=2, batch_size=2), 5, 4)
    _assert_same(got, want)


def test_processes_hold_their_block_of_the_same_global_batches(shards):
    """Any process count gives the same global batches (what resuming on another process count
    relies on): process p's batch t is rows [p*b, (p+1)*b) of the 1-process batch t, random
    draws (flip, caption, proposal subset) included, across an epoch boundary."""
    d, _ = shards
    kw = dict(boxes="proposals", max_boxes=4)
    whole = _take(_ds(d, batch_size=6, **kw), 6)  # 6 batches of 6 = 1.5 epochs of 24
    for count in (2, 3):
        b = 6 // count
        parts = [
            _take(_ds(d, batch_size=b, shard_index=i, shard_count=count, **kw), 6)
            for i in range(count)
        ]
        for t in range(6):
            for k in whole[t]:
                np.testing.assert_array_equal(
                    np.concatenate([parts[i][t][k] for i in range(count)]),
                    whole[t][k],
                    err_msg=f"{count} processes, batch {t}, {k}",
                )


def test_process_blocks_are_disjoint_and_cover_one_epoch(shards):
    d, _ = shards
    parts = []
    for i in range(3):  # global batch 9 over 24 records: the last global batch is partial
        ds = _ds(d, shard_index=i, shard_count=3, num_epochs=1, drop_remainder=False, batch_size=3)
        parts.append(np.concatenate([b["source_index"] for b in _take_all(ds)]))
    assert [len(p) for p in parts] == [9, 9, 6]
    assert sorted(np.concatenate(parts)) == list(range(N_RECORDS))


def test_global_batch_slice_matches_its_index_formula():
    import grain

    from regionclip_jax.data.pipeline import GlobalBatchSlice

    n, block, count = 23, 3, 2
    for p in range(count):
        got = list(GlobalBatchSlice(grain.MapDataset.range(n), block, p, count))
        # Written out: global batch g holds elements [6g, 6g + 6); process p keeps [6g + 3p, 6g + 3p + 3).
        want = [e for g in range(0, n, 6) for e in range(g + 3 * p, g + 3 * p + 3) if e < n]
        assert got == want


def _take_all(ds) -> list[dict]:
    it = iter(ds)
    out = [{k: np.array(v) for k, v in b.items()} for b in it]
    it.close()
    return out


def test_damaged_records_are_skipped_with_a_warning(tmp_path, caplog):
    recs = _records(8, seed=1)
    recs[2]["image"] = recs[2]["image"][:60]  # truncated PNG (the writer would refuse it...)
    recs[5]["captions"] = []
    d = tmp_path / "bad"
    # ...so write it with the checks off, as damage after writing would look.
    with ShardWriter(d, "b", check_images=False, require_captions=False) as w:
        for r in recs:
            assert w.write(r)
    with caplog.at_level(logging.WARNING, logger="regionclip_jax.data.pipeline"):
        batches = _take_all(_ds(d, num_epochs=1, batch_size=2, drop_remainder=False))
    got = sorted(np.concatenate([b["source_index"] for b in batches]))
    assert got == [0, 1, 3, 4, 6, 7]
    assert all(b["images"].shape == (2, 96, 96, 3) for b in batches)
    text = caplog.text
    assert "skipping record 2" in text and "skipping record 5 (r5): no caption" in text
