"""Reading users' checkpoint files (`convert.torch_files`) and converted checkpoints on disk
(`convert.checkpoint`).

File readers are checked against the tensors PyTorch itself wrote (open_clip models saved with
`torch.save` / TorchScript); the Orbax round trip is checked for bit-exactness against the model
that was saved.
"""

from __future__ import annotations

import json
import sys
import zipfile

import numpy as np
import pytest

from regionclip_jax.convert.torch_files import CheckpointFormatError, load_state_dict_file

# ---------------------------------------------------------------------------------------------
# helpers


def _tiny_open_clip():
    """A tiny ModifiedResNet CLIP from open_clip with non-trivial BN statistics."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=(1, 1, 1, 1), width=8, head_width=64, image_size=64),
        text_cfg=dict(context_length=77, vocab_size=1000, width=64, heads=1, layers=1),
        quick_gelu=True,
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def _torchscript_like_openai(model, path):
    """Saves `model` the way OpenAI's `.pt` files are: a TorchScript module whose `state_dict()`
    has the plain CLIP names plus int scalars `input_resolution`, `context_length`, `vocab_size`."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            for name, p in clip.named_parameters(recurse=False):
                self.register_parameter(name, p)
            for name, child in clip.named_children():
                self.add_module(name, child)
            self.register_buffer("input_resolution", torch.tensor(64))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(1000))

        def forward(self, image):
            return self.visual(image)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Wrapper(model), torch.zeros(1, 3, 64, 64), check_trace=False)
        traced.save(str(path))


def _assert_same_tensors(loaded: dict, expected: dict):
    assert sorted(loaded) == sorted(expected)
    for k, t in expected.items():
        ref = t.detach().cpu().numpy()
        assert loaded[k].dtype == ref.dtype, k
        assert loaded[k].shape == ref.shape, k
        np.testing.assert_array_equal(loaded[k], ref, err_msg=k)


def _assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    assert "expected" in msg or "holds" in msg


# ---------------------------------------------------------------------------------------------
# PyTorch files


@pytest.fixture(scope="module")
def open_clip_model():
    return _tiny_open_clip()


@pytest.mark.torch_ref
def test_torch_save_state_dict_zip_and_legacy(open_clip_model, tmp_path):
    import torch

    sd = open_clip_model.state_dict()
    for name, kwargs in [("zip.pt", {}), ("legacy.pth", {"_use_new_zipfile_serialization": False})]:
        path = tmp_path / name
        torch.save(sd, path, **kwargs)
        _assert_same_tensors(load_state_dict_file(path), sd)


@pytest.mark.torch_ref
def test_torchscript_archive_like_openai(open_clip_model, tmp_path):
    import torch

    path = tmp_path / "RN-tiny.pt"
    _torchscript_like_openai(open_clip_model, path)
    loaded = load_state_dict_file(path)
    expected = dict(open_clip_model.state_dict())
    expected.update(
        input_resolution=torch.tensor(64),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(1000),
    )
    _assert_same_tensors(loaded, expected)


@pytest.mark.torch_ref
def test_low_precision_tensors_keep_their_dtype(tmp_path):
    import ml_dtypes
    import torch

    torch.manual_seed(1)
    sd = {
        "half": torch.randn(3, 4).half(),
        "bf16": torch.randn(5).bfloat16(),
        "idx": torch.arange(4),
    }
    torch.save(sd, tmp_path / "x.pt")
    loaded = load_state_dict_file(tmp_path / "x.pt")
    assert loaded["half"].dtype == np.float16
    np.testing.assert_array_equal(loaded["half"], sd["half"].numpy())
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16
    # Same bits as torch's bfloat16, and the same values once widened.
    np.testing.assert_array_equal(
        loaded["bf16"].view(np.int16), sd["bf16"].view(torch.int16).numpy()
    )
    np.testing.assert_array_equal(loaded["bf16"].astype(np.float32), sd["bf16"].float().numpy())
    np.testing.assert_array_equal(loaded["idx"], np.arange(4))


