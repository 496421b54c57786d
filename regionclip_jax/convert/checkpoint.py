"""Converted CLIP checkpoints: an Orbax parameter tree plus a `model.json` that describes it.

Layout of a checkpoint directory:

  model.json   {"format": "regionclip_jax.checkpoint", "format_version": 1, "model_type": "clip",
                "config": CLIPConfig.to_dict(), "preset": "RN50" | null, "param_count": int,
                "source": {"file": name, "sha256": hex} | null, "regionclip_jax_version": str,
                "created": ISO-8601 UTC, "params_dir": "params"}
  params/      Orbax StandardCheckpointer tree = `nnx.to_pure_dict(nnx.state(model))` (all variables:
               `nnx.Param` and the frozen-BN `nnx.BatchStat`s), arrays in the model's parameter dtype.

`save_clip` writes into a temporary sibling directory and renames it into place, so an interrupted
save leaves no half-written checkpoint at the destination. `load_clip` needs only JAX/Flax/Orbax
(never torch). This module imports JAX lazily so `read_metadata` (used by `regionclip-jax info`)
stays cheap.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regionclip_jax.models.clip import CLIP

FORMAT = "regionclip_jax.checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "model.json"
PARAMS_DIR = "params"


def save_clip(
    model: CLIP,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
    source_sha256: str | None = None,
    single_writer: bool = False,
) -> Path:
    """Writes `model`'s variables and config to a checkpoint directory.

    Args:
      model: a `regionclip_jax.models.clip.CLIP`.
      directory: destination; created (with parents). Must not exist unless `overwrite`.
      overwrite: replace an existing checkpoint at `directory`. Only a directory that holds a
        `model.json` (or is empty) is replaced, so a mistyped path cannot wipe unrelated files.
      source: the file the weights came from; its name goes into `model.json`, and its sha256
        too when the file exists and `source_sha256` is not given.
      source_sha256: hex digest of `source`, if already known.
      single_writer: in a multi-process JAX job, this process alone writes the checkpoint (the
        others do not call `save_clip`; the caller synchronises them afterwards, e.g.
        `parallel.sync_processes`). `model` must then hold whole host arrays
        (`parallel.gather_to_host`).

    Returns:
      The absolute checkpoint directory.

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False, or it is not a checkpoint.
      RuntimeError: called in a multi-process JAX job without `single_writer` (conversion is a
        single-process tool).
    """
    # lazy: jax/flax/orbax (seconds to import); metadata reads need none of them
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from regionclip_jax import __version__
    from regionclip_jax.models.presets import PRESETS

    multiprocess = jax.process_count() > 1
    if multiprocess and not single_writer:
        raise RuntimeError(
            "save_clip writes from a single process; run conversion outside a multi-host job"
        )
    # Orbax synchronises all processes of a job by default; here only this one takes part.
    this = jax.process_index()
    checkpointer_options = (
        {
            "multiprocessing_options": ocp.options.MultiprocessingOptions(
                primary_host=this, active_processes={this}
            )
        }
        if multiprocess
        else {}
    )
    dest = check_destination(directory, overwrite=overwrite)
    config = model.config
    state = nnx.state(model)
    # Plain host arrays: the checkpoint then carries no device or sharding of the converting machine.
    tree = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    source_info = None
    if source is not None:
        source = Path(source)
        if source_sha256 is None and source.is_file():
            source_sha256 = sha256_file(source)
        source_info = {"file": source.name, "sha256": source_sha256}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": "clip",
        "config": config.to_dict(),
        "preset": next((name for name, c in PRESETS.items() if c == config), None),
        "param_count": param_count,
        "source": source_info,
        "regionclip_jax_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "params_dir": PARAMS_DIR,
    }

    dest.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final rename is atomic.
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer(**checkpointer_options) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, tree)
            ckptr.wait_until_finished()
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        replace_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def replace_directory(tmp: Path, dest: Path) -> None:
    """Renames the finished directory `tmp` (a sibling of `dest`, same filesystem) to `dest`.

    An existing `dest` is swapped out by two renames: `dest` holds the old or the new directory,
    never a mix, and the old one is deleted only once the new one is in place.
    """
    if not dest.exists():
        tmp.rename(dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_destination(
    directory: str | os.PathLike, *, overwrite: bool, markers: tuple[str, ...] = (METADATA_FILE,)
) -> Path:
    """The absolute path `save_clip` would write, after checking that it may (no JAX import).

    `markers`: the files that make an existing directory a checkpoint this may replace (the
    download cache also writes RPNs, marked by `rpn.json`).

    Raises:
      FileExistsError: `directory` exists and `overwrite` is False, or it exists and is neither
        a checkpoint (has one of `markers`) nor an empty directory.
    """
    dest = Path(directory).expanduser().resolve()
    if not dest.exists():
        return dest
    if not overwrite:
        raise FileExistsError(
            f"{dest} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    is_checkpoint = any((dest / m).exists() for m in markers)
    if not dest.is_dir() or not (is_checkpoint or not any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} exists and is not a regionclip_jax checkpoint (no {' / '.join(markers)}); "
            "refusing to replace it"
        )
    return dest


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates a checkpoint's `model.json` (no JAX import).

    Raises:
      FileNotFoundError: `directory` or its `model.json` is missing.
      ValueError: `model.json` is not valid JSON, not ours, or of an unsupported version.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(2, "No such checkpoint directory", str(directory))
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            2,
            f"Not a regionclip_jax checkpoint (no {METADATA_FILE}; convert one with "
            "`regionclip-jax convert`)",
            str(directory),
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a regionclip_jax checkpoint description (format != {FORMAT!r})"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this regionclip_jax reads version "
            f"{FORMAT_VERSION} (re-convert the source file with this version)"
        )
    for key in ("model_type", "config"):
        if key not in meta:
            raise ValueError(f"{path} lacks the {key!r} entry")
    return meta


def load_clip(directory: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None) -> CLIP:
    """Builds a `CLIP` from a checkpoint written by `save_clip` (no torch needed).

    The model is created abstractly (`nnx.eval_shape`, no initialisation cost) and the stored
    arrays are restored straight into it on the default device.

    Args:
      directory: a checkpoint directory.
      dtype: compute dtype of the model (default float32).
      param_dtype: dtype of the restored variables (default float32); Orbax casts on read.

    Raises:
      FileNotFoundError: `directory` or `model.json` missing.
      ValueError: bad `model.json`, an unknown model type, or stored variables that do not match
        the architecture (missing/unexpected keys, shape mismatch), naming the key.
    """
    # lazy: jax/flax/orbax (seconds to import); metadata reads need none of them
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from regionclip_jax.models.clip import CLIP
    from regionclip_jax.models.presets import CLIPConfig

    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    directory = Path(directory).expanduser().resolve()
    meta = read_metadata(directory)
    if meta["model_type"] != "clip":
        raise ValueError(f"{directory} holds a {meta['model_type']!r} model, not 'clip'")
    try:
        config = CLIPConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / METADATA_FILE} has an invalid config: {e}") from e
    name = meta.get("params_dir", PARAMS_DIR)
    if not isinstance(name, str) or Path(name).name != name:
        raise ValueError(
            f"{directory / METADATA_FILE}: params_dir must be a plain name, got {name!r}"
        )
    params_dir = directory / name
    if not params_dir.is_dir():
        raise FileNotFoundError(2, "Checkpoint has no parameter directory", str(params_dir))

    abstract = nnx.eval_shape(
        lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device
        ),
        target,
    )
    with ocp.StandardCheckpointer() as ckptr:
        stored = _stored_shapes(ckptr, params_dir)
        if stored is not None:
            _check_shapes(directory, _flatten(target), stored)
        restored = ckptr.restore(params_dir, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def _stored_shapes(ckptr, params_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """`{'a/b/c': shape}` from Orbax's metadata, or None if this Orbax exposes it differently."""
    try:
        meta = ckptr.metadata(params_dir)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree is None:
            return None
        return {k: tuple(v.shape) for k, v in _flatten(tree).items()}
    except Exception:  # the pre-check is a convenience; restore still validates
        return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _check_shapes(directory: Path, expected: dict[str, Any], stored: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise ValueError(
            f"{directory}: stored variables do not match the architecture in {METADATA_FILE}: "
            + "; ".join(parts)
        )
    for key, x in expected.items():
        if tuple(x.shape) != stored[key]:
            raise ValueError(
                f"{directory}: variable {key} has shape {stored[key]} in the checkpoint but the "
                f"architecture in {METADATA_FILE} needs {tuple(x.shape)}"
            )


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
