"""The `regionclip-jax` command: convert PyTorch files end to end, inspect, and fail cleanly.

Converted models are checked against the open_clip model that wrote the file (image and text
embeddings), in-process and through `python -m regionclip_jax.cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from regionclip_jax import cli

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


# ---------------------------------------------------------------------------------------------
# A tiny open_clip model saved the two ways users have CLIP weights


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """(open_clip model, torch.save'd state dict path, OpenAI-style TorchScript archive path)."""
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
            if isinstance(m, torch.nn.BatchNorm2d):  # open_clip leaves them at 0 / 1
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    d = tmp_path_factory.mktemp("torch_files")
    sd_path = d / "tiny_rn.pth"
    torch.save(model.state_dict(), sd_path)

    class OpenAIStyle(torch.nn.Module):
        """Module whose state_dict has OpenAI's names, like the modules in OpenAI's `.pt` files."""

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

    jit_path = d / "tiny_rn.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(OpenAIStyle(model), torch.zeros(1, 3, 64, 64), check_trace=False).save(
            str(jit_path)
        )
    return model, sd_path, jit_path


def _inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    tokens = np.zeros((2, 77), np.int32)
    for i, n in enumerate((5, 12)):
        tokens[i, 0] = 998  # start token
        tokens[i, 1 : n - 1] = rng.integers(1, 990, n - 2)
        tokens[i, n - 1] = 999  # end token: the largest id, as CLIP's argmax pooling expects
    return images, tokens


def _check_against_open_clip(directory, model):
    import torch
    from flax import nnx

    from regionclip_jax.convert import load_clip

    ours = load_clip(directory)
    images, tokens = _inputs()
    got_img = np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(ours, images))
    got_txt = np.asarray(nnx.jit(lambda m, t: m.encode_text(t))(ours, tokens))
    with torch.no_grad():
        ref_img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_txt = model.encode_text(torch.from_numpy(tokens).long()).numpy()
    for got, ref in ((got_img, ref_img), (got_txt, ref_txt)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# convert / info


@pytest.mark.torch_ref
def test_convert_torch_save_in_process(torch_files, tmp_path, capsys):
    model, sd_path, _ = torch_files
    out = tmp_path / "ckpt"
    assert cli.main(["convert", "--input", str(sd_path), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "custom" in stdout and "ModifiedResNet layers=(1, 1, 1, 1)" in stdout
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,}" in stdout
    assert str(out.resolve()) in stdout
    _check_against_open_clip(out, model)

    meta = json.loads((out / "model.json").read_text())
    assert meta["source"]["file"] == "tiny_rn.pth"
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "tiny_rn.pth" in info and f"{n_params:,}" in info and "embed_dim: 32" in info

    # A second conversion to the same place needs --overwrite.
    assert cli.main(["convert", "-i", str(sd_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--overwrite" in err
    assert cli.main(["convert", "-i", str(sd_path), "-o", str(out), "--overwrite"]) == 0


@pytest.mark.torch_ref
def test_convert_torchscript_archive_subprocess(torch_files, tmp_path):
    model, _, jit_path = torch_files
    out = tmp_path / "ckpt"
    proc = _run(
        "-m", "regionclip_jax.cli", "convert", "--input", str(jit_path), "--output", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "Wrote" in proc.stdout
    assert "Traceback" not in proc.stderr
    _check_against_open_clip(out, model)


def test_garbage_file_exits_2_without_traceback(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    proc = _run(
        "-m", "regionclip_jax.cli", "convert", "--input", str(path), "--output", str(tmp_path / "o")
    )
    assert proc.returncode == 2
    error_lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(error_lines) == 1
    assert error_lines[0].startswith("regionclip-jax convert: error: ")
    assert str(path) in error_lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_debug_flag_shows_traceback(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not weights")
    for argv in (
        ["--debug", "convert", "-i", str(path), "-o", str(tmp_path / "o")],
        ["convert", "--debug", "-i", str(path), "-o", str(tmp_path / "o")],
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "CheckpointFormatError" in err


def test_bad_inputs_exit_2(tmp_path, capsys):
    # Missing input file.
    assert cli.main(["convert", "-i", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nope.pt" in err and "Traceback" not in err
    # A readable file that is not a CLIP state dict: the conversion's ValueError, on one line.
    np.savez(tmp_path / "other.npz", **{"head.weight": np.zeros((2, 2), np.float32)})
    assert cli.main(["convert", "-i", str(tmp_path / "other.npz"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert err.startswith("regionclip-jax convert: error: ") and "visual" in err
    # info on something that is not a checkpoint.
    assert cli.main(["info", str(tmp_path)]) == 2
    assert "model.json" in capsys.readouterr().err
    # No subcommand: usage on stderr.
    assert cli.main([]) == 2
    assert not (tmp_path / "o").exists()


def test_describe_names_presets():
    from regionclip_jax.models.presets import PRESETS

    for name, config in PRESETS.items():
        assert cli._describe(config) == name
    tweaked = PRESETS["RN50"].replace(image_resolution=448)
    assert cli._describe(tweaked).startswith("custom")


def test_help_is_cheap():
    # --help must not import JAX or torch (they take seconds).
    code = textwrap.dedent(
        """
        import sys
        from regionclip_jax import cli
        cli.build_parser().format_help()
        heavy = [m for m in ("jax", "torch", "flax") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    proc = _run("-m", "regionclip_jax.cli", "--help")
    assert proc.returncode == 0 and "convert" in proc.stdout and "info" in proc.stdout


def test_main_py_prints_config_and_stops(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        textwrap.dedent(
            """
            import ml_collections

            def get_config(arg=None):
                c = ml_collections.ConfigDict()
                c.learning_rate = 0.1
                c.variant = arg
                return c
            """
        )
    )
    proc = _run(
        "-m",
        "regionclip_jax.main",
        f"--config={cfg}:runlocal",
        f"--workdir={tmp_path / 'w'}",
        "--config.learning_rate=0.5",
    )
    assert proc.returncode == 1
    assert "learning_rate: 0.5" in proc.stdout and "variant: runlocal" in proc.stdout
    assert "has no `mode`" in proc.stderr


def test_init_random_writes_a_loadable_checkpoint_and_rejects_unknown_presets(tmp_path, capsys):
    from regionclip_jax.convert.checkpoint import load_clip, read_metadata
    from regionclip_jax.models.presets import get_preset

    out = tmp_path / "rn50"
    assert cli.main(["init-random", "--preset", "RN50", "--output", str(out)]) == 0
    assert "RANDOM" in capsys.readouterr().out
    assert read_metadata(out)["config"] == get_preset("RN50").to_dict()
    model = load_clip(out)
    assert model.config == get_preset("RN50")
    # Refuses to overwrite, and names the valid presets for a typo.
    assert cli.main(["init-random", "--preset", "RN50", "--output", str(out)]) == 2
    assert cli.main(["init-random", "--preset", "RN99", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "RN99" in err and "RN50x4" in err
