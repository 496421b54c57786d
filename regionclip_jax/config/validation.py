"""Validation of a training config (run before any data is made or compiled).

`base_config()` is the full set of keys a training config may have, with defaults; experiment
files (configs/*.py) start from it (configs/common.py) and override values.
`validate(config, num_devices, num_processes)` checks
  - the keys: unknown ones (typos: `optim.lrr`, also inside nested dicts), missing ones;
  - every field's type (an int is an int, not a bool or a float; bools are bools), finiteness
    (no NaN / inf) and range (probabilities and thresholds in [0, 1], Adam betas and momentum in
    [0, 1), lr, eps and temperatures > 0, weight decay >= 0, sizes and counts positive, ...);
  - consistency: min <= max pairs, the global batch vs the data-parallel mesh size and the
    process count, decay steps in order, an image resolution the model cannot take, the context
    length vs the model's, what each mode needs (data, proposals, a ResNet CLIP), ...
and raises one `ConfigError` listing every error, one line each:
    invalid config (2 errors):
    config.optim.lr: must be a finite number > 0, got nan
    config.optim.weight_decay: must be a finite number >= 0, got -1
A check that needs a value which is already reported bad is skipped. Keys under `model.overrides`
are checked by the model's own config (CLIPConfig). Validation reads no data (only
`model.init`'s model.json when that is set), so it is cheap, has no side effects and can run
before ShapesWorld is generated.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from regionclip_jax.config.model import clip_config
from regionclip_jax.config.schema import (
    CLASS_SETS,
    DETECT_SPLITS,
    DETECT_TASKS,
    MESH_AXES,
    MODES,
    OPTIMIZERS,
    PROPOSAL_SOURCES,
    REGION_SOURCES,
    RPN_DEPTHS,
    RPN_KINDS,
    TEMPLATES,
    base_config,
)


class ConfigError(ValueError):
    """A training config is invalid.

    `errors` holds one `config.KEY: what is wrong, got VALUE` line per error; the message is a
    header line (`invalid config (N errors):`) followed by those lines.
    """

    def __init__(self, errors: str | Sequence[str]):
        self.errors = [errors] if isinstance(errors, str) else [str(e) for e in errors]
        n = len(self.errors)
        header = f"invalid config ({n} error{'' if n == 1 else 's'}):"
        super().__init__("\n".join([header, *self.errors]))


# Sub-dicts whose keys are free-form (checked elsewhere).
_FREE_FORM = ("model.overrides",)
# Keys that may be left out: a missing mesh axis has size 1.
_OPTIONAL = ("mesh.data", "mesh.fsdp", "mesh.model")
_ABSENT = object()  # a key that is missing or under a section that is not a dict (reported once)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def _show(x: Any) -> str:
    if isinstance(x, bool | np.bool_):
        return f"{x!r} (a bool)"
    if isinstance(x, list | tuple):
        return repr(tuple(x))
    return repr(x) if isinstance(x, str) or not _is_number(x) else str(x)


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _within(x: float, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (x <= lo if lo_open else x < lo):
        return False
    return not (hi is not None and (x >= hi if hi_open else x > hi))


class _Checker:
    """Collects `config.KEY: message` lines; the typed getters return None for a bad value."""

    def __init__(self, config: Any):
        self.config = config
        self.errors: list[str] = []

    def error(self, key: str, msg: str) -> None:
        self.errors.append(f"config.{key}: {msg}")

    def get(self, key: str) -> Any:
        node = self.config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict | dict) or part not in node:
                return _ABSENT
            node = node[part]
        return node

    def integer(self, key: str, lo=None, hi=None, *, choices: tuple[int, ...] = ()) -> int | None:
        x = self.get(key)
        if x is _ABSENT:
            return None
        if choices:
            if not _is_int(x) or int(x) not in choices:
                self.error(key, f"must be one of {choices}, got {_show(x)}")
                return None
            return int(x)
        if not _is_int(x) or not _within(int(x), lo, hi, False, False):
            bounds = _bounds(lo, hi, False, False)
            self.error(key, f"must be an integer {bounds}".rstrip() + f", got {_show(x)}")
            return None
        return int(x)

    def number(self, key: str, lo=None, hi=None, lo_open=False, hi_open=False) -> float | None:
        x = self.get(key)
        if x is _ABSENT:
            return None
        ok = _is_number(x) and math.isfinite(float(x))
        if not ok or not _within(float(x), lo, hi, lo_open, hi_open):
            bounds = _bounds(lo, hi, lo_open, hi_open)
            self.error(key, f"must be a finite number {bounds}".rstrip() + f", got {_show(x)}")
            return None
        return float(x)

    def boolean(self, key: str) -> bool | None:
        x = self.get(key)
        if x is _ABSENT:
            return None
        if not isinstance(x, bool | np.bool_):
            self.error(key, f"must be True or False, got {_show(x)}")
            return None
        return bool(x)

    def string(self, key: str, choices: tuple[str, ...] = ()) -> str | None:
        x = self.get(key)
        if x is _ABSENT:
            return None
        if choices and (not isinstance(x, str) or x not in choices):
            self.error(key, f"must be one of {choices}, got {_show(x)}")
            return None
        if not isinstance(x, str):
            self.error(key, f"must be a string, got {_show(x)}")
            return None
        return x

    def sequence(
        self,
        key: str,
        kind: str,
        lo=None,
        hi=None,
        lo_open=False,
        hi_open=False,
        *,
        length: int | None = None,
        min_length: int = 0,
    ) -> list | None:
        """A list/tuple of `kind` ("int" or "number") elements within the bounds."""
        x = self.get(key)
        if x is _ABSENT:
            return None
        is_elem = _is_int if kind == "int" else _is_number
        ok = isinstance(x, list | tuple) and all(
            is_elem(v) and math.isfinite(float(v)) and _within(float(v), lo, hi, lo_open, hi_open)
            for v in x
        )
        ok = ok and (len(x) == length if length is not None else len(x) >= min_length)
        if not ok:
            count = str(length) if length is not None else "one or more" if min_length else "any"
            what = "integers" if kind == "int" else "finite numbers"
            bounds = _bounds(lo, hi, lo_open, hi_open)
            self.error(
                key, f"must be a sequence of {count} {what} {bounds}".rstrip() + f", got {_show(x)}"
            )
            return None
        return [int(v) if kind == "int" else float(v) for v in x]


def _structure(ck: _Checker, config: Any, schema: Any, prefix: str = "") -> None:
    """Unknown keys (typos), missing keys and sections that are not dicts."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "typo?"
            ck.error(name, f"unknown key (not in the schema; {hint})")
    for key in schema.keys():
        name = f"{prefix}{key}"
        if key not in config:
            if name not in _OPTIONAL:
                ck.error(name, f"missing (the schema's default is {_show(schema[key])})")
            continue
        value, ref = config[key], schema[key]
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict | dict):
                ck.error(name, f"must be a dict of settings, got {_show(value)}")
            elif name not in _FREE_FORM:
                _structure(ck, value, ref, f"{name}.")


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> Any:
    """Checks `config` against the schema and itself; raises one ConfigError listing every error.

    Cheap and free of side effects: reads no data (only `model.init`'s model.json when set), so it
    can run before ShapesWorld is generated and as often as wanted.

    Args:
      config: the resolved training config.
      num_devices: devices the mesh will span (jax.device_count()).
      num_processes: jax.process_count().
    Returns:
      The model config it built and checked (`clip_config(config)`, a `CLIPConfig`): a run
      passes it on (`train.run.run_task`) instead of reading `model.init`'s model.json again.
    Raises:
      ConfigError: one line `config.KEY: what is wrong, got VALUE` per error.
    """
    ck = _Checker(config)
    if not isinstance(config, ml_collections.ConfigDict | dict):
        raise ConfigError([f"config: must be a ConfigDict, got {type(config).__name__}"])
    _structure(ck, config, base_config())
    v = _check_fields(ck)
    _check_run(ck, v, num_devices, num_processes)
    clip_cfg = _check_model(ck, v)
    mode = v.get("mode")
    if mode == "pretrain":
        _check_pretrain(ck, v, clip_cfg)
    elif mode in ("detect", "rpn"):
        _check_detect(ck, v, clip_cfg)
    elif mode == "clip":
        _check_clip(ck, v, clip_cfg)
    if ck.errors:
        raise ConfigError(ck.errors)
    return clip_cfg


