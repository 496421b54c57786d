"""detectron2 RPN checkpoints (`rpn_coco_48.pth`, `rpn_lvis_866*.pth`, ...) -> our `models.rpn.RPN`.

Keys (spec §7.2) of the `model` dict of a detectron2 `.pth` and our variable paths:

  detectron2 key                                      ours
  backbone.stem.conv1.weight            (C4)          backbone.stem.conv1.kernel
  backbone.bottom_up.res2.0.conv1.weight (FPN)        backbone.res2.0.conv1.kernel
  backbone.[bottom_up.]res4.0.shortcut.norm.weight    backbone.res4.0.shortcut.norm.scale
  ....norm.{bias, running_mean, running_var}          ....norm.{bias, mean, var}
  backbone.fpn_lateral2.{weight,bias} (FPN)           fpn.fpn_lateral2.{kernel,bias}
  backbone.fpn_output5.norm.* (FPN with BN, LSJ)      fpn.fpn_output5.norm.*
  proposal_generator.rpn_head.conv.{weight,bias}      rpn_head.conv.{kernel,bias}
  proposal_generator.rpn_head.conv.conv{k}.*  (LSJ)   rpn_head.conv.conv{k}.*
  proposal_generator.rpn_head.{objectness_logits,anchor_deltas}.*   rpn_head.*

Conv weights go from OIHW to HWIO. RegionCLIP's merged checkpoints name the same modules
`offline_backbone.` / `offline_proposal_generator.`; when those exist they are used (the plain
`backbone.` of such a file is the CLIP tower). Keys outside the backbone and the proposal
generator (ROI heads, pixel mean, ...) are ignored, as RegionCLIP's RPN loader does;
`num_batches_tracked` is dropped. BN / SyncBN statistics (the LSJ RPN) load into our frozen
norms: in eval mode they compute the same affine map.

Not inferable from shapes: `stride_in_1x1` (True for every MSRA/caffe detectron2 model,
including RegionCLIP's RPNs) and anchor sizes other than detectron2's defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.convert.torch_files import load_state_dict_file
from regionclip_jax.models.rpn import RESNET_BLOCKS, RPN

_CONV_FROM_TORCH = (2, 3, 1, 0)  # OIHW -> HWIO
_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(value)


def _read(state_dict_or_path: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        return load_state_dict_file(state_dict_or_path)
    sd = state_dict_or_path
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    return sd


def rpn_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone and proposal-generator entries, under plain detectron2 names.

    `offline_backbone.*` / `offline_proposal_generator.*` (RegionCLIP) win over `backbone.*` /
    `proposal_generator.*` when present; `num_batches_tracked` entries are dropped.
    """
    offline = any(k.startswith("offline_backbone.") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked"):
            continue
        if offline:
            if not k.startswith(("offline_backbone.", "offline_proposal_generator.")):
                continue
            k = k[len("offline_") :]
        elif not k.startswith(("backbone.", "proposal_generator.")):
            continue
        out[k] = v
    return out


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not a detectron2 RPN state dict: no key {key!r}")
    return tuple(int(s) for s in np.shape(sd[key]))


def infer_rpn_architecture(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
) -> dict[str, Any]:
    """The `RPN` constructor arguments a detectron2 RPN checkpoint implies.

    Returns:
      dict with `kind` ("c4" | "fpn"), `depth`, `base_width`, `num_convs`, `fpn_norm`,
      `stride_in_1x1` (assumed True), `anchor_sizes` (flat: one per FPN level, or all on the C4
      level), `aspect_ratios`, and detectron2's test-time `pre_nms_topk`, `post_nms_topk`,
      `nms_thresh` for the kind.

    Raises:
      ValueError: not a detectron2 ResNet RPN, or anchors per location that detectron2's default
        anchor sizes cannot explain.
    """
    sd = rpn_keys(_read(state_dict_or_path))
    if any(k.startswith(("backbone.layer1.", "backbone.attnpool.")) for k in sd):
        raise ValueError(
            "this RPN sits on a CLIP ResNet (keys backbone.layer*); build RPN(kind='features') "
            "on a ModifiedResNet trunk and load the rpn_head with load_detectron2_rpn(..., "
            "head_only=True)"
        )
    kind = "fpn" if any(k.startswith("backbone.bottom_up.") for k in sd) else "c4"
    bb = "backbone.bottom_up." if kind == "fpn" else "backbone."
    base_width = _shape(sd, bb + "stem.conv1.weight")[0]
    n_res4 = len({m.group(1) for k in sd if (m := re.match(re.escape(bb) + r"res4\.(\d+)\.", k))})
    depth = {blocks[2]: d for d, blocks in RESNET_BLOCKS.items()}.get(n_res4)
    if depth is None:
        raise ValueError(f"res4 has {n_res4} blocks; known depths: {RESNET_BLOCKS}")
    head = "proposal_generator.rpn_head."
    if head + "conv.weight" in sd:
        num_convs = 1
    else:
        num_convs = len({k for k in sd if re.match(re.escape(head) + r"conv\.conv\d+\.weight$", k)})
        if num_convs == 0:
            raise ValueError(f"no {head}conv.weight nor {head}conv.conv0.weight")
    num_anchors = _shape(sd, head + "objectness_logits.weight")[0]
    sizes = [32.0, 64.0, 128.0, 256.0, 512.0]
    ratios = [0.5, 1.0, 2.0]
    want = len(ratios) * (len(sizes) if kind == "c4" else 1)
    if num_anchors != want:
        raise ValueError(
            f"{num_anchors} anchors per location; detectron2's default {kind} anchors give {want}: "
            "build the RPN with explicit anchor_sizes / aspect_ratios and use load_detectron2_rpn"
        )
    return dict(
        kind=kind,
        depth=depth,
        base_width=base_width,
        num_convs=num_convs,
        fpn_norm=kind == "fpn" and "backbone.fpn_lateral2.norm.weight" in sd,
        stride_in_1x1=True,
        anchor_sizes=sizes,
        aspect_ratios=ratios,
        pre_nms_topk=6000 if kind == "c4" else 1000,
        post_nms_topk=1000,
        nms_thresh=0.7,
    )


def _detectron2_key(path: tuple[Any, ...], kind: str) -> str:
    names = [str(p) for p in path]
    names[-1] = _LEAF.get(names[-1], names[-1])
    top, rest = names[0], names[1:]
    if top == "backbone":
        prefix = "backbone.bottom_up." if kind == "fpn" else "backbone."
    elif top == "fpn":
        prefix = "backbone."
    elif top == "rpn_head":
        prefix = "proposal_generator.rpn_head."
    else:
        raise ValueError(f"unexpected RPN variable {'.'.join(names)}")
    return prefix + ".".join(rest)


def load_detectron2_rpn(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    rpn_model: RPN,
    *,
    head_only: bool = False,
) -> RPN:
    """Copies a detectron2 RPN checkpoint into `rpn_model` (in place), with shape checks.

    Args:
      state_dict_or_path: `{key: array or tensor}` (the `model` dict of a detectron2 `.pth`, or
        the whole dict holding it), or a checkpoint file (read with `load_state_dict_file`).
      rpn_model: an `RPN` (concrete or from `nnx.eval_shape`) of the checkpoint's architecture.
      head_only: load only `proposal_generator.rpn_head.*` (an RPN of kind "features" on
        another backbone); backbone keys are then ignored.

    Returns:
      `rpn_model`, its variables replaced (parameters in their dtype, norm statistics float32).

    Raises:
      ValueError: listing missing keys, unexpected backbone / proposal-generator keys and shape
        mismatches (key, expected PyTorch-layout shape, found shape).
    """
    sd = rpn_keys(_read(state_dict_or_path))
    if head_only or rpn_model.kind == "features":
        sd = {k: v for k, v in sd.items() if k.startswith("proposal_generator.rpn_head.")}
    _, state = nnx.split(rpn_model)
    errors, used, filled = [], set(), []
    for path, var in nnx.to_flat_state(state):
        target = var.get_value()
        key = _detectron2_key(tuple(path), rpn_model.kind)
        conv = len(target.shape) == 4
        expected = tuple(target.shape[i] for i in (3, 2, 0, 1)) if conv else tuple(target.shape)
        if key not in sd:
            errors.append(f"missing key {key!r} (expected shape {expected})")
            continue
        used.add(key)
        value = _to_numpy(sd[key])
        if tuple(value.shape) != expected:
            errors.append(f"{key}: expected shape {expected}, found {tuple(value.shape)}")
            continue
        if conv:
            value = value.transpose(_CONV_FROM_TORCH)
        filled.append((path, var.replace(jnp.asarray(np.array(value, dtype=target.dtype)))))
    errors += [
        f"unexpected key {k!r} with shape {tuple(np.shape(sd[k]))}" for k in sorted(set(sd) - used)
    ]
    if errors:
        shown = "\n  ".join(errors[:30])
        more = f"\n  ... and {len(errors) - 30} more" if len(errors) > 30 else ""
        raise ValueError(
            f"detectron2 RPN checkpoint does not match the RPN (kind {rpn_model.kind!r}):"
            f"\n  {shown}{more}"
        )
    nnx.update(rpn_model, nnx.from_flat_state(filled))
    return rpn_model


def rpn_from_detectron2(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    kind: str | None = None,
    **overrides: Any,
) -> RPN:
    """Builds an `RPN` from a detectron2 checkpoint: architecture from the shapes, then weights.

    Args:
      state_dict_or_path: as in `load_detectron2_rpn`.
      kind: "c4" or "fpn" to assert the checkpoint's kind (None: whatever it is).
      **overrides: other `RPN` arguments (e.g. `post_nms_topk=300, nms_thresh=0.5` as in
        RegionCLIP's pretraining, `dtype`).
    """
    sd = _read(state_dict_or_path)
    arch = infer_rpn_architecture(sd)
    if kind is not None and kind != arch["kind"]:
        raise ValueError(f"asked for a {kind!r} RPN, the checkpoint holds a {arch['kind']!r} one")
    arch.update(overrides)
    arch_kind = arch.pop("kind")
    model = nnx.eval_shape(lambda: RPN(arch_kind, rngs=nnx.Rngs(0), **arch))
    return load_detectron2_rpn(sd, model)
