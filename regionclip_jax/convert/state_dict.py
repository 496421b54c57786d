"""OpenAI / open_clip CLIP state dicts <-> our NNX `CLIP`.

Names: a variable path joined with '.' equals the PyTorch key after these leaf renames

  PyTorch (OpenAI, open_clip)                 ours
  conv `weight` [O, I, kh, kw]            <-> `kernel` [kh, kw, I, O]
  Linear `weight` [out, in]               <-> `kernel` [in, out]
  LayerNorm / BN `weight`                 <-> `scale`
  BN `running_mean`, `running_var`        <-> `mean`, `var`
  `token_embedding.weight`                <-> `token_embedding.embedding`
  `attn.in_proj_weight` [3W, W] / `_bias` <-> `attn.in_proj.kernel` [W, 3W] / `.bias`
  everything else (`positional_embedding`, `class_embedding`, `proj`, `text_projection`,
  `logit_scale`, biases) unchanged.

`num_batches_tracked`, `input_resolution`, `context_length` and `vocab_size` entries are dropped.
torch is never imported here: tensors are recognised by their `.detach` method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.models.clip import CLIP
from regionclip_jax.models.presets import CLIPConfig

DROPPED_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})

# (to PyTorch layout, from PyTorch layout)
_Layout = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_SAME: _Layout = (lambda a: a, lambda a: a)
_LINEAR: _Layout = (lambda a: a.T, lambda a: a.T)
_CONV: _Layout = (
    lambda a: a.transpose(3, 2, 0, 1),
    lambda a: a.transpose(2, 3, 1, 0),
)


def _is_dropped(key: str) -> bool:
    return key in DROPPED_KEYS or key.endswith("num_batches_tracked")


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of a numpy/JAX array or a torch tensor (without importing torch)."""
    if hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen first
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(value)


def _torch_name(path: tuple[Any, ...], ndim: int) -> tuple[str, _Layout]:
    """PyTorch key and layout conversion of the variable at `path` (rank `ndim`)."""
    names = [str(p) for p in path]
    leaf, parent, base = names[-1], names[:-1], ".".join(names[:-1])

    def renamed(new_leaf: str) -> str:
        return f"{base}.{new_leaf}" if base else new_leaf

    if parent[-1:] == ["in_proj"] and leaf in ("kernel", "bias"):
        attn = ".".join(names[:-2])
        if leaf == "kernel":
            return f"{attn}.in_proj_weight", _LINEAR
        return f"{attn}.in_proj_bias", _SAME
    if names == ["token_embedding", "embedding"]:
        return "token_embedding.weight", _SAME
    if leaf == "kernel":
        if ndim == 4:
            return renamed("weight"), _CONV
        if ndim == 2:
            return renamed("weight"), _LINEAR
        raise ValueError(f"unexpected kernel rank {ndim} at {'.'.join(names)}")
    if leaf == "scale":
        return renamed("weight"), _SAME
    if leaf == "mean":
        return renamed("running_mean"), _SAME
    if leaf == "var":
        return renamed("running_var"), _SAME
    return ".".join(names), _SAME


def _entries(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], str, nnx.Variable, _Layout]]:
    """(path, PyTorch key, variable, layout) for every variable of `model`."""
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        key, layout = _torch_name(tuple(path), len(np.shape(var.get_value())))
        yield tuple(path), key, var, layout


def _torch_shape(shape: tuple[int, ...], layout: _Layout) -> tuple[int, ...]:
    if layout is _CONV:
        return (shape[3], shape[2], shape[0], shape[1])
    if layout is _LINEAR:
        return tuple(reversed(shape))
    return tuple(shape)