def _check_fields(ck: _Checker) -> dict[str, Any]:
    """Type, finiteness and range of every field; returns {key: value or None when bad}."""
    v: dict[str, Any] = {}
    integer, number, boolean, string, seq = (
        ck.integer,
        ck.number,
        ck.boolean,
        ck.string,
        ck.sequence,
    )

    def prob(key: str) -> float | None:  # a probability or an IoU / score threshold
        return number(key, 0, 1)

    # Run.
    v["mode"] = string("mode", MODES)
    v["seed"] = integer("seed", 0)
    v["total_steps"] = integer("total_steps", 1)
    v["log_every"] = integer("log_every", 1)
    v["checkpoint_every"] = integer("checkpoint_every", 0)  # 0: only at the end
    # The restore fallback to the previous checkpoint needs two kept.
    v["keep_checkpoints"] = integer("keep_checkpoints", 2)
    boolean("async_checkpointing")
    integer("eval_every", 0)

    # Model (CLIPConfig fields: checked by building it in _check_model).
    for key in ("model.preset", "model.init"):
        v[key] = string(key)
    v["model.dtype"] = string("model.dtype", ("float32", "bfloat16"))

    # Data.
    for key in ("data.train", "data.val", "data.shapesworld.dir"):
        v[key] = string(key)
    sw = "data.shapesworld."
    integer(sw + "num_train", 0)
    integer(sw + "num_val", 0)
    integer(sw + "seed", 0)
    integer(sw + "image_size", 32)  # ShapesWorldConfig's minimum
    lo_obj = integer(sw + "min_objects", 1)
    hi_obj = integer(sw + "max_objects", 1)
    if lo_obj is not None and hi_obj is not None and lo_obj > hi_obj:
        ck.error(sw + "max_objects", f"must be >= min_objects ({lo_obj}), got {hi_obj}")
    for key in ("small_size", "large_size"):
        pair = seq(sw + key, "number", 0, 1, lo_open=True, length=2)
        if pair is not None and pair[0] > pair[1]:
            ck.error(sw + key, f"must be (min, max) with min <= max, got {tuple(pair)}")
    prob(sw + "color_mention")
    prob(sw + "size_mention")
    integer(sw + "max_mentions", 1)
    number(sw + "train_novel_weight", 0)
    v["data.batch_size"] = integer("data.batch_size", 1)
    min_size = integer("data.min_size", 1)
    max_size = v["data.max_size"] = integer("data.max_size", 0)  # 0: no cap on the longer side
    if min_size is not None and max_size and max_size < min_size:
        ck.error(
            "data.max_size", f"must be 0 (no cap) or >= data.min_size ({min_size}), got {max_size}"
        )
    v["data.canvas"] = seq("data.canvas", "int", 1, length=2)
    boolean("data.flip")
    integer("data.num_workers", 0)
    v["data.context_length"] = integer("data.context_length", 2)  # start and end tokens

    # Loss.
    boolean("loss.learn_temperature")
    number("loss.temperature", 0, lo_open=True)
    number("loss.max_logit_scale", 0, lo_open=True)

    # Optimiser.
    string("optim.name", OPTIMIZERS)
    number("optim.lr", 0, lo_open=True)
    number("optim.momentum", 0, 1, hi_open=True)
    number("optim.beta1", 0, 1, hi_open=True)
    number("optim.beta2", 0, 1, hi_open=True)
    number("optim.eps", 0, lo_open=True)
    number("optim.weight_decay", 0)
    integer("optim.decay_min_ndim", 0)
    integer("optim.warmup_steps", 0)
    number("optim.warmup_factor", 0, 1)  # the lr factor at step 0, rising linearly to 1
    steps = seq("optim.decay_steps", "int", 1)
    if steps is not None and steps != sorted(steps):
        ck.error("optim.decay_steps", f"must be increasing steps, got {tuple(steps)}")
    number("optim.decay_factor", 0, 1, lo_open=True)
    number("optim.clip_grad_norm", 0)  # 0 disables
    _check_patterns(ck, "optim.freeze")

    # Mode `pretrain`.
    p = "pretrain."
    v[p + "regions"] = string(p + "regions", REGION_SOURCES)
    integer(p + "num_regions", 1)
    lo = number(p + "random_min_frac", 0, 1, lo_open=True)
    hi = number(p + "random_max_frac", 0, 1, lo_open=True)
    if lo is not None and hi is not None and lo > hi:
        ck.error(p + "random_min_frac", f"must be <= random_max_frac ({hi}), got {lo}")
    string(p + "concepts")
    integer(p + "concept_min_count", 1)
    string(p + "templates", TEMPLATES)
    number(p + "temperature", 0, lo_open=True)
    number(p + "teacher_temperature", 0, lo_open=True)
    number(p + "threshold", 0, 1, hi_open=True)
    v[p + "group_size"] = integer(p + "group_size", 0)  # 0: the whole batch
    seq(p + "loss_weights", "number", 0, length=3)
    integer(p + "freeze_at", 0, 5)
    integer(p + "pooler_resolution", 0)  # 0: 2 x input_resolution / 32

    # Modes `detect` and `rpn`.
    t = "detect."
    v[t + "task"] = string(t + "task", DETECT_TASKS)
    for key in ("train_json", "val_json", "image_root", "val_image_root"):
        v[t + key] = string(t + key)
    for key in ("train_embeddings", "test_embeddings", "rpn_init"):
        v[t + key] = string(t + key)
    string(t + "split", DETECT_SPLITS)
    string(t + "train_classes", CLASS_SETS)
    string(t + "templates", TEMPLATES)
    v[t + "proposals"] = string(t + "proposals", PROPOSAL_SOURCES)
    integer(t + "rois_per_image", 1)
    number(t + "positive_fraction", 0, 1, lo_open=True)
    prob(t + "iou_threshold")
    number(t + "bg_weight")  # < 0: the task's default
    v[t + "focal_gamma"] = number(t + "focal_gamma")  # < 0: the task's default
    number(t + "temperature", 0, lo_open=True)
    boolean(t + "mask_on")
    number(t + "mask_scale", 0, 1, lo_open=True)
    integer(t + "freeze_at", 0, 5)
    integer(t + "pooler_resolution", 0)
    integer(t + "max_boxes", 1)
    v[t + "train_sizes"] = seq(t + "train_sizes", "int", 1, min_length=1)
    v[t + "test_size"] = integer(t + "test_size", 1)
    prob(t + "repeat_threshold")  # 0: off
    integer(t + "eval_batch_size", 1)
    v[t + "eval_only"] = boolean(t + "eval_only")
    prob(t + "score_thresh")
    prob(t + "nms_thresh")
    boolean(t + "soft_nms")
    integer(t + "topk", 1)
    integer(t + "max_candidates", 1)
    boolean(t + "multiply_rpn_score")
    boolean(t + "apply_deltas")
    integer(t + "max_eval_images", 0)  # 0: all

    r = "rpn."
    v[r + "kind"] = string(r + "kind", RPN_KINDS)
    integer(r + "pre_nms_topk", 1)
    integer(r + "post_nms_topk", 1)
    prob(r + "nms_thresh")
    string(r + "init")
    integer(r + "depth", choices=RPN_DEPTHS)
    integer(r + "base_width", 1)
    seq(r + "anchor_sizes", "number", 0, lo_open=True, min_length=1)
    seq(r + "aspect_ratios", "number", 0, lo_open=True, min_length=1)
    integer(r + "freeze_at", 0, 5)
    string(r + "train_classes", CLASS_SETS)

    integer("debug.nan_at_step", 0)  # 0: off
    number("debug.step_sleep", 0)
    boolean("debug.print_memory")
    integer("debug.fail_at_step", 0)  # 0: off
    integer("debug.fail_process", 0)
    return v