@pytest.mark.torch_ref
def test_wrapped_state_dicts_are_unwrapped(open_clip_model, tmp_path):
    import torch

    sd = open_clip_model.state_dict()
    # open_clip training checkpoint saved from DistributedDataParallel.
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
        tmp_path / "open_clip_epoch_3.pt",
    )
    _assert_same_tensors(load_state_dict_file(tmp_path / "open_clip_epoch_3.pt"), sd)
    # detectron2 / RegionCLIP checkpoint.
    torch.save({"model": dict(sd), "iteration": 5, "__author__": "x"}, tmp_path / "d2.pth")
    _assert_same_tensors(load_state_dict_file(tmp_path / "d2.pth"), sd)


@pytest.mark.torch_ref
def test_torch_files_that_are_not_state_dicts(tmp_path):
    import torch

    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointFormatError, match="holds a list") as err:
        load_state_dict_file(tmp_path / "list.pt")
    _assert_one_line_naming(err, tmp_path / "list.pt")

    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointFormatError, match="without tensors") as err:
        load_state_dict_file(tmp_path / "meta.pt")
    _assert_one_line_naming(err, tmp_path / "meta.pt")

    # Starts like a legacy (pickle) torch file, then garbage: only torch can tell.
    (tmp_path / "pickle_like.pt").write_bytes(b"\x80\x02garbage that starts like a pickle")
    with pytest.raises(CheckpointFormatError) as err:
        load_state_dict_file(tmp_path / "pickle_like.pt")
    _assert_one_line_naming(err, tmp_path / "pickle_like.pt")

    # A truncated download: zip magic, broken archive.
    data = (tmp_path / "list.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError) as err:
        load_state_dict_file(tmp_path / "cut.pt")
    _assert_one_line_naming(err, tmp_path / "cut.pt")


@pytest.mark.torch_ref
def test_pickled_numpy_needs_trust(tmp_path):
    import torch

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save({"model": {"w": arr}}, tmp_path / "np.pth")
    with pytest.raises(CheckpointFormatError, match="trust_pickle") as err:
        load_state_dict_file(tmp_path / "np.pth")
    assert "\n" not in str(err.value)
    loaded = load_state_dict_file(tmp_path / "np.pth", trust_pickle=True)
    np.testing.assert_array_equal(loaded["w"], arr)


# ---------------------------------------------------------------------------------------------
# Files that need no torch


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "visual.conv1.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float16),
        "logit_scale": np.asarray(4.6, np.float32),
        "token_embedding.weight": rng.normal(size=(10, 4)).astype(np.float32),
    }
    np.savez(tmp_path / "w.npz", **arrays)
    loaded = load_state_dict_file(tmp_path / "w.npz")
    assert sorted(loaded) == sorted(arrays)
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded[k], v)


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(2, np.float16),
    }
    st.save_file(arrays, str(tmp_path / "w.safetensors"))
    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert sorted(loaded) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype


