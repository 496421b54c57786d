"""Converted checkpoints back out: PyTorch-named weight files for open_clip, OpenAI CLIP, detectron2.

`export_weights(checkpoint_dir, out_path)` reads a checkpoint directory written by
`regionclip-jax convert` / `init-random` / `convert-regionclip` (or `save_clip` / `save_regionclip`)
and writes one flat `{name: tensor}` file in PyTorch layout:

  naming "openai"      the OpenAI / open_clip CLIP state dict (`convert.state_dict.clip_to_state_dict`:
                       `visual.*`, `transformer.*`, `token_embedding.weight`, `positional_embedding`,
                       `ln_final.*`, `text_projection`, `logit_scale`; conv weights [O, I, kh, kw],
                       Linear weights [out, in], `attn.in_proj_weight` [3W, W]), plus an int64 0-d
                       `num_batches_tracked` beside every BatchNorm (ModifiedResNet), as a freshly
                       built `torch.nn.BatchNorm2d` holds: the file is a complete state dict for
                       `open_clip.model.CLIP.load_state_dict(sd, strict=True)` (the same names as
                       open_clip's `open_clip_model.safetensors` of the OpenAI architectures).
                       OpenAI's `.pt` files also carry int64 scalars `input_resolution`,
                       `context_length`, `vocab_size`; they are left out because open_clip's
                       strict loading rejects them and OpenAI's `build_model` reads the shapes.
  naming "regionclip"  RegionCLIP's detectron2 names (`convert.regionclip.regionclip_to_state_dict`:
                       `backbone.*`, `lang_encoder.*`, `roi_heads.box_predictor.*`,
                       `roi_heads.mask_head.*`; no `logit_scale`), for checkpoints converted from a
                       RegionCLIP detector (they keep its heads). `regionclip-jax convert-regionclip`
                       reads such a file back.
  naming "auto"        (default) "regionclip" when the checkpoint holds RegionCLIP heads
                       (`model.json` has a `regionclip` entry naming a heads or mask-head file),
                       else "openai".

Formats: safetensors (default; `safetensors.torch.load_file` / `safetensors.numpy.load_file`
read it; its header metadata holds `format: pt`, `architecture` (the `CLIPConfig` as JSON),
`preset`, `naming`, `source` (JSON of `model.json`'s source entry) and `regionclip_jax_version`)
or npz (`np.savez`, no metadata, no bfloat16). dtype: None keeps each variable's stored dtype (the
Orbax dtype: float32 from `convert`; BatchNorm statistics are always float32); "float32",
"float16" or "bfloat16" casts every floating tensor, BN statistics included, as
`torch_model.to(dtype)` does; integer tensors stay int64.

The file is written to a temporary sibling and moved into place with `os.replace`, so `out_path`
holds the old file or the complete new one, never a partial write. torch is never imported.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from regionclip_jax.convert.checkpoint import PARAMS_DIR, read_metadata

FORMATS = ("safetensors", "npz")
NAMINGS = ("auto", "openai", "regionclip")
DTYPES: dict[str, Any] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def resolve_naming(checkpoint_dir: str | os.PathLike, naming: str = "auto") -> str:
    """ "openai" or "regionclip": the naming `export_weights(..., naming=naming)` writes.

    Raises:
      FileNotFoundError / ValueError: as `read_metadata` (not a checkpoint directory).
      ValueError: an unknown `naming`, or "regionclip" for a checkpoint without RegionCLIP heads.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {', '.join(NAMINGS)}, got {naming!r}")
    meta = read_metadata(checkpoint_dir)
    info = meta.get("regionclip") or {}
    has_heads = bool(info.get("heads_file") or info.get("mask_head_file"))
    if naming == "auto":
        return "regionclip" if has_heads else "openai"
    if naming == "regionclip" and not has_heads:
        raise ValueError(
            f"{checkpoint_dir} holds no RegionCLIP heads (no 'regionclip' entry with a heads file "
            "in model.json); export it with naming 'openai'"
        )
    return naming


