"""RegionCLIP (detectron2) checkpoints -> our CLIP + the detector's box-predictor weights.

A RegionCLIP `.pth` is `{'model': state_dict, ...}` (spec §7.2). Its keys, by prefix:

  backbone.*                 CLIP visual names (ModifiedResNet)  -> CLIP `visual.*`
  lang_encoder.*             CLIP text names                     -> CLIP text tower
  roi_heads.box_predictor.*  cls_score / test_cls_score / cls_bg_score / bbox_pred -> `heads`
  teacher_backbone.*         pretraining's frozen teacher (CLIP visual names) -> `teacher`
  offline_backbone.*, offline_proposal_generator.*   the offline RPN: reported, not loaded
                             (load it with convert.detectron2_rpn.load_detectron2_rpn)
  roi_heads.mask_head.*      LVIS mask head (deconv / predictor)   -> `mask_head` (PyTorch layout),
                             loaded into `OVDFastRCNN.mask_head` by `load_mask_head`

`logit_scale` is not in RegionCLIP files (its classifier uses a fixed temperature 0.01); the CLIP
gets OpenAI's initial value log(1/0.07). A checkpoint without `lang_encoder.*` (transfer
checkpoints saved without `GET_CONCEPT_EMB`) needs the text tower from another file
(`text_state_dict=`: an OpenAI CLIP state dict of the same model, e.g. RN50.pt).

Converted checkpoints are a `save_clip` directory plus `regionclip_heads.npz` (the box-predictor
arrays, PyTorch layout), `regionclip_mask_head.npz` (the mask head's, PyTorch layout; LVIS
checkpoints only) and a `"regionclip"` entry in `model.json` listing them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.convert.checkpoint import METADATA_FILE, load_clip, save_clip
from regionclip_jax.convert.state_dict import clip_from_state_dict, clip_to_state_dict, infer_config
from regionclip_jax.convert.torch_files import load_state_dict_file

HEADS_FILE = "regionclip_heads.npz"
_PREDICTOR = "roi_heads.box_predictor."
# Box-predictor entries we keep (PyTorch layout): classifier weights [K, D], bbox_pred [4, D]/[4].
HEAD_KEYS = (
    "cls_score.weight",
    "test_cls_score.weight",
    "cls_bg_score.weight",
    "bbox_pred.weight",
    "bbox_pred.bias",
)
MASK_HEAD_FILE = "regionclip_mask_head.npz"
_MASK_HEAD = "roi_heads.mask_head."
# detectron2 `MaskRCNNConvUpsampleHead` (NUM_CONV 0, class-agnostic), PyTorch layout:
# deconv = ConvTranspose2d(C_res5, D, 2, stride 2): weight [C_res5, D, 2, 2], bias [D];
# predictor = Conv2d(D, 1, 1): weight [1, D, 1, 1], bias [1].
MASK_HEAD_KEYS = ("deconv.weight", "deconv.bias", "predictor.weight", "predictor.bias")
# Prefixes of parts we recognise but do not load.
IGNORED_PREFIXES = ("offline_backbone.", "offline_proposal_generator.")
_NON_PERSISTENT = ("pixel_mean", "pixel_std", "concept_emb", "teacher_concept_emb", "ignore_others")


@dataclasses.dataclass
class RegionCLIPWeights:
    """A loaded RegionCLIP checkpoint.

    Attributes:
      clip: our `CLIP` (visual tower = RegionCLIP's backbone + RoI head, text = lang_encoder).
      heads: box-predictor arrays by name (`HEAD_KEYS`, PyTorch layout), possibly empty.
      teacher: the pretraining teacher's visual tower (a `ModifiedResNet`) or None.
      ignored: recognised keys that were not loaded (offline RPN, buffers), sorted.
      mask_head: the LVIS mask head's arrays by name (`MASK_HEAD_KEYS`, PyTorch layout), empty
        for checkpoints without one; `load_mask_head` puts them into a detector's mask head.
    """

    clip: Any
    heads: dict[str, np.ndarray]
    teacher: Any = None
    ignored: list[str] = dataclasses.field(default_factory=list)
    mask_head: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def is_regionclip_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True if the keys follow RegionCLIP's detectron2 naming (any `backbone.*` key)."""
    return any(k.startswith("backbone.") for k in state_dict)


def split_regionclip_state_dict(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Splits a RegionCLIP state dict by part.

    Returns:
      (`clip_sd`: OpenAI-named student visual + text entries, `teacher_sd`: OpenAI-named
      `visual.*` entries of the teacher (empty if absent), `heads`, `mask_head` (names without
      the `roi_heads.mask_head.` prefix, empty if absent), `ignored` keys).

    Raises:
      ValueError: naming keys with an unknown prefix or predictor entries we do not know.
    """
    clip_sd: dict[str, Any] = {}
    teacher_sd: dict[str, Any] = {}
    heads: dict[str, np.ndarray] = {}
    mask_head: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            clip_sd["visual." + key[len("backbone.") :]] = value
        elif key.startswith("lang_encoder."):
            clip_sd[key[len("lang_encoder.") :]] = value
        elif key.startswith("teacher_backbone."):
            teacher_sd["visual." + key[len("teacher_backbone.") :]] = value
        elif key.startswith(_PREDICTOR):
            name = key[len(_PREDICTOR) :]
            if name not in HEAD_KEYS:
                unknown.append(key)
            else:
                heads[name] = np.asarray(value, np.float32)
        elif key.startswith(_MASK_HEAD):
            name = key[len(_MASK_HEAD) :]
            if name not in MASK_HEAD_KEYS:
                unknown.append(key)
            else:
                mask_head[name] = np.asarray(value, np.float32)
        elif key.startswith(IGNORED_PREFIXES) or key in _NON_PERSISTENT:
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ValueError(
            f"unknown keys in RegionCLIP checkpoint: {shown}{more}; expected prefixes backbone., "
            "lang_encoder., teacher_backbone., roi_heads.box_predictor. "
            f"({', '.join(HEAD_KEYS)}), {_MASK_HEAD} ({', '.join(MASK_HEAD_KEYS)}), "
            f"{', '.join(IGNORED_PREFIXES)}"
        )
    return clip_sd, teacher_sd, heads, mask_head, sorted(ignored)


def _check_heads(heads: Mapping[str, np.ndarray], embed_dim: int) -> None:
    for name, value in heads.items():
        key = _PREDICTOR + name
        shape = tuple(value.shape)
        if name == "bbox_pred.bias":
            ok = shape == (4,)
            want = "(4,)"
        elif name == "bbox_pred.weight":
            ok = shape == (4, embed_dim)
            want = f"(4, {embed_dim})"
        elif name == "cls_bg_score.weight":
            ok = shape == (1, embed_dim)
            want = f"(1, {embed_dim})"
        else:
            ok = len(shape) == 2 and shape[1] == embed_dim
            want = f"(K, {embed_dim})"
        if not ok:
            raise ValueError(
                f"{key}: expected shape {want} (embedding dim {embed_dim} from the checkpoint), "
                f"found {shape}"
            )


def _check_mask_head(arrays: Mapping[str, np.ndarray], in_channels: int | None) -> None:
    """Shapes of a class-agnostic `MaskRCNNConvUpsampleHead` (NUM_CONV 0), named by key.

    Args:
      in_channels: the res5 width the backbone gives (32 x the stem width), None: unchecked.
    """
    if not arrays:
        return
    missing = [k for k in MASK_HEAD_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            "RegionCLIP checkpoint: incomplete mask head, missing "
            + ", ".join(repr(_MASK_HEAD + k) for k in missing)
        )
    w = tuple(np.shape(arrays["deconv.weight"]))
    if len(w) != 4 or w[2:] != (2, 2) or (in_channels is not None and w[0] != in_channels):
        want = f"({in_channels if in_channels is not None else 'C'}, D, 2, 2)"
        raise ValueError(
            f"RegionCLIP checkpoint: {_MASK_HEAD}deconv.weight: expected shape {want} "
            f"(ConvTranspose2d 2x2 from the res5 width), found {w}"
        )
    d = w[1]
    want_shapes = {"deconv.bias": (d,), "predictor.weight": (1, d, 1, 1), "predictor.bias": (1,)}
    for name, want_shape in want_shapes.items():
        got = tuple(np.shape(arrays[name]))
        if got != want_shape:
            hint = " (a class-specific mask head; RegionCLIP's is class-agnostic)" * (
                name.startswith("predictor") and len(got) >= 1 and got[0] != 1
            )
            raise ValueError(
                f"RegionCLIP checkpoint: {_MASK_HEAD}{name}: expected shape {want_shape}, "
                f"found {got}{hint}"
            )


def load_mask_head(mask_head: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Puts a RegionCLIP mask head (PyTorch layout, `MASK_HEAD_KEYS`) into our `MaskHead`.

    `deconv.weight [C, D, 2, 2]` -> `deconv_kernel[a, b, c, o] = weight[c, o, a, b]` (the
    ConvTranspose2d(k=2, s=2) of `models.detector.MaskHead`), `predictor.weight [1, D, 1, 1]` ->
    `predictor.kernel [D, 1]`; biases as they are. Values are cast to the head's param dtype.

    Args:
      mask_head: `models.detector.MaskHead` (e.g. `OVDFastRCNN(..., mask_head=True).mask_head`),
        updated in place.
      arrays: `RegionCLIPWeights.mask_head`.

    Raises:
      ValueError: a missing key or a shape that does not fit this head, naming the key.
    """
    kernel = mask_head.deconv_kernel
    c, d = (int(n) for n in kernel[...].shape[2:])
    _check_mask_head(arrays, c)
    if not arrays:
        raise ValueError("the checkpoint has no roi_heads.mask_head.* weights")
    got_d = int(np.shape(arrays["deconv.weight"])[1])
    if got_d != d:
        raise ValueError(
            f"RegionCLIP checkpoint: {_MASK_HEAD}deconv.weight has {got_d} output channels, "
            f"the mask head has conv_dim {d}"
        )

    def put(var: Any, value: np.ndarray) -> None:
        var.set_value(jnp.asarray(np.asarray(value, np.float32), var[...].dtype))

    w = np.asarray(arrays["deconv.weight"], np.float32)
    put(kernel, w.transpose(2, 3, 0, 1))
    put(mask_head.deconv_bias, arrays["deconv.bias"])
    put(mask_head.predictor.kernel, np.asarray(arrays["predictor.weight"]).reshape(1, d).T)
    put(mask_head.predictor.bias, arrays["predictor.bias"])


def mask_head_arrays(mask_head: Any) -> dict[str, np.ndarray]:
    """The inverse of `load_mask_head`: our `MaskHead` -> PyTorch-layout arrays by name."""
    k = np.asarray(mask_head.deconv_kernel[...], np.float32)
    p = np.asarray(mask_head.predictor.kernel[...], np.float32)
    return {
        "deconv.weight": k.transpose(2, 3, 0, 1),
        "deconv.bias": np.asarray(mask_head.deconv_bias[...], np.float32),
        "predictor.weight": p.T.reshape(1, -1, 1, 1),
        "predictor.bias": np.asarray(mask_head.predictor.bias[...], np.float32),
    }


def regionclip_from_state_dict(
    state_dict: Mapping[str, Any],
    *,
    text_state_dict: Mapping[str, Any] | None = None,
    load_teacher: bool = True,
    dtype: Any = None,
    param_dtype: Any = None,
) -> RegionCLIPWeights:
    """Builds our model from a RegionCLIP state dict (detectron2 names, spec §7.2).

    Args:
      state_dict: RegionCLIP key -> array/tensor (e.g. `load_state_dict_file(pth)`).
      text_state_dict: an OpenAI CLIP state dict to take the text tower from when the
        checkpoint has no `lang_encoder.*` keys (ignored otherwise).
      load_teacher: also build `teacher_backbone.*` (pretraining checkpoints) as a visual tower.
      dtype, param_dtype: model compute / storage dtypes (default float32).

    Raises:
      ValueError: unknown keys, missing or unexpected backbone/text keys, wrong shapes or an
        unknown architecture, naming the offending key (RegionCLIP names).
    """
    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    clip_sd, teacher_sd, heads, mask_head, ignored = split_regionclip_state_dict(state_dict)
    if not any(k.startswith("visual.") for k in clip_sd):
        raise ValueError("no backbone.* keys: this is not a RegionCLIP detector checkpoint")
    if "text_projection" not in clip_sd:
        if text_state_dict is None:
            raise ValueError(
                "the checkpoint has no lang_encoder.* keys (text tower, e.g. "
                "'lang_encoder.text_projection'); pass the OpenAI CLIP file of the same model "
                "as the text source (Python: text_state_dict=, CLI: --text-from)"
            )
        for k, v in text_state_dict.items():
            if not k.startswith("visual.") and k not in ("logit_scale",):
                clip_sd[k] = v
    clip_sd.setdefault("logit_scale", np.asarray(math.log(1 / 0.07), np.float32))
    _check_width_keys(clip_sd)
    try:
        config = infer_config(clip_sd)
        clip = clip_from_state_dict(clip_sd, config=config, dtype=dtype, param_dtype=param_dtype)
    except ValueError as e:
        raise ValueError(_regionclip_names(str(e))) from None
    _check_heads(heads, config.embed_dim)
    _check_mask_head(mask_head, _res5_width(config))
    teacher = None
    if teacher_sd and load_teacher:
        t_sd = {**{k: v for k, v in clip_sd.items() if not k.startswith("visual.")}, **teacher_sd}
        try:
            teacher = clip_from_state_dict(
                t_sd, config=config, dtype=dtype, param_dtype=param_dtype
            ).visual
        except ValueError as e:
            msg = _regionclip_names(str(e)).replace("backbone.", "teacher_backbone.")
            raise ValueError(msg) from None
        teacher = nnx.clone(teacher)
    if ignored:
        prefixes = sorted({k.split(".")[0] for k in ignored})
        warnings.warn(
            f"RegionCLIP checkpoint: {len(ignored)} keys not loaded (under {', '.join(prefixes)}; "
            "offline RPN / non-persistent buffers)",
            stacklevel=2,
        )
    return RegionCLIPWeights(
        clip=clip, heads=heads, teacher=teacher, ignored=ignored, mask_head=mask_head
    )


def _res5_width(config: Any) -> int | None:
    """Channels of res5 (the mask head's input): 32 x the ResNet stem width; None for a ViT."""
    if not isinstance(config.vision_layers, (tuple, list)):
        return None
    return int(config.vision_width) * 32


def _check_width_keys(clip_sd: Mapping[str, Any]) -> None:
    """`infer_config` reads the ResNet width from `layer1.0.conv1`; if that one tensor has a wrong
    shape every other key would be reported. Cross-check it with the stem so the message names
    the culprit."""
    stem, first = clip_sd.get("visual.conv3.weight"), clip_sd.get("visual.layer1.0.conv1.weight")
    if stem is None or first is None:
        return
    w = int(np.shape(stem)[0])
    if tuple(np.shape(first)) != (w, w, 1, 1):
        raise ValueError(
            f"RegionCLIP checkpoint: backbone.layer1.0.conv1.weight: expected shape "
            f"{(w, w, 1, 1)} (stem width {w} from backbone.conv3.weight), found "
            f"{tuple(np.shape(first))}"
        )


def _regionclip_names(message: str) -> str:
    """Rewrites OpenAI CLIP key names in an error message into RegionCLIP's names."""
    message = re.sub(r"'visual\.", "'backbone.", message)
    message = re.sub(r"(?m)^(\s*)visual\.", r"\1backbone.", message)
    text_keys = r"(token_embedding|positional_embedding|transformer\.|ln_final|text_projection)"
    message = re.sub(rf"'{text_keys}", r"'lang_encoder.\1", message)
    message = re.sub(rf"(?m)^(\s*){text_keys}", r"\1lang_encoder.\2", message)
    return "RegionCLIP checkpoint: " + message


def load_regionclip_file(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    text_from: str | os.PathLike | None = None,
    load_teacher: bool = True,
) -> RegionCLIPWeights:
    """Reads a RegionCLIP `.pth` (detectron2 `{'model': ...}`) into `RegionCLIPWeights`.

    Args:
      trust_pickle: the released files pickle NumPy arrays; they need `trust_pickle=True`
        (only for files from a trusted source).
      text_from: OpenAI CLIP file for the text tower when the checkpoint has no `lang_encoder.*`.
    """
    sd = load_state_dict_file(path, trust_pickle=trust_pickle)
    text_sd = (
        None if text_from is None else load_state_dict_file(text_from, trust_pickle=trust_pickle)
    )
    return regionclip_from_state_dict(sd, text_state_dict=text_sd, load_teacher=load_teacher)


def pretrain_init_from_openai(state_dict: Mapping[str, Any], **kwargs: Any):
    """The pretraining initialisation (spec §7.3): student and teacher both from one OpenAI CLIP.

    Args:
      state_dict: an OpenAI CLIP state dict (`visual.*`, text names).
      **kwargs: `dtype`, `param_dtype` for `clip_from_state_dict`.

    Returns:
      `RegionCLIPWeights` with `clip` (the student: visual + text) and `teacher` (an independent
      copy of the visual tower, to be frozen), no heads.
    """
    student = clip_from_state_dict(state_dict, **kwargs)
    return RegionCLIPWeights(clip=student, heads={}, teacher=nnx.clone(student.visual))


def regionclip_to_state_dict(weights: RegionCLIPWeights) -> dict[str, np.ndarray]:
    """Inverse mapping: RegionCLIP-named PyTorch-layout arrays (backbone, lang_encoder, heads,
    teacher_backbone if present). `logit_scale` is dropped (RegionCLIP has none)."""
    out: dict[str, np.ndarray] = {}
    for k, v in clip_to_state_dict(weights.clip).items():
        if k.startswith("visual."):
            out["backbone." + k[len("visual.") :]] = v
        elif k != "logit_scale":
            out["lang_encoder." + k] = v
    for k, v in weights.heads.items():
        out[_PREDICTOR + k] = np.asarray(v)
    for k, v in weights.mask_head.items():
        out[_MASK_HEAD + k] = np.asarray(v)
    if weights.teacher is not None:
        # Variable paths of a bare visual tower are the CLIP names without the `visual.` prefix.
        for k, v in clip_to_state_dict(weights.teacher).items():
            out["teacher_backbone." + k] = v
    return out


# ------------------------------------------------------------------------------ save / load


def save_regionclip(
    weights: RegionCLIPWeights,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Saves the CLIP with `save_clip` and the predictor arrays beside it (`regionclip_heads.npz`).

    The teacher tower is not saved: it is a copy of the OpenAI CLIP the student started from and
    only matters for pretraining, which rebuilds it with `pretrain_init_from_openai`.
    """
    dest = save_clip(weights.clip, directory, overwrite=overwrite, source=source)
    if weights.heads:
        np.savez(dest / HEADS_FILE, **{k: np.asarray(v) for k, v in weights.heads.items()})
    if weights.mask_head:
        np.savez(dest / MASK_HEAD_FILE, **{k: np.asarray(v) for k, v in weights.mask_head.items()})
    meta_path = dest / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["regionclip"] = {
        "heads_file": HEADS_FILE if weights.heads else None,
        "heads": {k: list(np.shape(v)) for k, v in weights.heads.items()},
        "mask_head_file": MASK_HEAD_FILE if weights.mask_head else None,
        "mask_head": {k: list(np.shape(v)) for k, v in weights.mask_head.items()},
        "ignored_keys": len(weights.ignored),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def load_regionclip(directory: str | os.PathLike, **kwargs: Any) -> RegionCLIPWeights:
    """Loads a directory written by `save_regionclip` or `save_clip` (then `heads` is empty).

    Args:
      **kwargs: `dtype`, `param_dtype` for `load_clip`.
    """
    directory = Path(directory).expanduser()
    clip = load_clip(directory, **kwargs)
    heads: dict[str, np.ndarray] = {}
    path = directory / HEADS_FILE
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            heads = {k: z[k] for k in z.files}
        _check_heads(heads, clip.config.embed_dim)
    mask_head: dict[str, np.ndarray] = {}
    path = directory / MASK_HEAD_FILE
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            mask_head = {k: z[k] for k in z.files}
        _check_mask_head(mask_head, _res5_width(clip.config))
    return RegionCLIPWeights(clip=clip, heads=heads, mask_head=mask_head)