@pytest.mark.parametrize(
    "name,content",
    [
        ("random.pt", np.random.default_rng(0).bytes(4096)),
        ("notes.pth", b"these are my notes, not weights\n" * 10),
        ("empty.pt", b""),
    ],
)
def test_garbage_files_raise_format_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError) as err:
        load_state_dict_file(path)
    _assert_one_line_naming(err, path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "docs.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="zip archive") as err:
        load_state_dict_file(path)
    _assert_one_line_naming(err, path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_state_dict_file(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(err.value)
    with pytest.raises(CheckpointFormatError, match="directory"):
        load_state_dict_file(tmp_path)


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "sd.pt"
    with zipfile.ZipFile(path, "w") as z:  # the shape of a torch.save zip, without torch
        z.writestr("sd/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("sd/version", "3\n")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        load_state_dict_file(path)


# ---------------------------------------------------------------------------------------------
# Converted checkpoints (Orbax + model.json)


def _tiny_config():
    from regionclip_jax.models.presets import CLIPConfig

    return CLIPConfig(
        embed_dim=32,
        image_resolution=64,
        vision_layers=(1, 1, 1, 1),
        vision_width=8,
        vision_patch_size=None,
        vocab_size=1000,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    )


@pytest.fixture(scope="module")
def jax_clip():
    """A tiny CLIP with every variable (BN statistics included) set to random values.

    Built abstractly and filled from NumPy: eager random initialisation costs ~20 s on 2 cores.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from regionclip_jax.models.clip import CLIP

    model = nnx.eval_shape(lambda: CLIP(_tiny_config(), rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    rng = np.random.default_rng(1)
    # Positive values keep BN variances valid.
    values = jax.tree.map(
        lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


def _encode_image(model, images):
    from flax import nnx

    # One compiled call instead of many eager ops (~7x faster here).
    return np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(model, images))


def _flat(model):
    from flax import nnx

    return {
        "/".join(map(str, path)): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model))
    }


def test_save_load_round_trip_is_exact(jax_clip, tmp_path, monkeypatch):
    import hashlib

    import jax
    from flax import nnx

    from regionclip_jax.convert.checkpoint import load_clip, save_clip

    src = tmp_path / "weights.pt"
    src.write_bytes(b"pretend source")
    dest = save_clip(jax_clip, tmp_path / "ckpt", source=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "weights.pt"]  # no temp dirs

    meta = json.loads((dest / "model.json").read_text())
    assert meta["model_type"] == "clip" and meta["format_version"] == 1
    assert meta["config"] == _tiny_config().to_dict()
    assert meta["preset"] is None
    assert meta["source"]["file"] == "weights.pt"
    assert meta["source"]["sha256"] == hashlib.sha256(b"pretend source").hexdigest()
    params = jax.tree.leaves(nnx.state(jax_clip, nnx.Param))
    assert meta["param_count"] == sum(int(np.prod(v.shape)) for v in params)

    monkeypatch.setitem(sys.modules, "torch", None)  # loading must not need torch
    loaded = load_clip(dest)
    a, b = _flat(jax_clip), _flat(loaded)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), k
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(_encode_image(loaded, images), _encode_image(jax_clip, images))


def test_overwrite_rules(jax_clip, tmp_path):
    from regionclip_jax.convert.checkpoint import save_clip

    dest = save_clip(jax_clip, tmp_path / "ckpt")
    first = (dest / "model.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_clip(jax_clip, dest)
    assert (dest / "model.json").read_text() == first
    save_clip(jax_clip, dest, overwrite=True, source_sha256="abc", source="x.pt")
    assert json.loads((dest / "model.json").read_text())["source"]["sha256"] == "abc"
    # Never replace a directory that is not a checkpoint, even with overwrite=True.
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a regionclip_jax checkpoint"):
        save_clip(jax_clip, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "home"]


def test_interrupted_save_leaves_nothing(jax_clip, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from regionclip_jax.convert.checkpoint import save_clip

    dest = save_clip(jax_clip, tmp_path / "ckpt")
    before = (dest / "model.json").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_clip(jax_clip, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        save_clip(jax_clip, dest, overwrite=True)
    # No partial destination, no temp dirs; the old checkpoint is intact.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (dest / "model.json").read_text() == before


def test_load_errors(jax_clip, tmp_path):
    from regionclip_jax.convert.checkpoint import load_clip, save_clip

    with pytest.raises(FileNotFoundError, match="nope"):
        load_clip(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_clip(tmp_path / "empty")

    dest = save_clip(jax_clip, tmp_path / "ckpt")
    good = json.loads((dest / "model.json").read_text())

    (dest / "model.json").write_text('{"format": "regionclip_jax.checkpoint", "form')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_clip(dest)

    (dest / "model.json").write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_clip(dest)

    # An architecture that does not match the stored arrays: the error names the variable.
    bad = {**good, "config": {**good["config"], "embed_dim": 16}}
    (dest / "model.json").write_text(json.dumps(bad))
    with pytest.raises(
        ValueError, match=r"variable \S+ has shape \(\d+(, \d+)*\) in the checkpoint"
    ):
        load_clip(dest)
