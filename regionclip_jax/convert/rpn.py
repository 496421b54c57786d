"""The RPN file format and loading: `rpn.json` (architecture) + `params.npz` (weights).

An `rpn` run exports `WORKDIR/export/{rpn.json, params.npz}` (`export_rpn`); `load_rpn_arch` reads
that, or infers the architecture of a detectron2 RPN .pth (`convert.detectron2_rpn`);
`load_rpn_weights` reads the weights of either; `load_offline_rpn` gives a frozen, jitted proposal
function (the recognizer's, `add-proposals`' and the detection trainer's offline RPN).
`rpn.json` holds the architecture dict: kind ("c4" | "fpn" | "clip"), depth, base_width, anchor_sizes,
aspect_ratios, freeze_at, clip_config (kind "clip"); the test-time settings (pre/post-NMS top-k,
NMS threshold) are given when loading.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.convert.detectron2_rpn import infer_rpn_architecture, load_detectron2_rpn
from regionclip_jax.models.clip_rpn import ClipRPN
from regionclip_jax.models.presets import CLIPConfig
from regionclip_jax.models.rpn import RPN
from regionclip_jax.models.split import SplitJit, path_str, split_model

ARCH_FILE = "rpn.json"
PARAMS_FILE = "params.npz"


def load_rpn_arch(
    path: str | os.PathLike,
    *,
    pre_nms_topk: int | None,
    post_nms_topk: int,
    nms_thresh: float,
    name: str = "detect.rpn_init",
) -> dict[str, Any]:
    """The architecture of a trained RPN at `path`, with the given test-time settings (no config needed).

    Args:
      path: an `rpn` workdir (holding export/rpn.json), its export dir, or a detectron2 RPN .pth.
      pre_nms_topk: candidates per level before NMS; None: the kind's detectron2 test default
        (C4 / CLIP res4: 6000, FPN: 1000 per level).
      post_nms_topk, nms_thresh: proposals kept after NMS, and the NMS IoU threshold.
      name: what `path` is called in error messages.

    Raises:
      FileNotFoundError: nothing at `path`, or a directory without rpn.json (nor export/rpn.json).
    """
    path = os.fspath(path)
    for d in (os.path.join(path, "export"), path):
        if os.path.isfile(os.path.join(d, ARCH_FILE)):
            with open(os.path.join(d, ARCH_FILE)) as f:
                arch = json.load(f)
            arch["weights"] = os.path.join(d, PARAMS_FILE)
            break
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name} {path!r}: neither an `rpn` workdir with export/{ARCH_FILE} "
                "nor a detectron2 RPN checkpoint file"
            )
        arch = dict(infer_rpn_architecture(path), weights=path)
    if pre_nms_topk is None:
        pre_nms_topk = 1000 if arch.get("kind") == "fpn" else 6000
    arch.update(
        pre_nms_topk=int(pre_nms_topk),
        post_nms_topk=int(post_nms_topk),
        nms_thresh=float(nms_thresh),
    )
    return arch


def check_rpn_path(path: str | os.PathLike) -> None:
    """FileNotFoundError unless something exists at `path` (named as an RPN in the message)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"rpn {os.fspath(path)!r} does not exist (want an `rpn` workdir, its export/ dir, or "
            "a detectron2 RPN .pth)"
        )


