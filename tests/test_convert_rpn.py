"""convert/rpn.py: the RPN file format (rpn.json + params.npz) read back by its loaders.

A tiny CLIP-res4 RPN with random weights is exported by `tiny_rpn.export_random_clip_rpn`:
  - `load_rpn_arch` (from the workdir or its export/ dir) returns the architecture written to
    rpn.json with the given test-time settings (and the kind's default pre-NMS top-k for None);
  - `load_rpn_weights` returns exactly the arrays of params.npz, under the names they carry;
  - `load_offline_rpn` on a batch of two uint8 canvases of different image sizes equals the
    in-memory RPN on float canvases (test_inference_proposals covers single images through the
    recognizer's preprocessing);
  - errors: nothing at the path, a directory without rpn.json, a file that is not an RPN, an
    rpn.json without an architecture field, weights that do not fit the architecture.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from tiny_rpn import TINY_CLIP, export_random_clip_rpn

from regionclip_jax.convert.rpn import load_offline_rpn, load_rpn_arch, load_rpn_weights

SETTINGS = dict(pre_nms_topk=150, post_nms_topk=30, nms_thresh=0.6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("rpn_work")
    reference = export_random_clip_rpn(work, **SETTINGS)
    return work, reference


def _npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return dict(z)


def _names(tree) -> dict[str, np.ndarray]:
    """Leaf name -> array, names built from the key paths here ('/'-joined dict keys)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        assert all(isinstance(k, jax.tree_util.DictKey) for k in path), path
        out["/".join(str(k.key) for k in path)] = np.asarray(leaf)
    return out


@pytest.mark.parametrize("where", ["workdir", "export"])
def test_load_rpn_arch_has_the_file_and_the_given_settings(exported, where):
    work, _ = exported
    path = work if where == "workdir" else work / "export"
    written = json.loads((work / "export" / "rpn.json").read_text())
    arch = load_rpn_arch(path, **SETTINGS)
    assert arch["kind"] == "clip"
    assert arch["anchor_sizes"] == [16.0, 32.0, 64.0]
    assert arch["aspect_ratios"] == [0.5, 1.0, 2.0]
    assert arch["freeze_at"] == 2
    assert arch["clip_config"]["vision_width"] == TINY_CLIP["vision_width"]
    # The given test-time settings replace the exported ones (6000 / 1000 / 0.9 in the file).
    assert (written["pre_nms_topk"], written["post_nms_topk"], written["nms_thresh"]) == (
        6000,
        1000,
        0.9,
    )
    assert (arch["pre_nms_topk"], arch["post_nms_topk"], arch["nms_thresh"]) == (150, 30, 0.6)
    assert isinstance(arch["pre_nms_topk"], int) and isinstance(arch["nms_thresh"], float)
    assert os.path.samefile(arch["weights"], work / "export" / "params.npz")
    # Every other field is the file's.
    for k, v in written.items():
        if k not in SETTINGS:
            assert arch[k] == v, k
    # pre_nms_topk None: the C4 / CLIP-res4 detectron2 test default.
    default = load_rpn_arch(path, pre_nms_topk=None, post_nms_topk=7, nms_thresh=0.5)
    assert (default["pre_nms_topk"], default["post_nms_topk"], default["nms_thresh"]) == (
        6000,
        7,
        0.5,
    )


def test_load_rpn_weights_are_the_exported_arrays(exported):
    work, _ = exported
    arch = load_rpn_arch(work, **SETTINGS)
    params, rest = load_rpn_weights(arch)
    flat = _npz(work / "export" / "params.npz")
    got = {f"p/{k}": v for k, v in _names(params).items()}
    got.update({f"r/{k}": v for k, v in _names(rest).items()})
    assert sorted(got) == sorted(flat)
    assert any(k.startswith("r/") for k in flat) and len(flat) > 20
    for k, v in flat.items():
        assert got[k].dtype == np.float32, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_load_offline_rpn_on_a_batch_of_uint8_canvases(exported):
    work, reference = exported
    arch, propose = load_offline_rpn(work / "export", **SETTINGS)
    assert (arch["pre_nms_topk"], arch["post_nms_topk"], arch["nms_thresh"]) == (150, 30, 0.6)
    rng = np.random.default_rng(0)
    canvas = np.zeros((2, 64, 96, 3), np.uint8)
    hw = np.asarray([[64, 90], [48, 96]], np.int32)
    for i, (h, w) in enumerate(hw):
        canvas[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
    boxes, logits, valid = (np.asarray(x) for x in propose(canvas, hw))
    rb, rl, rv = (np.asarray(x) for x in reference(canvas.astype(np.float32), hw))
    assert boxes.shape == (2, 30, 4) and logits.shape == (2, 30) and valid.shape == (2, 30)
    np.testing.assert_array_equal(valid, rv)
    assert valid.sum(1).min() >= 5
    np.testing.assert_allclose(logits[valid], rl[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(boxes[valid], rb[valid], rtol=1e-4, atol=1e-3)
    # Each image's proposals lie inside that image, and the two images' proposals differ.
    for i, (h, w) in enumerate(hw):
        b = boxes[i][valid[i]]
        assert np.all(b >= -1e-3) and np.all(b[:, [2, 3]] <= [w + 1e-3, h + 1e-3])
    assert not np.allclose(boxes[0, :5], boxes[1, :5])


def test_missing_paths(tmp_path):
    missing = tmp_path / "no_such_rpn"
    with pytest.raises(FileNotFoundError, match="no_such_rpn"):
        load_rpn_arch(missing, name="detect.rpn_init", **SETTINGS)
    with pytest.raises(FileNotFoundError, match=r"detect\.rpn_init .*no_such_rpn"):
        load_rpn_arch(missing, name="detect.rpn_init", **SETTINGS)
    with pytest.raises(FileNotFoundError, match=r"no_such_rpn.*does not exist"):
        load_offline_rpn(missing, **SETTINGS)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    for load in (load_rpn_arch, load_offline_rpn):
        with pytest.raises(FileNotFoundError, match="rpn.json"):
            load(empty, **SETTINGS)


def test_files_that_are_not_rpns(exported, tmp_path):
    work, _ = exported
    np.savez(tmp_path / "not_rpn.npz", weight=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"not_rpn\.npz.*is not a usable RPN"):
        load_offline_rpn(tmp_path / "not_rpn.npz", **SETTINGS)

    # rpn.json without an architecture field.
    broken = tmp_path / "no_kind"
    shutil.copytree(work / "export", broken)
    spec = json.loads((broken / "rpn.json").read_text())
    del spec["kind"]
    (broken / "rpn.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"no_kind.*lacks 'kind'"):
        load_offline_rpn(broken, **SETTINGS)

    # Weights that do not fit the architecture: one array missing, one of another shape.
    flat = _npz(work / "export" / "params.npz")
    for name, change in (("missing", "drop"), ("reshaped", "shape")):
        d = tmp_path / name
        shutil.copytree(work / "export", d)
        key = sorted(k for k in flat if k.startswith("p/") and flat[k].ndim >= 2)[0]
        bad = dict(flat)
        if change == "drop":
            del bad[key]
            want = f"no weights for {key[2:]}"
        else:
            bad[key] = np.zeros((*flat[key].shape[:-1], flat[key].shape[-1] + 1), np.float32)
            want = f"{key[2:]} has shape"
        np.savez(d / "params.npz", **bad)
        with pytest.raises(ValueError, match=want):
            load_rpn_weights(load_rpn_arch(d, **SETTINGS))
        with pytest.raises(ValueError, match="is not a usable RPN"):
            load_offline_rpn(d, **SETTINGS)
