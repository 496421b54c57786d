"""safetensors both ways: `regionclip-jax convert` reads them, `regionclip-jax export-weights` writes.

The reference is open_clip itself: a random open_clip model's state dict goes out through
`safetensors.torch`, in through `convert`, back out through `export-weights` and into a fresh
open_clip model with `load_state_dict(strict=True)`; every tensor must come back bit for bit.
The torch-free tests check against the bytes of files written with `safetensors.numpy` (and one
written by hand).
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_numpy
from helpers import TINY_CLIP

from regionclip_jax.cli import main
from regionclip_jax.convert.torch_files import CheckpointFormatError, load_state_dict_file

# Tiny open_clip configs: (embed_dim, vision_cfg, text_cfg). Text width 64 gives OpenAI's head
# rule (width // 64) the reference's single head; ViT width 128 -> 2 heads on both sides.
_TEXT = dict(width=64, heads=1, layers=1, vocab_size=300, context_length=16)
OPEN_CLIP_CONFIGS = {
    "resnet": (32, dict(layers=[1, 1, 1, 1], width=16, image_size=64), _TEXT),
    "vit": (32, dict(layers=1, width=128, patch_size=16, image_size=64), _TEXT),
}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _convert(src, dest, capsys) -> None:
    code, _, err = _cli(["convert", "--input", str(src), "--output", str(dest)], capsys)
    assert code == 0, err


def _export(ckpt, out, capsys, *extra: str) -> None:
    code, _, err = _cli(
        ["export-weights", "--checkpoint", str(ckpt), "--out", str(out), *extra], capsys
    )
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# Through open_clip (leg 1: torch)


@pytest.fixture(scope="module")
def open_clip_converted(tmp_path_factory):
    """`get(name) -> (original open_clip model, its converted checkpoint dir, tmp dir)`, each
    config built and converted once per module."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            from safetensors.torch import save_file
            from torch_reference import open_clip_model

            tmp = tmp_path_factory.mktemp(f"st_{name}")
            model = open_clip_model(*OPEN_CLIP_CONFIGS[name], seed=0)
            # The ViT file gets no extension: recognised by content alone.
            src = tmp / ("open_clip_model.safetensors" if name == "resnet" else "weights")
            save_file(model.state_dict(), str(src), metadata={"format": "pt"})
            assert main(["convert", "--input", str(src), "--output", str(tmp / "ckpt")]) == 0
            cache[name] = (model, tmp / "ckpt", tmp)
        return cache[name]

    return get


def _encode(model, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=g)
    tokens = torch.randint(0, _TEXT["vocab_size"], (2, _TEXT["context_length"]), generator=g)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.torch_ref
@pytest.mark.parametrize("name", sorted(OPEN_CLIP_CONFIGS))
def test_open_clip_round_trip_is_exact(open_clip_converted, name, capsys):
    import torch
    from safetensors.torch import load_file
    from torch_reference import open_clip_model

    original, ckpt, tmp = open_clip_converted(name)
    out = tmp / "exported.safetensors"
    _export(ckpt, out, capsys, "--format", "safetensors")

    fresh = open_clip_model(*OPEN_CLIP_CONFIGS[name], seed=5)
    ref = original.state_dict()
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in ref.items())
    loaded = load_file(str(out))
    fresh.load_state_dict(loaded, strict=True)
    got = fresh.state_dict()
    assert sorted(loaded) == sorted(ref)
    for key, value in ref.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    for a, b in zip(_encode(original), _encode(fresh), strict=True):
        assert torch.equal(a, b)

    from safetensors import safe_open

    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["naming"] == "openai"
    arch = json.loads(meta["architecture"])
    assert arch["embed_dim"] == 32 and arch["transformer_width"] == _TEXT["width"]


@pytest.mark.torch_ref
def test_bfloat16_export_and_read_back(open_clip_converted, capsys):
    import torch
    from safetensors.torch import load_file

    original, ckpt, tmp = open_clip_converted("resnet")
    out = tmp / "bf16.safetensors"
    _export(ckpt, out, capsys, "--dtype", "bfloat16")
    loaded = load_file(str(out))
    ref = original.to(torch.float32).state_dict()
    for key, value in ref.items():
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert loaded[key].dtype == want.dtype, key
        assert torch.equal(loaded[key], want), key

    # ... and in again: the bfloat16 file converts to exactly the widened bfloat16 values.
    _convert(out, tmp / "ckpt_bf16", capsys)
    back = tmp / "back.safetensors"
    _export(tmp / "ckpt_bf16", back, capsys)
    again = load_file(str(back))
    for key, value in ref.items():
        want = value.to(torch.bfloat16).float() if value.is_floating_point() else value
        assert torch.equal(again[key], want), key


