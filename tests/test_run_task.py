"""The run lifecycle every mode shares (`train.run.run_task`): the config is validated once,
before any side effect, and the model config is built once and passed on."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import experiment_config

from regionclip_jax import config as config_lib
from regionclip_jax.config import model as model_config_lib
from regionclip_jax.config import validation
from regionclip_jax.train import (
    clip_trainer,
    detection_trainer,
    loop,
    pretrain_trainer,
    rpn_trainer,
)
from regionclip_jax.train import run as run_lib

REPO = Path(__file__).resolve().parents[1]

# mode -> (config file, its runlocal argument, the trainer's `run`)
MODES = {
    "clip": ("clip_shapesworld", "runlocal", clip_trainer.run),
    "pretrain": ("pretrain_shapesworld", "runlocal", pretrain_trainer.run),
    "detect": ("detect_shapesworld", "runlocal", detection_trainer.run),
    "rpn": ("rpn_shapesworld", "runlocal", rpn_trainer.run),
    "zeroshot": ("zeroshot_coco", "proposals=gt,runlocal", detection_trainer.run),
}


def _config(name: str, arg: str, data_dir: Path):
    cfg = experiment_config(name, arg)
    with cfg.unlocked():
        cfg.data.shapesworld.dir = str(data_dir)
        cfg.data.shapesworld.num_train = 8
        cfg.data.shapesworld.num_val = 4
    return cfg


class _Stop(Exception):
    """Raised where the run would start compiling (or evaluating): the lifecycle got there."""


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_mode_validates_once_and_builds_the_model_config_once(mode, tmp_path, monkeypatch):
    name, arg, run = MODES[mode]
    calls = {"validate": 0, "clip_config": 0}
    real_validate, real_clip_config = config_lib.validate, model_config_lib.clip_config

    def counting_validate(*args, **kwargs):
        calls["validate"] += 1
        return real_validate(*args, **kwargs)

    def counting_clip_config(*args, **kwargs):
        calls["clip_config"] += 1
        return real_clip_config(*args, **kwargs)

    monkeypatch.setattr(config_lib, "validate", counting_validate)
    # Every name the model config is built through: validation's, rpn_arch's, the tasks'.
    for module in (config_lib, model_config_lib, validation):
        monkeypatch.setattr(module, "clip_config", counting_clip_config)

    monkeypatch.setattr(loop, "build_step", _stop)  # the loop's first step after validation
    monkeypatch.setattr(run_lib, "_evaluate_untrained", _stop)  # zero-shot: no loop
    with pytest.raises(_Stop):
        run(_config(name, arg, tmp_path / "sw"), str(tmp_path / "work"))
    assert calls == {"validate": 1, "clip_config": 1}


@pytest.mark.parametrize("mode", ["clip", "pretrain", "detect", "rpn"])
def test_an_invalid_config_fails_before_any_data_is_generated(mode, tmp_path):
    name, arg, run = MODES[mode]
    cfg = _config(name, arg, tmp_path / "sw")
    with cfg.unlocked():
        cfg.optim.lr = float("nan")
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lr"):
        run(cfg, str(tmp_path / "work"))
    assert not (tmp_path / "sw").exists()
    assert not (tmp_path / "work").exists()


def test_pretrain_region_source_rpn_fails_before_any_data_is_generated(tmp_path):
    cfg = _config("pretrain_shapesworld", "runlocal", tmp_path / "sw")
    with cfg.unlocked():
        cfg.pretrain.regions = "rpn"
    with pytest.raises(NotImplementedError, match="add-proposals"):
        pretrain_trainer.run(cfg, str(tmp_path / "work"))
    assert not (tmp_path / "sw").exists()


def test_the_caller_config_is_left_unchanged(tmp_path, monkeypatch):
    """The run fills data paths and frozen patterns into its own copy."""
    cfg = _config("pretrain_shapesworld", "runlocal", tmp_path / "sw")
    before = cfg.to_dict()
    monkeypatch.setattr(loop, "build_step", _stop)
    with pytest.raises(_Stop):
        pretrain_trainer.run(cfg, str(tmp_path / "work"))
    assert cfg.to_dict() == before