def state_dict_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> PyTorch-layout shape of every variable; works on `nnx.eval_shape` models."""
    return {
        key: _torch_shape(tuple(np.shape(var.get_value())), layout)
        for _, key, var, layout in _entries(model)
    }


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"cannot infer the CLIP config: state dict has no key {key!r}")
    return tuple(int(s) for s in np.shape(state_dict[key]))


def _count_indices(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise ValueError(
            f"non-contiguous block indices {sorted(found)} for keys matching {pattern}"
        )
    return len(found)


def infer_config(
    state_dict: Mapping[str, Any],
    *,
    transformer_heads: int | None = None,
    activation: str = "quick_gelu",
) -> CLIPConfig:
    """The `CLIPConfig` implied by a state dict's shapes (like OpenAI's `build_model`).

    Args:
      state_dict: OpenAI / open_clip names -> arrays or tensors (only shapes are read).
      transformer_heads: text heads; default `transformer_width // 64` (OpenAI's rule, which the
        state dict cannot confirm: heads leave no trace in the shapes).
      activation: "quick_gelu" (OpenAI's models; open_clip RN and `*-quickgelu` configs) or
        "gelu" (open_clip's own trainings of ViTs); the shapes cannot tell them apart.

    Raises:
      ValueError: naming the missing or inconsistent key.
    """
    keys = list(state_dict)
    if "visual.proj" in state_dict:  # ViT
        conv = _shape(state_dict, "visual.conv1.weight")
        if len(conv) != 4 or conv[2] != conv[3]:
            raise ValueError(f"visual.conv1.weight: expected [W, 3, p, p], found {conv}")
        width, patch = conv[0], conv[3]
        layers = _count_indices(
            keys, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"
        )
        if layers == 0:
            raise ValueError("no visual.transformer.resblocks.*.attn.in_proj_weight keys")
        n_pos = _shape(state_dict, "visual.positional_embedding")[0]
        grid = round((n_pos - 1) ** 0.5)
        if grid * grid + 1 != n_pos:
            raise ValueError(f"visual.positional_embedding: {n_pos} rows is not g*g+1")
        vision_layers: Any = layers
        resolution = patch * grid
        patch_size: int | None = patch
    else:
        counts = []
        for stage in range(1, 5):
            n = _count_indices(keys, rf"visual\.layer{stage}\.(\d+)\.")
            if n == 0:
                raise ValueError(
                    f"state dict has neither 'visual.proj' (ViT) nor 'visual.layer{stage}.*' keys"
                )
            counts.append(n)
        vision_layers = tuple(counts)
        width = _shape(state_dict, "visual.layer1.0.conv1.weight")[0]
        n_pos = _shape(state_dict, "visual.attnpool.positional_embedding")[0]
        grid = round((n_pos - 1) ** 0.5)
        if grid * grid + 1 != n_pos:
            raise ValueError(f"visual.attnpool.positional_embedding: {n_pos} rows is not g*g+1")
        resolution = grid * 32
        patch_size = None
    embed_dim = _shape(state_dict, "text_projection")[1]
    context_length = _shape(state_dict, "positional_embedding")[0]
    vocab_size = _shape(state_dict, "token_embedding.weight")[0]
    text_width = _shape(state_dict, "ln_final.weight")[0]
    text_layers = _count_indices(keys, r"transformer\.resblocks\.(\d+)\.")
    if text_layers == 0:
        raise ValueError("state dict has no 'transformer.resblocks.*' keys (text tower)")
    heads = transformer_heads if transformer_heads is not None else text_width // 64
    if heads < 1 or text_width % heads:
        raise ValueError(
            f"cannot derive text heads for width {text_width} (ln_final.weight); "
            "pass transformer_heads"
        )
    return CLIPConfig(
        embed_dim=embed_dim,
        image_resolution=resolution,
        vision_layers=vision_layers,
        vision_width=width,
        vision_patch_size=patch_size,
        context_length=context_length,
        vocab_size=vocab_size,
        transformer_width=text_width,
        transformer_heads=heads,
        transformer_layers=text_layers,
        activation=activation,
    )


def clip_from_state_dict(
    state_dict: Mapping[str, Any],
    *,
    config: CLIPConfig | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> CLIP:
    """Builds our `CLIP` from an OpenAI / open_clip state dict.

    Args:
      state_dict: PyTorch key -> numpy array, JAX array or torch tensor (any float dtype; values
        are cast to `param_dtype`, BN statistics to float32).
      config: the model config; default `infer_config(state_dict)`.
      dtype: compute dtype of the returned model.
      param_dtype: parameter storage dtype.

    Raises:
      ValueError: listing missing keys, unexpected keys and shape mismatches (key, expected
        PyTorch-layout shape, found shape).
    """
    config = infer_config(state_dict) if config is None else config
    # Abstract model: shapes and metadata without running the (slow) random initialisers.
    abstract = nnx.eval_shape(
        lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    errors: list[str] = []
    used: set[str] = set()
    filled = []
    for path, var in nnx.to_flat_state(state):
        target = var.get_value()
        key, layout = _torch_name(tuple(path), len(target.shape))
        expected = _torch_shape(tuple(target.shape), layout)
        if key not in state_dict:
            errors.append(f"missing key {key!r} (expected shape {expected})")
            continue
        used.add(key)
        value = _to_numpy(state_dict[key])
        if tuple(value.shape) != expected:
            errors.append(f"{key}: expected shape {expected}, found {tuple(value.shape)}")
            continue
        # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (logit_scale) into 1-d.
        array = np.array(layout[1](value), dtype=target.dtype, order="C")
        filled.append((path, var.replace(jnp.asarray(array))))
    unexpected = sorted(k for k in state_dict if k not in used and not _is_dropped(k))
    errors += [
        f"unexpected key {k!r} with shape {tuple(np.shape(state_dict[k]))}" for k in unexpected
    ]
    if errors:
        shown = "\n  ".join(errors[:30])
        more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
        raise ValueError(f"state dict does not match {config}:\n  {shown}{more}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def clip_to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """OpenAI-named, PyTorch-layout numpy arrays of every variable (inverse of
    `clip_from_state_dict`; BN entries without `num_batches_tracked`)."""
    out: dict[str, np.ndarray] = {}
    for _, key, var, layout in _entries(model):
        value = np.asarray(jax.device_get(var.get_value()))
        out[key] = np.array(layout[0](value), order="C")
    return out