@pytest.mark.torch_ref
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reads_half_precision_bits(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t_dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 3, generator=g).to(t_dtype), "n": torch.tensor(7)}
    save_file(tensors, str(tmp_path / "h.safetensors"))
    loaded = load_state_dict_file(tmp_path / "h.safetensors")
    want_np = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    assert loaded["w"].dtype == want_np and loaded["w"].shape == (5, 3)
    bits = tensors["w"].view(torch.int16).numpy()
    np.testing.assert_array_equal(loaded["w"].view(np.int16), bits)
    assert loaded["n"].dtype == np.int64 and int(loaded["n"]) == 7


# ---------------------------------------------------------------------------------------------
# Without torch (both legs)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """(the tiny random model, its OpenAI-named arrays, a safetensors file of them named without
    extension, its converted checkpoint)."""
    from regionclip_jax.convert.state_dict import clip_to_state_dict
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models.presets import CLIPConfig

    tmp = tmp_path_factory.mktemp("st_tiny")
    model = random_clip(CLIPConfig(**TINY_CLIP), seed=3)
    sd = clip_to_state_dict(model)
    src = tmp / "tiny.weights"
    st_numpy.save_file(sd, str(src))
    assert main(["convert", "--input", str(src), "--output", str(tmp / "ckpt")]) == 0
    return model, sd, src, tmp / "ckpt"


def test_convert_numpy_safetensors_gives_the_model(tiny_file):
    import jax
    from flax import nnx

    from regionclip_jax.convert.checkpoint import load_clip

    model, _, _, ckpt = tiny_file
    loaded = nnx.to_flat_state(nnx.state(load_clip(ckpt)))
    want = nnx.to_flat_state(nnx.state(model))
    assert [p for p, _ in loaded] == [p for p, _ in want]
    for (path, a), (_, b) in zip(loaded, want, strict=True):
        a, b = jax.device_get(a.get_value()), jax.device_get(b.get_value())
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_reproduces_the_file(tiny_file, tmp_path, capsys, fmt):
    _, sd, src, ckpt = tiny_file
    out = tmp_path / f"out.{fmt}"
    _export(ckpt, out, capsys)  # the format follows the extension
    if fmt == "safetensors":
        got = st_numpy.load_file(str(out))
    else:
        with np.load(out, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
    bn = [k for k in sd if k.endswith(".running_var")]
    assert bn  # the tiny model is a ModifiedResNet
    extra = {k[: -len("running_var")] + "num_batches_tracked" for k in bn}
    assert set(got) == set(sd) | extra
    for key in extra:
        assert got[key].dtype == np.int64 and got[key].shape == () and int(got[key]) == 0
    for key, value in sd.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_export_as_stored_bfloat16_and_cast(tmp_path, capsys):
    """A checkpoint holding bfloat16 parameters exports them as bfloat16 (BN statistics stay
    float32, as stored); --dtype float16 casts all floats; npz refuses bfloat16."""
    import jax.numpy as jnp

    from regionclip_jax.convert.checkpoint import save_clip
    from regionclip_jax.convert.state_dict import clip_from_state_dict, clip_to_state_dict
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models.presets import CLIPConfig

    rng = np.random.default_rng(0)
    # Random float32 arrays in the tiny model's PyTorch names and shapes.
    shapes = {
        k: v.shape for k, v in clip_to_state_dict(random_clip(CLIPConfig(**TINY_CLIP))).items()
    }
    sd = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = np.abs(sd[k]) + 0.5
    model = clip_from_state_dict(sd, param_dtype=jnp.bfloat16)
    ckpt = save_clip(model, tmp_path / "ckpt")

    _export(ckpt, tmp_path / "a.safetensors", capsys)
    got = st_numpy.load_file(str(tmp_path / "a.safetensors"))
    for key, value in sd.items():
        stat = key.endswith(("running_mean", "running_var"))
        want = value if stat else value.astype(ml_dtypes.bfloat16)
        assert got[key].dtype == want.dtype, key
        bits = f"u{want.dtype.itemsize}"
        np.testing.assert_array_equal(got[key].view(bits), want.view(bits), err_msg=key)

    _export(ckpt, tmp_path / "b.safetensors", capsys, "--dtype", "float16")
    got = st_numpy.load_file(str(tmp_path / "b.safetensors"))
    for key, value in sd.items():
        stat = key.endswith(("running_mean", "running_var"))
        want = (value if stat else value.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(
            np.float16
        )
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    assert got["visual.bn1.num_batches_tracked"].dtype == np.int64

    code, _, err = _cli(["export-weights", "-c", str(ckpt), "-o", str(tmp_path / "c.npz")], capsys)
    assert code == 2 and "bfloat16" in err and err.count("\n") == 1


def test_regionclip_checkpoint_exports_detectron2_names(tiny_file, tmp_path, capsys):
    from regionclip_jax.convert.regionclip import (
        RegionCLIPWeights,
        load_regionclip_file,
        save_regionclip,
    )

    model, sd, _, _ = tiny_file
    rng = np.random.default_rng(1)
    d = TINY_CLIP["embed_dim"]
    heads = {
        "cls_score.weight": rng.normal(size=(3, d)).astype(np.float32),
        "bbox_pred.weight": rng.normal(size=(4, d)).astype(np.float32),
        "bbox_pred.bias": rng.normal(size=(4,)).astype(np.float32),
    }
    ckpt = save_regionclip(RegionCLIPWeights(clip=model, heads=heads), tmp_path / "ckpt")
    out = tmp_path / "regionclip.safetensors"
    code, stdout, err = _cli(["export-weights", "-c", str(ckpt), "-o", str(out)], capsys)
    assert code == 0, err
    assert "RegionCLIP" in stdout
    got = st_numpy.load_file(str(out))
    want = {f"roi_heads.box_predictor.{k}": v for k, v in heads.items()}
    for key, value in sd.items():
        if key.startswith("visual."):
            want["backbone." + key[len("visual.") :]] = value
        elif key != "logit_scale":
            want["lang_encoder." + key] = value
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # The detectron2 reader takes it back.
    back = load_regionclip_file(out)
    for key, value in heads.items():
        np.testing.assert_array_equal(back.heads[key], value)

    # --naming openai drops the heads and writes the CLIP state dict.
    _export(ckpt, tmp_path / "clip.safetensors", capsys, "--naming", "openai")
    assert "logit_scale" in st_numpy.load_file(str(tmp_path / "clip.safetensors"))


def test_header_length_that_looks_like_a_pickle(tmp_path):
    """A header of 640 bytes is stored as 80 02 00 ..., the first two bytes of a protocol-2
    pickle: it must still be read as safetensors (file written by hand, per the format spec)."""
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, value.nbytes]}}
    raw = json.dumps(header).encode().ljust(640, b" ")
    path = tmp_path / "w.bin"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + value.tobytes())
    assert path.read_bytes()[:2] == b"\x80\x02"
    np.testing.assert_array_equal(st_numpy.load_file(str(path))["x"], value)  # a valid file
    loaded = load_state_dict_file(path)
    np.testing.assert_array_equal(loaded["x"], value)


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("cut.safetensors", lambda b: b[:-5], "truncated: its tensors need"),
        ("cut", lambda b: b[:-5], "truncated: its tensors need"),  # no extension
        ("head.safetensors", lambda b: b[:20], "truncated: its header declares"),
        ("junk.safetensors", lambda b: b[:8] + b"{garbage" + b[16:], "header is not JSON"),
        ("short.safetensors", lambda b: b[:5], "shorter than the 8-byte header length"),
        ("random.safetensors", lambda b: bytes(range(256)) * 4, "over the format's 100 MB"),
    ],
)
def test_damaged_files_give_one_line_errors(tmp_path, capsys, name, damage, message):
    good = tmp_path / "good.safetensors"
    st_numpy.save_file({"a": np.ones((4, 4), np.float32)}, str(good))
    bad = tmp_path / name
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_state_dict_file(bad)
    assert "\n" not in str(info.value)
    code, _, err = _cli(["convert", "-i", str(bad), "-o", str(tmp_path / "ckpt")], capsys)
    assert code == 2
    assert err.startswith("regionclip-jax convert: error: ") and err.count("\n") == 1


def test_export_errors(tiny_file, tmp_path, capsys):
    _, _, _, ckpt = tiny_file
    code, _, err = _cli(["export-weights", "-c", str(tmp_path), "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "Not a regionclip_jax checkpoint" in err and err.count("\n") == 1

    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = _cli(["export-weights", "-c", str(ckpt), "-o", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    _export(ckpt, out, capsys, "--overwrite")
    assert "logit_scale" in st_numpy.load_file(str(out))
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]

    code, _, err = _cli(["export-weights", "-c", str(ckpt), "-o", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err
    code, _, err = _cli(
        [
            "export-weights",
            "-c",
            str(ckpt),
            "-o",
            str(tmp_path / "r.safetensors"),
            "--naming",
            "regionclip",
        ],
        capsys,
    )
    assert code == 2 and "no RegionCLIP heads" in err
