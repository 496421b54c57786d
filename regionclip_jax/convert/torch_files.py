"""Reading the checkpoint files users have into `{name: np.ndarray}` state dicts.

Supported files, recognised by their content (the extension is only a hint):

  - OpenAI CLIP `.pt` files: TorchScript archives (a zip with `constants.pkl` and `code/`); their
    `.state_dict()` holds the plain CLIP names plus three int64 scalars (`input_resolution`,
    `context_length`, `vocab_size`), which are returned as they are.
  - `torch.save`d state dicts (`.pt`/`.pth`/`.bin`, zip or legacy pickle format), read with
    `torch.load(weights_only=True)`. Common wrappers are unwrapped: `{'state_dict': sd}` (open_clip
    training checkpoints), `{'model': sd}` (detectron2 / RegionCLIP), and a `module.` prefix on every
    key (DistributedDataParallel).
  - `.npz` archives (`np.savez`), read without pickle.
  - safetensors files (open_clip's and the Hugging Face hub's `.safetensors`, and what
    `regionclip-jax export-weights` writes), read with the `safetensors` package (a required
    dependency), any dtype it stores: float32, float16, bfloat16 (as `ml_dtypes.bfloat16`), ints.
    safetensors has no magic number; a file is taken for one when its first 8 bytes are a
    little-endian header length N with 2 <= N <= min(100 MB, file size - 8), followed by a JSON
    object (`{` ... `}`, space-padded) of N bytes. A file named `*.safetensors` that fails this
    test is read as one anyway, so that a damaged file gets a message saying what is wrong with it.

torch is imported only for the PyTorch formats. Anything else raises `CheckpointFormatError` with a
one-line message naming the file and what was expected.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# Keys under which training scripts nest the state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Pickle protocol 2+ starts with PROTO (0x80) then the protocol number; torch's legacy format uses 2.
_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))
# The safetensors library refuses headers above 100 MB (its MAX_HEADER_SIZE).
_SAFETENSORS_MAX_HEADER = 100_000_000
_EXPECTED = (
    "expected a PyTorch checkpoint (.pt/.pth: TorchScript archive or torch.save'd state dict), "
    "an .npz archive or a .safetensors file"
)


class CheckpointFormatError(ValueError):
    """A file that is not a checkpoint this package can read, or holds no tensors."""


def load_state_dict_file(
    path: str | os.PathLike, *, trust_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat state dict of NumPy arrays.

    Args:
      path: a TorchScript archive, a `torch.save`d (possibly wrapped) state dict, an `.npz` or a
        safetensors file (recognised by content, any extension).
      trust_pickle: allow arbitrary Python objects in a `torch.save`d file (`weights_only=False`).
        Only for files from a trusted source: unpickling can execute code. Needed for pickles
        that store NumPy arrays or whole `nn.Module`s instead of tensors.

    Returns:
      `{name: array}` with the names as stored (after unwrapping), arrays in the stored dtype and
      PyTorch layout (bfloat16 tensors become `ml_dtypes.bfloat16` arrays).

    Raises:
      FileNotFoundError: no file at `path`.
      CheckpointFormatError: the file is not one of the formats above or holds no tensors.
      ImportError: a PyTorch file was given and torch is not installed (or a safetensors file
        and the safetensors package is missing).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file", str(path))
    if path.is_dir():
        hint = (
            " (this is a converted regionclip_jax checkpoint; open it with load_clip)"
            if (path / "model.json").exists()
            else ""
        )
        raise CheckpointFormatError(f"{path} is a directory, not a checkpoint file{hint}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointFormatError(f"{path} is empty; {_EXPECTED}")

    if head[:4] in _ZIP_MAGIC:
        kind = _zip_kind(path)
    # Before the pickle test: a header length such as 640 (bytes 0x80 0x02 0 0 ...) starts like a
    # pickle's PROTO opcode, but no pickle goes on with a JSON object of exactly that length.
    elif _looks_like_safetensors(path, head):
        kind = "safetensors"
    elif head[:2] in _PICKLE_MAGIC:
        kind = "torch_save"
    elif path.suffix.lower() == ".safetensors":
        kind = "safetensors"  # damaged: _load_safetensors says how
    else:
        raise CheckpointFormatError(f"{path} is not a recognised checkpoint; {_EXPECTED}")

    if kind == "npz":
        return _load_npz(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "torchscript":
        return _load_torchscript(path)
    return _load_torch_save(path, trust_pickle=trust_pickle)


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFormatError(f"{path} is a damaged zip archive ({e}); {_EXPECTED}") from e
    # torch.save and torch.jit.save both write `<archive>/data.pkl`; only TorchScript adds the
    # serialized code and its constants.
    basenames = {n.rsplit("/", 1)[-1] for n in names}
    if "constants.pkl" in basenames or any("/code/" in n for n in names):
        return "torchscript"
    if "data.pkl" in basenames:
        return "torch_save"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointFormatError(
        f"{path} is a zip archive but neither a PyTorch checkpoint nor an .npz; {_EXPECTED}"
    )


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    """8-byte little-endian header length N, then N bytes of JSON object (space-padded)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_len = int.from_bytes(head[:8], "little")
    if not 2 <= header_len <= min(_SAFETENSORS_MAX_HEADER, path.stat().st_size - 8):
        return False
    # The header's last non-space byte closes the object: a check of the length. (Headers are
    # kilobytes to a few MB; the padding may be long in files not written by the library.)
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(header_len)
    return header.rstrip(b" ").endswith(b"}")