def load_offline_rpn(
    path: str | os.PathLike,
    *,
    pre_nms_topk: int | None,
    post_nms_topk: int,
    nms_thresh: float,
) -> tuple[dict[str, Any], Any]:
    """A trained RPN as a frozen proposal function (the recognizer's and `add-proposals`').

    Args:
      path: an `rpn` workdir, its export/ dir (rpn.json + params.npz) or a detectron2 RPN .pth.
      pre_nms_topk, post_nms_topk, nms_thresh: test-time settings (`load_rpn_arch`).

    Returns:
      (arch, propose): `propose(images, image_hw)` takes uint8 or float `[B, Hc, Wc, 3]` RGB
      0..255 canvases (zero padding) and int32 `[B, 2]` (h, w), and returns device arrays (boxes
      float32 `[B, post_nms_topk, 4]` xyxy canvas pixels, objectness logits `[B, post_nms_topk]`,
      valid bool `[B, post_nms_topk]`); jitted, one program per input shape.

    Raises:
      FileNotFoundError: nothing usable at `path`.
      ValueError: a file that is not an RPN, or weights that do not fit its rpn.json.
    """
    path = os.fspath(path)
    check_rpn_path(path)
    try:
        arch = load_rpn_arch(
            path,
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=post_nms_topk,
            nms_thresh=nms_thresh,
            name="rpn",
        )
        params, rest = load_rpn_weights(arch)
    except ValueError as e:
        raise ValueError(f"rpn {path!r} is not a usable RPN: {e}") from e
    except KeyError as e:  # an rpn.json without an architecture field
        raise ValueError(f"rpn {path!r} is not a usable RPN: its rpn.json lacks {e}") from e
    # The graph only: the weights come from load_rpn_weights (no second random init).
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: build_rpn(arch, nnx.Rngs(0))))
    # uint8 may cross to the device (4x less than float32); the RPN takes float 0..255. jit's
    # cache keys on the input shapes: one program per canvas.
    propose = SplitJit.from_parts(
        graphdef,
        jax.device_put((params, rest)),
        lambda m, images, image_hw: m(images.astype(jnp.float32), image_hw),
    )
    return arch, propose


def build_rpn(arch: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """The RPN module `arch` describes (random weights)."""
    if arch["kind"] == "clip":
        return ClipRPN(CLIPConfig.from_dict(arch["clip_config"]), arch, rngs=rngs)
    return RPN(
        kind=arch["kind"],
        depth=int(arch["depth"]),
        base_width=int(arch["base_width"]),
        anchor_sizes=tuple(arch["anchor_sizes"]),
        aspect_ratios=tuple(arch["aspect_ratios"]),
        num_convs=int(arch.get("num_convs", 1)),
        fpn_norm=bool(arch.get("fpn_norm", False)),
        stride_in_1x1=bool(arch.get("stride_in_1x1", True)),
        pre_nms_topk=int(arch["pre_nms_topk"]),
        post_nms_topk=int(arch["post_nms_topk"]),
        nms_thresh=float(arch["nms_thresh"]),
        rngs=rngs,
    )


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(tree: Any, flat: dict[str, np.ndarray], where: str) -> Any:
    leaves = []
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path_str(p)
        if key not in flat:
            raise ValueError(f"{where}: no weights for {key}")
        if flat[key].shape != v.shape:
            raise ValueError(f"{where}: {key} has shape {flat[key].shape}, the RPN {v.shape}")
        leaves.append(jnp.asarray(flat[key], v.dtype))
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def load_rpn_weights(arch: dict[str, Any]) -> tuple[Any, Any]:
    """(params, rest) of the RPN `arch` describes, read from `arch["weights"]` (on the host)."""
    path = arch["weights"]
    if path.endswith(".npz"):
        # Shapes only: every value comes from the file (an eager random init takes seconds).
        _, params, rest = split_model(nnx.eval_shape(lambda: build_rpn(arch, nnx.Rngs(0))))
        with np.load(path) as z:
            flat = dict(z)
        params = _unflat(params, {k[2:]: v for k, v in flat.items() if k.startswith("p/")}, path)
        rest = _unflat(rest, {k[2:]: v for k, v in flat.items() if k.startswith("r/")}, path)
        return params, rest
    model = build_rpn(arch, nnx.Rngs(0))
    if not path:  # "random"
        _, params, rest = split_model(model)
        return params, rest
    load_detectron2_rpn(path, model)
    _, params, rest = split_model(model)
    return params, rest


def export_rpn(arch: dict[str, Any], params: Any, rest: Any, directory: str) -> str:
    """Writes `rpn.json` + `params.npz` (the format `load_rpn_arch` reads)."""
    os.makedirs(directory, exist_ok=True)
    flat = {f"p/{k}": v for k, v in _flat(params).items()}
    flat.update({f"r/{k}": v for k, v in _flat(rest).items()})
    np.savez(os.path.join(directory, PARAMS_FILE), **flat)
    keep = {k: v for k, v in arch.items() if k not in ("weights", "init")}
    with open(os.path.join(directory, ARCH_FILE), "w") as f:
        json.dump(keep, f, indent=2)
    return directory
