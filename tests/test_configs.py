"""Experiment configs and their validation: every config resolves and validates; unknown keys and
inconsistent values fail before anything is compiled, with a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from helpers import config_module

from regionclip_jax import config as config_lib
from regionclip_jax.config import ConfigError, validate
from regionclip_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    "clip_shapesworld",
    "pretrain_shapesworld",
    "pretrain_rn50_cc3m",
    "pretrain_rn50x4_cc3m",
    "rpn_shapesworld",
    "detect_shapesworld",
    "ovd_coco_rn50",
    "ovd_coco_rn50x4",
    "ovd_lvis_rn50x4",
    "coco80_rn50",
    "zeroshot_coco",
    "zeroshot_lvis",
]


def _load(name: str):
    # configs/ is the package regionclip_jax.configs (pyproject.toml `package-dir`).
    return config_module(name)


def test_every_config_file_is_listed():
    files = {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__", "common"}
    assert files == set(CONFIGS) | {"detect_custom"}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_configs_resolve_and_validate(name, arg):
    module = _load(name)
    cfg = module.get_config(arg)
    assert "python -m regionclip_jax.main --config=configs/" in module.__doc__
    assert cfg.is_locked
    if cfg.model.init and not os.path.exists(cfg.model.init):
        # Starts from a checkpoint the user makes first: validation says which and how.
        with pytest.raises(ConfigError, match=r"config\.model\.init: .*model\.json not found"):
            validate(cfg, num_devices=1)
        return
    validate(cfg, num_devices=1)
    validate(cfg, num_devices=8 if cfg.data.batch_size % 8 == 0 else 2)


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_is_small(name):
    full, local = _load(name).get_config(), _load(name).get_config("runlocal")
    if full.get("detect") and full.detect.eval_only:
        pytest.skip("no training (test_runlocal_is_small_for_eval_only_configs)")
    assert local.total_steps < full.total_steps and local.data.batch_size < full.data.batch_size


@pytest.mark.parametrize(
    "name, preset", [("pretrain_rn50_cc3m", "RN50"), ("pretrain_rn50x4_cc3m", "RN50x4")]
)
def test_cc3m_configs_are_the_papers_recipe_and_scale_with_the_batch(name, preset):
    c = _load(name).get_config()
    assert c.mode == "pretrain" and c.data.batch_size == 96
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
        "sgd",
        0.002,
        0.9,
        1e-4,
    )
    assert c.total_steps == 600_000 and tuple(c.optim.decay_steps) == (300_000, 525_000)
    assert (c.optim.warmup_steps, c.optim.warmup_factor, c.optim.clip_grad_norm) == (
        1000,
        0.001,
        5.0,
    )
    assert (c.data.min_size, c.data.max_size) == (800, 1333) and c.data.flip
    assert (c.pretrain.regions, c.pretrain.num_regions, c.pretrain.group_size) == (
        "proposals",
        100,
        3,
    )
    assert (c.pretrain.threshold, c.pretrain.temperature, c.pretrain.freeze_at) == (0.1, 0.01, 2)
    assert c.pretrain.pooler_resolution == {"RN50": 14, "RN50x4": 18}[preset]
    assert "4764" in c.pretrain.concepts
    big = _load(name).get_config("batch=384")
    assert big.optim.lr == pytest.approx(0.002 * 384 / 96)
    assert big.total_steps == 150_000 and tuple(big.optim.decay_steps) == (75_000, 131_250)
    assert _load(name).get_config("runlocal").model.preset == preset


def test_config_args_are_parsed_and_unknown_args_fail():
    cfg = _load("clip_shapesworld").get_config("res=96,steps=30,batch=16")
    assert cfg.data.canvas == (96, 96) and cfg.model.overrides.image_resolution == 96
    assert cfg.total_steps == 30 and cfg.data.batch_size == 16
    assert cfg.optim.lr == pytest.approx(1e-3 * 16 / 64)  # the linear LR-scaling rule
    with pytest.raises(ValueError, match="'reslution'"):
        _load("clip_shapesworld").get_config("reslution=96")


def _base():
    cfg = _load("clip_shapesworld").get_config("runlocal")
    cfg.unlock()
    return cfg


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c.optim.__setitem__("lrr", 0.1), "optim.lrr"),
        (lambda c: c.__setitem__("totl_steps", 3), "totl_steps"),
        (lambda c: c.data.shapesworld.__setitem__("num_trian", 3), "data.shapesworld.num_trian"),
        (lambda c: c.__setitem__("mode", "detection"), "mode"),
        (lambda c: c.optim.__setitem__("name", "lamb"), "optim.name"),
        (lambda c: c.optim.__setitem__("decay_steps", (20, 10)), "optim.decay_steps"),
        (lambda c: c.optim.__setitem__("freeze", ("visual/(",)), "optim.freeze"),
        (lambda c: c.data.__setitem__("canvas", (96, 96)), "data.canvas"),
        (
            lambda c: c.model.overrides.__setitem__("image_resolution", 80),
            "model.overrides.image_resolution",
        ),
        (lambda c: c.model.overrides.__setitem__("vision_widht", 8), "model"),
        (lambda c: c.mesh.__setitem__("data", 3), "mesh"),
        (lambda c: c.mesh.__setitem__("pipeline", 1), "mesh.pipeline"),
        (lambda c: c.data.__setitem__("context_length", 0), "data.context_length"),
        (lambda c: c.data.__setitem__("context_length", 1), "data.context_length"),
    ],
)
def test_bad_configs_name_the_key(edit, key):
    cfg = _base()
    edit(cfg)
    with pytest.raises(ConfigError, match=f"config\\.{key}"):
        validate(cfg, num_devices=4)


def test_batch_not_divisible_by_data_axis_fails_naming_the_key():
    cfg = _base()
    cfg.data.batch_size = 6
    cfg.mesh.update(data=4, fsdp=1)
    with pytest.raises(ConfigError, match=r"config\.data\.batch_size.*data x fsdp = 4"):
        validate(cfg, num_devices=4)
    cfg.mesh.update(data=2, fsdp=2)
    with pytest.raises(ConfigError, match=r"config\.data\.batch_size"):
        validate(cfg, num_devices=4)
    cfg.data.batch_size = 8
    validate(cfg, num_devices=4)


class _NoCompileTask:
    """A task that fails the test if the loop gets as far as building or compiling anything."""

    def build_model(self, rngs):
        raise AssertionError("model built before the config was validated")

    def dataset(self, *a):
        raise AssertionError("data opened before the config was validated")

    batch_spec = loss = dataset


def test_train_validates_before_any_compile(tmp_path):
    cfg = _base()
    cfg.data.batch_size = 3
    cfg.mesh.update(data=1, fsdp=1)
    validate(cfg, num_devices=1)  # valid on one device...
    cfg.optim.momentum_typo = 0.9  # ...but not with an unknown key
    with pytest.raises(ConfigError, match=r"config\.optim\.momentum_typo"):
        loop.train(cfg, str(tmp_path), _NoCompileTask())
    assert not (tmp_path / "checkpoints").exists()


def test_command_line_override_of_unknown_key_fails_naming_it(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "regionclip_jax.main",
            "--config=configs/clip_shapesworld.py:runlocal",
            f"--workdir={tmp_path}",
            "--config.optim.lrr=0.1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "config.optim.lrr: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_schema_matches_validation():
    # Every key of the schema validates (no key the validator forgets to allow).
    cfg = config_lib.base_config()
    cfg.data.train = "/nonexistent"
    cfg.model.overrides = ml_collections.ConfigDict(
        _load("common").tiny_clip_model(resolution=128, context_length=77)
    )
    validate(cfg, num_devices=1)


def test_runlocal_is_small_for_eval_only_configs():
    for name in ("zeroshot_coco", "zeroshot_lvis"):
        local = _load(name).get_config("runlocal")
        assert local.detect.eval_only and local.data.shapesworld.num_val <= 16


@pytest.mark.parametrize(
    "name, task, steps, decay",
    [
        ("ovd_coco_rn50", "coco", 90_000, (60_000, 80_000)),
        ("ovd_lvis_rn50x4", "lvis", 180_000, (120_000, 160_000)),
    ],
)
def test_detection_configs_are_the_papers_schedule_and_scale_with_the_batch(
    name, task, steps, decay
):
    c = _load(name).get_config()
    assert (c.data.batch_size, c.total_steps, c.optim.lr) == (16, steps, 0.002)
    assert tuple(c.optim.decay_steps) == decay and c.optim.warmup_steps == 5000
    assert c.detect.task == task and c.detect.rois_per_image == 512
    assert c.detect.positive_fraction == 0.25 and c.detect.temperature == 0.01
    big = _load(name).get_config("batch=64")
    assert big.optim.lr == pytest.approx(0.008) and big.total_steps == steps // 4
    assert tuple(big.optim.decay_steps) == tuple(d // 4 for d in decay)


def test_shapesworld_uses_one_temperature_everywhere_as_the_paper():
    # The paper: τ 0.01 in pretraining, fine-tuning and zero-shot inference; ShapesWorld: its own τ.
    tau = _load("pretrain_shapesworld").get_config().pretrain.temperature
    assert tau == _load("pretrain_shapesworld").get_config().pretrain.teacher_temperature
    assert _load("detect_shapesworld").get_config().detect.temperature == tau
    assert _load("detect_shapesworld").get_config("zeroshot").detect.temperature == tau
    assert _load("detect_shapesworld").get_config("tau=0.01").detect.temperature == 0.01


def test_custom_detection_config_needs_only_the_json(tmp_path):
    c = _load("detect_custom").get_config()
    with pytest.raises(ConfigError, match=r"detect\.train_json"):
        validate(c, num_devices=1)
    c = _load("detect_custom").get_config(f"json={tmp_path / 'a.json'}")
    assert c.detect.train_json == c.detect.val_json == str(tmp_path / "a.json")
    # What is left to provide is the model (a converted checkpoint), not more paths.
    with pytest.raises(ConfigError, match=r"config\.model\.init"):
        validate(c, num_devices=1)


# ---------------------------------------------------------------------------------------------
# Every field: type, finiteness and range; all errors at once, one line each.


def _edited(edits: dict) -> ml_collections.ConfigDict:
    """clip_shapesworld:runlocal with dotted keys set in its dict form (no ConfigDict type checks:
    the route of a config file that returns a plain dict, or of a command-line override)."""
    d = _base().to_dict()
    for key, value in edits.items():
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict(d)


NAN, INF = float("nan"), float("inf")

BAD_FIELDS = [
    # NaN: passes every `<= 0` / `< 0` test.
    ("optim.lr", NAN, "a finite number > 0"),
    ("optim.momentum", NAN, "a finite number in [0, 1)"),
    ("optim.eps", NAN, "a finite number > 0"),
    ("optim.weight_decay", NAN, "a finite number >= 0"),
    ("optim.clip_grad_norm", NAN, "a finite number >= 0"),
    ("loss.temperature", NAN, "a finite number > 0"),
    ("pretrain.temperature", NAN, "a finite number > 0"),
    ("pretrain.teacher_temperature", NAN, "a finite number > 0"),
    ("detect.temperature", NAN, "a finite number > 0"),
    ("detect.score_thresh", NAN, "a finite number in [0, 1]"),
    ("data.shapesworld.color_mention", NAN, "a finite number in [0, 1]"),
    ("pretrain.loss_weights", (1.0, NAN, 1.0), "3 finite numbers >= 0"),
    # inf.
    ("optim.lr", INF, "a finite number > 0"),
    ("optim.lr", -INF, "a finite number > 0"),
    ("optim.weight_decay", INF, "a finite number >= 0"),
    ("optim.beta1", INF, "a finite number in [0, 1)"),
    ("optim.clip_grad_norm", INF, "a finite number >= 0"),
    ("loss.max_logit_scale", INF, "a finite number > 0"),
    ("debug.step_sleep", INF, "a finite number >= 0"),
    ("rpn.anchor_sizes", (32.0, INF), "finite numbers > 0"),
    # Negative, zero or out of range.
    ("optim.weight_decay", -1.0, "a finite number >= 0"),
    ("optim.momentum", -0.1, "a finite number in [0, 1)"),
    ("optim.momentum", 1.0, "a finite number in [0, 1)"),
    ("optim.beta2", 1.0, "a finite number in [0, 1)"),
    ("optim.eps", 0.0, "a finite number > 0"),
    ("optim.warmup_factor", -0.1, "a finite number in [0, 1]"),
    ("optim.decay_factor", 0.0, "a finite number in (0, 1]"),
    ("detect.nms_thresh", -0.5, "a finite number in [0, 1]"),
    ("detect.score_thresh", 1.5, "a finite number in [0, 1]"),
    ("data.shapesworld.size_mention", 1.5, "a finite number in [0, 1]"),
    ("data.num_workers", -1, "an integer >= 0"),
    ("seed", -1, "an integer >= 0"),
    ("eval_every", -1, "an integer >= 0"),
    ("pretrain.num_regions", 0, "an integer >= 1"),
    ("detect.rois_per_image", 0, "an integer >= 1"),
    ("keep_checkpoints", 1, "an integer >= 2"),
    ("rpn.depth", 34, "one of (50, 101, 152)"),
    ("data.shapesworld.image_size", 16, "an integer >= 32"),
    ("data.max_size", 32, "0 (no cap) or >= data.min_size (64)"),
    ("data.shapesworld.max_objects", 0, "an integer >= 1"),
    ("data.shapesworld.small_size", (0.3, 0.2), "min <= max"),
    ("pretrain.random_max_frac", 1.5, "a finite number in (0, 1]"),
    # Wrong type: a bool is not an int, a float not an int, a string not a number.
    ("total_steps", True, "an integer >= 1, got True (a bool)"),
    ("data.batch_size", 8.0, "an integer >= 1"),
    ("optim.lr", "0.1", "a finite number > 0, got '0.1'"),
    ("optim.momentum", None, "a finite number in [0, 1)"),
    ("data.flip", 1, "True or False"),
    ("loss.learn_temperature", "yes", "True or False"),
    ("data.canvas", (64, 64.5), "2 integers >= 1"),
    ("optim.freeze", r"^visual/", "a sequence of regex strings"),
    ("model.dtype", "float16", "one of ('float32', 'bfloat16')"),
    ("data.train", 3, "a string"),
]


@pytest.mark.parametrize(
    "key, value, expect", BAD_FIELDS, ids=[f"{k}={v!r}" for k, v, _ in BAD_FIELDS]
)
def test_bad_field_fails_with_one_line_naming_the_key(key, value, expect):
    with pytest.raises(ConfigError) as info:
        validate(_edited({key: value}), num_devices=1)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config (1 error):"
    assert len(lines) == 2 and lines[1].startswith(f"config.{key}: "), lines
    assert expect in lines[1]
    assert info.value.errors == lines[1:]


def test_error_line_form():
    with pytest.raises(ConfigError) as info:
        validate(_edited({"optim.lr": NAN}), num_devices=1)
    assert (
        str(info.value).splitlines()[1] == "config.optim.lr: must be a finite number > 0, got nan"
    )
    assert isinstance(info.value, ValueError)


def test_all_errors_at_once_one_line_each():
    edits = {
        "optim.lr": NAN,
        "optim.weight_decay": -1.0,
        "optim.beta2": INF,
        "keep_checkpoints": 1,
        "data.flip": "no",
        "detect.temperature": 0.0,
        "pretrain.threshold": 1.0,
        "rpn.aspect_ratios": (),
    }
    cfg = _edited(edits)
    cfg.optim.lrr = 0.1  # and an unknown key
    with pytest.raises(ConfigError) as info:
        validate(cfg, num_devices=1)
    header, *lines = str(info.value).splitlines()
    keys = [*edits, "optim.lrr"]
    assert header == f"invalid config ({len(keys)} errors):"
    assert sorted(line.split(":")[0] for line in lines) == sorted(f"config.{k}" for k in keys)
    assert "config.optim.lrr: unknown key (not in the schema; did you mean 'lr'?)" in lines


def test_checks_that_need_a_bad_value_are_skipped_not_crashed():
    # The model cannot be built: its context length / resolution checks are skipped.
    cfg = _edited({"data.context_length": 1000})
    cfg.model.overrides.vision_widht = 8
    with pytest.raises(ConfigError) as info:
        validate(cfg, num_devices=1)
    assert [e.split(":")[0] for e in info.value.errors] == ["config.model"]
    # Values of the wrong type that later cross-field checks use.
    bad = {
        "data.context_length": "77",
        "data.batch_size": "32",
        "mesh.data": "all",
        "data.canvas": None,
        "pretrain.group_size": None,
        "optim.decay_steps": None,
        "data.shapesworld.min_objects": None,
        "pretrain.random_min_frac": "0.1",
    }
    with pytest.raises(ConfigError) as info:
        validate(_edited(bad), num_devices=4)
    assert sorted(e.split(":")[0] for e in info.value.errors) == sorted(f"config.{k}" for k in bad)
    # A section that is not a dict; a missing key.
    d = _base().to_dict()
    d["optim"] = 3
    del d["debug"]["step_sleep"]
    with pytest.raises(ConfigError) as info:
        validate(ml_collections.ConfigDict(d), num_devices=1)
    assert sorted(e.split(":")[0] for e in info.value.errors) == [
        "config.debug.step_sleep",
        "config.optim",
    ]


def test_ordered_pairs():
    with pytest.raises(ConfigError, match=r"config\.data\.shapesworld\.max_objects: .*>= min_obj"):
        validate(_edited({"data.shapesworld.min_objects": 3, "data.shapesworld.max_objects": 2}), 1)
    with pytest.raises(ConfigError, match=r"config\.pretrain\.random_min_frac: .*<= random_max"):
        validate(_edited({"pretrain.random_min_frac": 0.5, "pretrain.random_max_frac": 0.4}), 1)


def test_a_mesh_axis_may_be_left_out():
    cfg = _base()
    cfg.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 2})
    validate(cfg, num_devices=4)


def test_validation_is_cheap_idempotent_and_needs_no_generated_data(tmp_path):
    # ShapesWorld is generated by the run into data.shapesworld.dir: validation runs before it.
    cfg = _base()
    cfg.data.shapesworld.dir = str(tmp_path / "not_generated_yet")
    cfg.data.train = cfg.data.val = ""
    before = cfg.to_dict()
    for _ in range(2):
        validate(cfg, num_devices=1)
    assert cfg.to_dict() == before and not (tmp_path / "not_generated_yet").exists()


def test_main_exits_2_with_the_errors_before_generating_data(tmp_path):
    sw = tmp_path / "sw"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "regionclip_jax.main",
            "--config=configs/clip_shapesworld.py:runlocal",
            f"--workdir={tmp_path / 'work'}",
            f"--config.data.shapesworld.dir={sw}",
            "--config.optim.lr=nan",
            "--config.optim.weight_decay=-1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config.")]
    assert errors == [
        "config.optim.lr: must be a finite number > 0, got nan",
        "config.optim.weight_decay: must be a finite number >= 0, got -1.0",
    ]
    assert "invalid config (2 errors):" in proc.stderr
    assert not sw.exists() and not (tmp_path / "work" / "checkpoints").exists()
