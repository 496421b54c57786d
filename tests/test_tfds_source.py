"""tfds without TensorFlow: the ShapesWorld builder (ArrayRecord) and the detection adapter.

Expected images, boxes and labels come from `shapesworld.render_scene` (the generator), not from
the builder or the adapter under test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from regionclip_jax.data import shapesworld  # noqa: E402
from regionclip_jax.data.schema import decode_record  # noqa: E402
from regionclip_jax.data.shards import ShardReader  # noqa: E402
from regionclip_jax.data.tfds_shapesworld import (  # noqa: E402
    TfdsDetectionSource,
    build_shapesworld_tfds,
)

SIZE = 32


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return build_shapesworld_tfds(
        tmp_path_factory.mktemp("tfds"), num_train=8, num_val=3, seed=5, image_size=SIZE
    )


def test_builder_writes_array_record_readable_without_tf(builder):
    files = [p.name for p in builder.data_path.iterdir()]
    assert any(".array_record" in f for f in files), files
    ds = builder.as_data_source()
    assert len(ds["train"]) == 8 and len(ds["validation"]) == 3
    # tfds.data_source reads the prepared directory by name too.
    again = tfds.data_source(
        f"shapesworld/{builder.builder_config.name}", data_dir=builder.data_dir_root
    )
    assert len(again["train"]) == 8
    config = shapesworld.ShapesWorldConfig(image_size=SIZE)
    for i in range(len(ds["train"])):
        ex = ds["train"][i]
        scene = shapesworld.render_scene(int(ex["image/id"]), seed=5, split="train", config=config)
        np.testing.assert_array_equal(ex["image"], scene.image)
        assert [c.decode() if isinstance(c, bytes) else c for c in ex["captions"]] == list(
            scene.captions
        )


def test_adapter_records_match_the_scenes(builder, tmp_path):
    data = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})["validation"]
    src = TfdsDetectionSource(data, label_offset=1, source_name="sw")
    config = shapesworld.ShapesWorldConfig(image_size=SIZE)
    for i in range(len(src)):
        index, raw = src[i]
        rec = decode_record(raw)
        scene_id = int(rec["id"].split("-")[1])
        scene = shapesworld.render_scene(scene_id, seed=5, split="val", config=config)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), scene.image)
        want = np.array([o.box for o in scene.kept], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(rec["boxes"], want, atol=1e-4)
        assert rec["category_ids"].tolist() == [
            shapesworld.SHAPES.index(o.shape) + 1 for o in scene.kept
        ]
        assert rec["captions"] == list(scene.captions)
    m = src.write_shards(str(tmp_path / "shards"))
    assert m["num_records"] == len(src)
    assert {r["id"] for r in ShardReader(tmp_path / "shards")} == {
        decode_record(src[i][1])["id"] for i in range(len(src))
    }