def _import_torch(path: Path):
    try:
        # lazy: torch is an optional dependency (the `torch` extra)
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch: `pip install torch` (or `pip install "
            "'regionclip-jax[torch]'`); converted checkpoints load without it"
        ) from e
    return torch


def _one_line(e: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error message, shortened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else (type(e).__name__ if isinstance(e, BaseException) else "unknown")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_torchscript(path: Path) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 marks torch.jit as deprecated; OpenAI's files are TorchScript anyway.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError with multi-page messages
        raise CheckpointFormatError(
            f"{path} looks like a TorchScript archive but torch.jit.load failed: {_one_line(e)}"
        ) from e
    return _to_numpy_dict(path, module.state_dict(), torch)


def _load_torch_save(path: Path, *, trust_pickle: bool) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about pickle protocols before failing on them.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        message = str(e)
        if not trust_pickle and "Unsupported global" in message:
            raise CheckpointFormatError(
                f"{path} contains Python objects other than tensors, which are not unpickled by "
                "default because unpickling can run code; if you trust the file, pass "
                "trust_pickle=True (CLI: --trust-pickle)"
            ) from e
        # torch's weights-only errors put the actual reason after this marker.
        marker = "WeightsUnpickler error:"
        detail = message.split(marker, 1)[1] if marker in message else message
        raise CheckpointFormatError(
            f"{path} could not be read by torch.load ({_one_line(detail)}); {_EXPECTED}"
        ) from e
    if isinstance(obj, torch.nn.Module):  # only reachable with trust_pickle
        obj = obj.state_dict()
    return _to_numpy_dict(path, _unwrap(path, obj, torch), torch)


def _unwrap(path: Path, obj: Any, torch) -> Mapping[str, Any]:
    """Descends into `{'state_dict': ...}`-style wrappers until a mapping holding tensors."""
    while True:
        if not isinstance(obj, Mapping):
            raise CheckpointFormatError(
                f"{path} holds a {type(obj).__name__}, expected a mapping of parameter names to tensors"
            )
        if any(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(repr(k) for k in list(obj)[:5])
            raise CheckpointFormatError(
                f"{path} holds a mapping without tensors (keys: {keys or 'none'}); expected a "
                "state dict, optionally under 'state_dict' or 'model'"
            )
        obj = inner


def _to_numpy_dict(path: Path, sd: Mapping[str, Any], torch) -> dict[str, np.ndarray]:
    out = {}
    for name, value in sd.items():
        if isinstance(value, torch.Tensor):
            out[str(name)] = _tensor_to_numpy(value, torch)
        elif isinstance(value, np.ndarray):
            out[str(name)] = value
        # Other entries (detectron2's '__author__', step counters) are metadata, not weights.
    if not out:
        raise CheckpointFormatError(f"{path} holds no tensors")
    return _strip_module_prefix(out)


def _tensor_to_numpy(t, torch) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        # NumPy has no bfloat16; reinterpret the bits instead of rounding through float32.
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _strip_module_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "module."
    if all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:
        raise CheckpointFormatError(
            f"{path} is not a readable .npz archive ({_one_line(e)})"
        ) from e
    if not out:
        raise CheckpointFormatError(f"{path} holds no arrays")
    return _strip_module_prefix(out)


def _check_safetensors_layout(path: Path) -> None:
    """Names the usual damage (truncation, a non-JSON header) before the library's terser errors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(
                f"{path} is not a readable .safetensors file (only {size} bytes, shorter than the "
                "8-byte header length)"
            )
        header_len = int.from_bytes(head, "little")
        if header_len > _SAFETENSORS_MAX_HEADER:
            raise CheckpointFormatError(
                f"{path} is not a readable .safetensors file (its first 8 bytes give a header "
                f"length of {header_len} bytes, over the format's 100 MB limit)"
            )
        if 8 + header_len > size:
            raise CheckpointFormatError(
                f"{path} is truncated: its header declares {header_len} bytes, the file has "
                f"{size - 8} after the length"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(
            f"{path} is not a readable .safetensors file (its header is not JSON: {_one_line(e)})"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"{path} is not a readable .safetensors file (its header is not a JSON object)"
        )
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
        and isinstance(v, dict)
        and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2
        and isinstance(v["data_offsets"][1], int)
    ]
    data = size - 8 - header_len
    if ends and max(ends) > data:
        raise CheckpointFormatError(
            f"{path} is truncated: its tensors need {max(ends)} bytes of data, the file has {data}"
        )


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        # lazy: only this format needs it (a required dependency; kept lazy for import time)
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs the safetensors package, a dependency of regionclip_jax that "
            "is missing here: `pip install safetensors`"
        ) from e
    _check_safetensors_layout(path)
    try:
        # numpy names bfloat16 only once ml_dtypes is imported (done at the top of this module).
        out = load_file(str(path))
    except Exception as e:  # SafetensorError, or TypeError for a dtype numpy cannot hold
        raise CheckpointFormatError(
            f"{path} is not a readable .safetensors file ({_one_line(e)})"
        ) from e
    if not out:
        raise CheckpointFormatError(f"{path} holds no tensors")
    return _strip_module_prefix(out)