def _check_patterns(ck: _Checker, key: str) -> None:
    patterns = ck.get(key)
    if patterns is _ABSENT:
        return
    if not isinstance(patterns, list | tuple) or not all(isinstance(x, str) for x in patterns):
        ck.error(key, f"must be a sequence of regex strings, got {_show(patterns)}")
        return
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            ck.error(key, f"bad regex {pattern!r}: {e}")


def _check_run(ck: _Checker, v: dict[str, Any], num_devices: int, num_processes: int) -> None:
    """Mesh vs devices, global batch vs mesh and processes, logical-axis rules."""
    mesh = ck.get("mesh")
    batch = v["data.batch_size"]
    if isinstance(mesh, ml_collections.ConfigDict | dict):
        sizes = {}
        for axis in mesh:
            if axis not in MESH_AXES:
                continue  # an unknown key (_structure)
            size = ck.integer(f"mesh.{axis}")
            if size is not None and (size == 0 or size < -1):
                ck.error(f"mesh.{axis}", f"must be an integer >= 1 or -1 (the rest), got {size}")
                size = None
            sizes[axis] = size
        if None not in sizes.values():
            known = math.prod(s for s in sizes.values() if s != -1)
            full = {a: (num_devices // known if s == -1 else s) for a, s in sizes.items()}
            if list(sizes.values()).count(-1) > 1:
                ck.error("mesh", f"at most one axis may be -1, got {sizes}")
            elif num_devices % known:
                ck.error("mesh", f"{sizes} does not fit {num_devices} devices")
            elif math.prod(full.values()) != num_devices:
                ck.error(
                    "mesh", f"{sizes} needs {math.prod(full.values())} devices, have {num_devices}"
                )
            elif batch is not None:
                data_par = full.get("data", 1) * full.get("fsdp", 1)
                if batch % data_par:
                    ck.error(
                        "data.batch_size",
                        f"global batch {batch} is not divisible by the data-parallel size "
                        f"data x fsdp = {data_par} (mesh {full})",
                    )
    if batch is not None and batch % num_processes:
        ck.error(
            "data.batch_size", f"global batch {batch} not divisible by {num_processes} processes"
        )
    rules = ck.get("axis_rules")
    if rules is not _ABSENT:
        if not isinstance(rules, list | tuple):
            ck.error(
                "axis_rules",
                f"must be a sequence of (logical name, mesh axes) pairs, got {_show(rules)}",
            )
            return
        for pair in rules:
            axes = pair[1] if isinstance(pair, list | tuple) and len(pair) == 2 else None
            axes = (axes,) if axes is None or isinstance(axes, str) else axes
            ok = (
                isinstance(pair, list | tuple)
                and len(pair) == 2
                and isinstance(pair[0], str)
                and isinstance(axes, list | tuple)
                and all(a is None or a in MESH_AXES for a in axes)
            )
            if not ok:
                ck.error(
                    "axis_rules",
                    f"entries must be (logical name, mesh axes) pairs with axes None or among "
                    f"{MESH_AXES}, got {_show(pair)}",
                )


def _check_model(ck: _Checker, v: dict[str, Any]) -> Any:
    """Builds the CLIPConfig (so a bad field fails before any compile); None if it cannot be."""
    preset, init = v["model.preset"], v["model.init"]
    overrides = ck.get("model.overrides")
    if (
        preset is None
        or init is None
        or not isinstance(overrides, ml_collections.ConfigDict | dict)
    ):
        return None  # reported already
    if init:
        if preset or dict(overrides):
            ck.error(
                "model.init", "fixes the architecture: leave model.preset and model.overrides empty"
            )
            return None
        if not os.path.exists(os.path.join(init, "model.json")):
            ck.error(
                "model.init",
                f"{os.path.join(init, 'model.json')} not found: convert weights with "
                "`regionclip-jax convert` or train mode 'clip' (it exports WORKDIR/export)",
            )
            return None
    try:
        clip_cfg = clip_config(ck.config)
    except Exception as e:  # any failure to build it is a config error
        ck.error("model", f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))
        return None
    res = clip_cfg.image_resolution
    if clip_cfg.is_resnet and res % 32:
        ck.error("model.overrides.image_resolution", f"a ResNet needs a multiple of 32, got {res}")
    length = v["data.context_length"]
    if length is not None and length > clip_cfg.context_length:
        ck.error(
            "data.context_length", f"{length} > model context_length {clip_cfg.context_length}"
        )
    return clip_cfg


def _check_train_data(ck: _Checker, v: dict[str, Any]) -> None:
    train, sw_dir = v["data.train"], v["data.shapesworld.dir"]
    if train == "" and sw_dir == "":
        ck.error("data.train", "set data.train (shards) or data.shapesworld.dir (generated)")


def _check_clip(ck: _Checker, v: dict[str, Any], clip_cfg: Any) -> None:
    _check_train_data(ck, v)
    canvas = v["data.canvas"]
    if clip_cfg is not None and canvas is not None:
        res = clip_cfg.image_resolution
        if tuple(canvas) != (res, res):
            ck.error(
                "data.canvas",
                f"CLIP training feeds whole canvases to the model: canvas {tuple(canvas)} must be "
                f"({res}, {res}) = model image_resolution",
            )


def _check_pretrain(ck: _Checker, v: dict[str, Any], clip_cfg: Any) -> None:
    _check_train_data(ck, v)
    if clip_cfg is not None and not clip_cfg.is_resnet:
        ck.error(
            "model", "mode 'pretrain' needs a ModifiedResNet CLIP (res5 + attnpool region head)"
        )
    group, batch = v["pretrain.group_size"], v["data.batch_size"]
    if group and batch is not None and batch % group:
        ck.error(
            "pretrain.group_size", f"must be 0 or divide the global batch {batch}, got {group}"
        )


def _check_detect(ck: _Checker, v: dict[str, Any], clip_cfg: Any) -> None:
    mode, t = v["mode"], "detect."
    eval_only, proposals = v[t + "eval_only"], v[t + "proposals"]
    train, val, sw_dir = v["data.train"], v["data.val"], v["data.shapesworld.dir"]
    train_json, val_json = v[t + "train_json"], v[t + "val_json"]
    if None not in (train, train_json, sw_dir, eval_only):
        if not (train or train_json or sw_dir) and not (mode == "detect" and eval_only):
            ck.error(
                t + "train_json", "set detect.train_json (COCO-format json) or data.train shards"
            )
    if mode == "detect" and None not in (val, val_json, sw_dir) and not (val or val_json or sw_dir):
        ck.error(t + "val_json", "set detect.val_json (COCO-format json of the evaluation set)")
    if mode == "detect" and proposals == "rpn" and v[t + "rpn_init"] == "":
        ck.error(t + "rpn_init", "proposals='rpn' needs an RPN: an `rpn` workdir or a .pth")
    if proposals == "gt" and eval_only is False:
        ck.error(t + "proposals", "'gt' proposals are for zero-shot evaluation (eval_only)")
    canvas, sizes, test_size = v["data.canvas"], v[t + "train_sizes"], v[t + "test_size"]
    if canvas is not None:
        if sizes is not None and test_size is not None and v["data.max_size"] == 0:
            longest = max([*sizes, test_size])
            if longest > min(canvas):
                ck.error(
                    "data.canvas",
                    f"{tuple(canvas)} cannot hold a {longest}-pixel side: set data.max_size",
                )
        if max(canvas) % 32:
            ck.error(
                "data.canvas",
                f"must be multiples of 32 (RoI features at stride 16), got {tuple(canvas)}",
            )
    gamma = v[t + "focal_gamma"]
    if v[t + "task"] == "lvis" and gamma is not None and gamma >= 0:
        ck.error(t + "focal_gamma", f"LVIS has no focal scaling (leave it < 0), got {gamma}")
    needs_resnet = mode == "detect" or v["rpn.kind"] == "clip"
    if clip_cfg is not None and not clip_cfg.is_resnet and needs_resnet:
        ck.error("model", "the detector's region head is res5 + attnpool: needs a ResNet CLIP")
