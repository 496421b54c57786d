"""eval/regions.py: zero-shot recognition of ground-truth boxes, and its accuracy table.

`region_predictions` on a few generated ShapesWorld scenes (48 x 48, resized to 64 x 64 on a
64 x 96 canvas, so boxes are scaled and the canvas is padded) with a tiny random CLIP, against a
reference built here record by record: PIL decode and bicubic resize, CLIP normalisation with the
constants typed here, zero padding, the record's boxes scaled to the canvas, region features of
the `RegionEncoder` (under nnx.jit), cosine similarity with L2-normalised class embeddings, softmax at 0.01,
argmax. Boxes of categories outside `category_map` are dropped; the last batch is incomplete.
`accuracy_table` against accuracies counted by hand on a small synthetic dict.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from flax import nnx
from helpers import TINY_CLIP
from PIL import Image

from regionclip_jax.data import shapesworld as sw
from regionclip_jax.data.shards import ShardReader
from regionclip_jax.eval.regions import accuracy_table, region_predictions
from regionclip_jax.inference.random_model import random_clip
from regionclip_jax.models import CLIPConfig
from regionclip_jax.models.region import RegionEncoder

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
IMAGE_SIZE, RESIZED, CANVAS = 48, 64, (64, 96)
NUM_VAL = 5
# ShapesWorld "shape" category ids 1..10; 9 and 10 (cross, heart) are left out, the others are
# mapped to classes in reverse order.
CATEGORY_MAP = {cid: 8 - cid for cid in range(1, 9)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions") / "sw"
    sw.generate(
        root, num_train=0, num_val=NUM_VAL, seed=0, image_size=IMAGE_SIZE, records_per_shard=3
    )
    clip = random_clip(CLIPConfig(**TINY_CLIP))
    # Class embeddings close to each other, so that the probabilities at tau = 0.01 are not all
    # one-hot and the scores carry information.
    rng = np.random.default_rng(0)
    class_emb = (rng.standard_normal((1, 32)) + 0.03 * rng.standard_normal((8, 32))) * 5.0
    return root, clip, class_emb.astype(np.float32)


def _reference(root, clip, class_emb):
    """The expected flat arrays, one record at a time (region encoder under nnx.jit)."""
    encoder = RegionEncoder(clip.visual)
    # One program for every image: the boxes are repeated to 8 slots (the features of a box do
    # not depend on the other boxes), and the first len(boxes) rows are kept.
    encode = nnx.jit(lambda enc, x, b: enc(x, b))
    text = class_emb.astype(np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    out = {k: [] for k in ("labels", "preds", "scores", "image", "boxes")}
    for index, rec in enumerate(ShardReader(root / "val")):
        keep = np.isin(rec["category_ids"], list(CATEGORY_MAP)) & ~rec["iscrowd"]
        if not keep.any():
            continue
        boxes = rec["boxes"][keep].astype(np.float32)
        with Image.open(io.BytesIO(rec["image"])) as im:
            im = im.convert("RGB").resize((RESIZED, RESIZED), Image.BICUBIC)
        x = (np.asarray(im, np.float64) / 255.0 - MEAN) / STD
        canvas = np.zeros((*CANVAS, 3), np.float32)
        canvas[:RESIZED, :RESIZED] = x
        s = RESIZED / IMAGE_SIZE
        slots = np.resize(boxes * s, (8, 4))
        feats = np.asarray(encode(encoder, canvas[None], slots[None]), np.float64)[0, : len(boxes)]
        feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
        logits = feats @ text.T / 0.01
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out["labels"].append([CATEGORY_MAP[int(c)] for c in rec["category_ids"][keep]])
        out["preds"].append(probs.argmax(-1))
        out["scores"].append(probs.max(-1))
        out["image"].append(np.full(len(boxes), index))
        out["boxes"].append(boxes)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_region_predictions_equal_the_reference(env):
    root, clip, class_emb = env
    got = region_predictions(
        clip.visual,
        class_emb,
        str(root / "val"),
        canvas=CANVAS,
        category_map=CATEGORY_MAP,
        batch_size=2,  # 5 images: the last batch holds one
        max_boxes=8,
    )
    want = _reference(root, clip, class_emb)
    n = len(want["labels"])
    # Some boxes were dropped by the category map, and several remain in every image.
    all_ids = np.concatenate([r["category_ids"] for r in ShardReader(root / "val")])
    assert 8 <= n < len(all_ids)
    assert sorted(set(got)) == ["boxes", "image", "labels", "preds", "scores"]
    for k in got:
        assert got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(got["preds"], want["preds"])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=2e-3, atol=2e-4)
    # The scores are probabilities that are not all one-hot, and more than one class is predicted.
    assert np.all((got["scores"] >= 1 / 8 - 1e-6) & (got["scores"] <= 1 + 1e-6))
    assert got["scores"].min() < 0.99
    assert len(set(got["preds"].tolist())) > 1


def test_region_predictions_of_an_empty_mapping(env):
    root, clip, class_emb = env
    # No category in the map: every box is dropped, but the images are still read.
    got = region_predictions(
        clip.visual, class_emb, str(root / "val"), canvas=CANVAS, category_map={99: 0}, batch_size=4
    )
    assert all(len(v) == 0 for v in got.values())


def test_accuracy_table_by_hand():
    preds = {
        "labels": np.array([0, 0, 1, 2, 2, 2, 3, 4]),
        "preds": np.array([0, 1, 1, 2, 0, 2, 3, 0]),
    }
    # Correct: boxes 0, 2, 3, 5, 6 -> 5 of 8.
    table = accuracy_table(preds, {"base": [0, 1], "novel": [2, 3, 4], "odd": [1, 3], "none": [7]})
    assert sorted(table) == ["all", "base", "none", "novel", "odd"]
    assert table["all"] == pytest.approx(5 / 8)
    assert table["base"] == pytest.approx(2 / 3)  # labels 0, 0, 1: boxes 0 and 2 right
    assert table["novel"] == pytest.approx(3 / 5)  # labels 2, 2, 2, 3, 4: boxes 3, 5, 6 right
    assert table["odd"] == pytest.approx(1.0)  # labels 1, 3: both right
    assert math.isnan(table["none"])  # no box of the group
