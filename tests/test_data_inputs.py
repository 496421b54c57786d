"""Detection data resolution: a user's COCO-format json with one path, and clear errors for bad
jsons (missing fields, unknown category ids, no images, no box of a training class)."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from regionclip_jax import config as config_lib
from regionclip_jax.data import inputs
from regionclip_jax.data.convert_detection import AnnotationError


def _write_dataset(root, *, n_images=4, categories=None, annotations=None, images=None):
    os.makedirs(root / "imgs", exist_ok=True)
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(n_images):
        name = f"imgs/{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(root / name)
        imgs.append({"id": 10 + i, "file_name": name, "height": 40, "width": 60})
    cats = categories or [
        {"id": 3, "name": "golden retriever", "split": "base"},
        {"id": 7, "name": "tabby_cat", "split": "novel"},
    ]
    anns = annotations
    if anns is None:
        anns = [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [1, 2, 30, 30], "iscrowd": 0},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        ]
    data = {"images": imgs if images is None else images, "annotations": anns, "categories": cats}
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


def _config(json_path: str) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.mode = "detect"
    c.detect.train_json = c.detect.val_json = json_path
    c.detect.proposals = "gt"
    c.detect.eval_only = False
    return c


def test_user_json_with_one_path(tmp_path):
    path = _write_dataset(tmp_path)
    data = inputs.prepare(_config(path), str(tmp_path / "work"))
    # Categories keep the json's split; names become prompt words.
    assert data.train_ids == [3] and data.test_ids == [3, 7]
    assert data.train_names == ["golden retriever"] and data.test_names[1] == "tabby cat"
    assert os.path.exists(os.path.join(data.train, "manifest.json"))
    # Validation shards keep every image (empty ones too); training skips images without boxes.
    from regionclip_jax.data.pipeline import ShardSource
    from regionclip_jax.data.shards import open_shards

    val = ShardSource(open_shards(data.val))
    train = ShardSource(open_shards(data.train))
    assert len(val) == 4 and len(train) == 3
    ids = inputs.record_image_ids(val, data.val_json)
    assert sorted(ids.tolist()) == [10, 11, 12, 13]
    assert inputs.check_training_boxes(train, data.train_category_map(), "t") == 2
    # A second run reuses the shards; a changed json is refused rather than silently mixed.
    again = inputs.prepare(_config(path), str(tmp_path / "work"))
    assert again.train == data.train
    os.utime(path, (1, 1))
    with pytest.raises(AnnotationError, match="different version"):
        inputs.prepare(_config(path), str(tmp_path / "work"))


def test_categories_without_split_train_everything(tmp_path):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    anns = [{"id": 1, "image_id": 10, "category_id": 2, "bbox": [1, 1, 5, 5]}]
    path = _write_dataset(tmp_path, categories=cats, annotations=anns)
    data = inputs.prepare(_config(path), str(tmp_path / "w"))
    assert data.train_ids == data.test_ids == [1, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(annotations=[{"id": 1, "image_id": 10, "bbox": [1, 1, 5, 5]}]), "category_id"),
        (
            dict(annotations=[{"id": 1, "image_id": 10, "category_id": 99, "bbox": [1, 1, 5, 5]}]),
            "99|unknown|not in",
        ),
        (dict(images=[]), "no images"),
        (dict(annotations=[{"id": 1, "image_id": 10, "category_id": 3}]), "bbox"),
    ],
)
def test_malformed_json_names_the_problem(tmp_path, change, message):
    path = _write_dataset(tmp_path, **change)
    with pytest.raises(AnnotationError, match=message):
        inputs.prepare(_config(path), str(tmp_path / "w"))


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid json"):
        inputs.prepare(_config(str(bad)), str(tmp_path / "w"))
    with pytest.raises(AnnotationError, match="no such file"):
        inputs.prepare(_config(str(tmp_path / "none.json")), str(tmp_path / "w"))


def test_no_box_of_a_training_class(tmp_path):
    anns = [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 1, 5, 5]}]
    path = _write_dataset(tmp_path, annotations=anns)
    data = inputs.prepare(_config(path), str(tmp_path / "w"))
    from regionclip_jax.data.pipeline import ShardSource
    from regionclip_jax.data.shards import open_shards

    with pytest.raises(AnnotationError, match="no training image has a box"):
        inputs.check_training_boxes(
            ShardSource(open_shards(data.train)), data.train_category_map(), data.train
        )


def test_mask_on_without_masks_in_the_data_is_refused(tmp_path):
    from regionclip_jax.data.pipeline import ShardSource
    from regionclip_jax.data.shards import open_shards

    # No `segmentation` in the json: the shards carry no masks, and mask_on would train nothing.
    path = _write_dataset(tmp_path / "plain")
    data = inputs.prepare(_config(path), str(tmp_path / "w1"))
    with pytest.raises(AnnotationError, match="mask_on is set but no training record carries"):
        inputs.check_training_masks(ShardSource(open_shards(data.train)), data.train)

    # The same json with a polygon on one training box: that record counts.
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 10], "iscrowd": 0,
         "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},
        {"id": 3, "image_id": 12, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
    ]  # fmt: skip
    path = _write_dataset(tmp_path / "seg", annotations=anns)
    data = inputs.prepare(_config(path), str(tmp_path / "w2"))
    n = inputs.check_training_masks(ShardSource(open_shards(data.train)), data.train)
    assert n == 1