def export_weights(
    checkpoint_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    format: str = "safetensors",
    dtype: str | None = None,
    naming: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Writes a converted checkpoint's weights as one PyTorch-named, PyTorch-layout file.

    Args:
      checkpoint_dir: a regionclip_jax checkpoint directory (with `model.json`).
      out_path: the file to write; its parent directories are created.
      format: "safetensors" or "npz".
      dtype: None (each variable as stored), "float32", "float16" or "bfloat16" (floating tensors
        cast with round-to-nearest-even, as torch's `.to(dtype)`).
      naming: "auto", "openai" (open_clip / OpenAI CLIP) or "regionclip" (detectron2), see the
        module docstring.
      overwrite: replace an existing file at `out_path`.

    Returns:
      The absolute path written.

    Raises:
      FileNotFoundError, ValueError: `checkpoint_dir` is not a checkpoint (no or bad `model.json`,
        not a CLIP), or an unknown format / dtype / naming, or bfloat16 with npz.
      FileExistsError: `out_path` exists and `overwrite` is False.
      IsADirectoryError: `out_path` is a directory.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    if format == "npz" and dtype == "bfloat16":
        raise ValueError(
            "an .npz archive cannot hold bfloat16 (NumPy has no such dtype); use format "
            "safetensors or dtype float16/float32"
        )
    directory = Path(checkpoint_dir).expanduser().resolve()
    meta = read_metadata(directory)
    if meta["model_type"] != "clip":
        raise ValueError(f"{directory} holds a {meta['model_type']!r} model, not 'clip'")
    naming = resolve_naming(directory, naming)
    out = _check_out(out_path, overwrite=overwrite)

    # The stored parameter dtype: float32 covers bfloat16/float16 exactly, but "as stored" writes
    # what the checkpoint holds.
    stored = _stored_param_dtype(directory / meta.get("params_dir", PARAMS_DIR))
    if stored == np.dtype(np.float16) or stored == DTYPES["bfloat16"]:
        param_dtype: Any = stored
    else:
        param_dtype = np.float32
    if naming == "regionclip":
        # lazy: jax/flax (seconds to import); argument errors above come without them
        from regionclip_jax.convert.regionclip import load_regionclip, regionclip_to_state_dict

        weights = load_regionclip(directory, param_dtype=param_dtype)
        state_dict = regionclip_to_state_dict(weights)
    else:
        # lazy: as above
        from regionclip_jax.convert.checkpoint import load_clip
        from regionclip_jax.convert.state_dict import clip_to_state_dict

        state_dict = _with_num_batches_tracked(
            clip_to_state_dict(load_clip(directory, param_dtype=param_dtype))
        )
    if format == "npz" and any(v.dtype == DTYPES["bfloat16"] for v in state_dict.values()):
        raise ValueError(
            f"{directory} stores bfloat16 parameters, which an .npz archive cannot hold; use "
            "format safetensors or dtype float16/float32"
        )
    if dtype is not None:
        target = DTYPES[dtype]
        state_dict = {
            k: v.astype(target) if _is_float(v.dtype) else v for k, v in state_dict.items()
        }
    # safetensors copies from the raw buffer: every array must be C-contiguous. np.array (not
    # np.ascontiguousarray) keeps 0-d arrays such as logit_scale 0-d.
    state_dict = {
        k: v if v.flags.c_contiguous else np.array(v, order="C") for k, v in state_dict.items()
    }
    metadata = {
        "format": "pt",
        "naming": naming,
        "architecture": json.dumps(meta["config"], sort_keys=True),
        "preset": meta.get("preset") or "",
        "source": json.dumps(meta.get("source")),
        "regionclip_jax_version": str(meta.get("regionclip_jax_version", "")),
    }
    _write_atomic(out, state_dict, format=format, metadata=metadata)
    return out


def _is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating) or dt == DTYPES["bfloat16"]


def _check_out(out_path: str | os.PathLike, *, overwrite: bool) -> Path:
    out = Path(out_path).expanduser().resolve()
    if out.is_dir():
        raise IsADirectoryError(
            f"{out} is a directory; --out names the weights file to write (e.g. model.safetensors)"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    return out


def _stored_param_dtype(params_dir: Path) -> np.dtype | None:
    """The floating dtype of the stored parameters, from Orbax's metadata (no array read).

    BatchNorm statistics are float32 in every checkpoint, so a float32 leaf beside bfloat16 ones
    does not make the parameters mixed: the narrower dtype is the parameters'. None when the
    metadata cannot be read (then float32).
    """
    # lazy: orbax (seconds to import)
    import jax
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")}
    except Exception:  # a convenience: load_clip validates the checkpoint itself
        return None
    narrow = sorted(d for d in dtypes if _is_float(d) and d.itemsize < 4)
    return narrow[0] if len(narrow) == 1 else None


def _with_num_batches_tracked(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds `<bn>.num_batches_tracked` (int64 0-d, 0) after every BatchNorm's `running_var`, the
    buffer `torch.nn.BatchNorm2d` keeps (our frozen BN has no counter; 0 is a fresh layer's)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        out[key] = value
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def _write_atomic(
    out: Path, state_dict: dict[str, np.ndarray], *, format: str, metadata: dict[str, str]
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so os.replace is an atomic rename.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        if format == "safetensors":
            try:
                # lazy: keeps this module importable (for its --help) if the package is missing
                from safetensors.numpy import save_file
            except ImportError as e:
                raise ImportError(
                    "writing safetensors needs the safetensors package, a dependency of "
                    "regionclip_jax that is missing here: `pip install safetensors`"
                ) from e
            # The library creates its file with mode 0600; give it the mode an ordinary file
            # gets here (the umask's), as np.savez's does.
            tmp.touch()
            mode = tmp.stat().st_mode & 0o777
            save_file(state_dict, str(tmp), metadata=metadata)
            os.chmod(tmp, mode)
        else:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **state_dict)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
