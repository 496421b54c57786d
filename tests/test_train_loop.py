"""The shared train loop and its optimiser: resume-exactness after SIGKILL, 8-device equality,
the NaN guard, and the optimiser against NumPy references of torch/detectron2 semantics.

The loop runs the image-level CLIP task (and, for resume-after-SIGKILL, the pretraining task) on a
tiny ShapesWorld (generated once per module).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import TINY_TRAIN_OVERRIDES, config_module

from regionclip_jax.train import clip_trainer, loop, optim

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str, **changes) -> ml_collections.ConfigDict:
    """clip_shapesworld:runlocal shrunk to a model that compiles and steps fast on 2 cores."""
    c = config_module("clip_shapesworld").get_config(f"runlocal,data={data_dir}")
    c.unlock()
    c.model.overrides.update(TINY_TRAIN_OVERRIDES)
    c.data.shapesworld.dir = data_dir
    c.data.context_length = 16
    c.async_checkpointing = False
    c.debug.print_memory = False
    apply_changes(c, changes)
    c.lock()
    return c


def apply_changes(c: ml_collections.ConfigDict, changes: dict) -> None:
    """Sets dotted keys ("data.batch_size") of an unlocked config."""
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value


@pytest.fixture(scope="module")
def sw_dir(tmp_path_factory):
    from regionclip_jax.data import shapesworld

    d = tmp_path_factory.mktemp("sw")
    shapesworld.generate(d, num_train=96, num_val=16, seed=0, image_size=64)
    return str(d)


def _losses_from_jsonl(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = float(row["loss"])  # a resumed run overwrites the steps it redoes
    return out


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL


def _main_cmd(cfg_file: Path, workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "regionclip_jax.main",
        f"--config={cfg_file}",
        f"--workdir={workdir}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clip", "pretrain"])
def test_sigkill_and_restart_resumes_exactly(sw_dir, tmp_path, mode):
    make = tiny_config
    if mode == "pretrain":
        from test_pretrain import tiny_pretrain_config as make
    cfg = make(sw_dir, total_steps=16, log_every=1, checkpoint_every=4, **{"debug.step_sleep": 0.3})
    assert cfg.mode == mode
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        textwrap.dedent(
            f"""
            import ml_collections

            def get_config(arg=None):
                return ml_collections.ConfigDict({cfg.to_dict()!r})
            """
        )
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # Uninterrupted reference run.
    ref_dir = tmp_path / "ref"
    proc = subprocess.run(
        _main_cmd(cfg_file, ref_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _losses_from_jsonl(ref_dir)
    assert sorted(ref) == list(range(1, 17))

    # Killed run: SIGKILL once the step-8 checkpoint is complete (mid-way through the run).
    run_dir = tmp_path / "run"
    p = subprocess.Popen(
        _main_cmd(cfg_file, run_dir), cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "8" / "state").exists():
        assert p.poll() is None and time.time() < deadline, "run ended before its step-8 checkpoint"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed = _losses_from_jsonl(run_dir)
    assert max(killed) < 16, "the run was not killed mid-way"
    ckpts = sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit())
    resumed_from = max(ckpts)

    proc = subprocess.run(
        _main_cmd(cfg_file, run_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints'}/{resumed_from}" in proc.stdout
    resumed = _losses_from_jsonl(run_dir)
    after = [s for s in range(resumed_from + 1, 17)]
    assert after, "nothing left to compare"
    np.testing.assert_array_equal([resumed[s] for s in after], [ref[s] for s in after])
    # The model the run ends with is the uninterrupted run's, bit for bit.
    from flax import nnx

    from regionclip_jax.convert.checkpoint import load_clip

    want, have = (jax.tree.leaves(nnx.state(load_clip(d / "export"))) for d in (ref_dir, run_dir))
    assert len(want) == len(have) > 0
    for a, b in zip(want, have):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_the_same_command_resumes_exactly(sw_dir, tmp_path):
    cfg = tiny_config(
        sw_dir, total_steps=12, log_every=1, checkpoint_every=100, **{"debug.step_sleep": 0.3}
    )
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import ml_collections\n\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({cfg.to_dict()!r})\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run(
        _main_cmd(cfg_file, ref_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _losses_from_jsonl(ref_dir)

    p = subprocess.Popen(
        _main_cmd(cfg_file, run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert p.poll() is None and time.time() < deadline, "run ended before step 4"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    stopped = int(out.split("preempted at step ")[1].split(":")[0])
    assert 4 <= stopped < 12, out[-2000:]
    assert (run_dir / "checkpoints" / str(stopped) / "state").exists()  # no periodic save was due

    proc = subprocess.run(
        _main_cmd(cfg_file, run_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints'}/{stopped}" in proc.stdout
    resumed = _losses_from_jsonl(run_dir)
    after = list(range(stopped + 1, 13))
    np.testing.assert_array_equal([resumed[s] for s in after], [ref[s] for s in after])


# ---------------------------------------------------------------------------------------------
# 8 fake devices (data x fsdp) == 1 device

_MULTI = """
import json, sys
from regionclip_jax.train import clip_trainer
sys.path.insert(0, {tests!r})
from test_train_loop import tiny_config
cfg = tiny_config({data!r}, total_steps=4, log_every=1, mesh={{"data": 4, "fsdp": 2, "model": 1}})
import jax
assert jax.device_count() == 8
r = clip_trainer.run(cfg, {workdir!r}, keep_state=False)
print("LOSSES", json.dumps(r.losses))
"""


@pytest.mark.slow
def test_eight_devices_match_one(sw_dir, tmp_path):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # 8 fake devices on 2 shared cores: CPU collectives can wait far longer than XLA's 40 s
        # default rendezvous timeout, which aborts the process.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8"
        " --xla_cpu_collective_call_terminate_timeout_seconds=600"
        " --xla_cpu_collective_timeout_seconds=600",
        # A cached multi-device CPU executable hangs in its first all-gather (jax 0.10.2); the loop
        # also turns the cache off itself (loop.avoid_cpu_multidevice_cache_hang).
        "JAX_ENABLE_COMPILATION_CACHE": "false",
    }
    code = _MULTI.format(tests=str(REPO / "tests"), data=sw_dir, workdir=str(tmp_path / "multi"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOSSES"))
    multi = {int(k): v for k, v in json.loads(line[len("LOSSES") :]).items()}

    assert jax.device_count() == 1
    single = clip_trainer.run(
        tiny_config(sw_dir, total_steps=4, log_every=1), str(tmp_path / "single"), keep_state=False
    ).losses
    assert sorted(multi) == sorted(single) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [multi[s] for s in sorted(multi)], [single[s] for s in sorted(single)], rtol=2e-5
    )


# ---------------------------------------------------------------------------------------------
# NaN guard


def test_nan_guard_stops_with_step_and_module_norms(sw_dir, tmp_path):
    cfg = tiny_config(sw_dir, total_steps=6, log_every=1, checkpoint_every=2)
    cfg.unlock()
    cfg.debug.nan_at_step = 3
    workdir = tmp_path / "nan"
    with pytest.raises(loop.NonFiniteError) as info:
        clip_trainer.run(cfg, str(workdir))
    err = info.value
    assert err.step == 3
    assert math.isnan(err.metrics["loss"])
    assert math.isnan(err.metrics["grad_norm/visual"])
    assert "grad_norm/transformer" in str(err) and "step 3" in str(err)
    # The step-2 checkpoint exists; nothing was saved at or after the bad step.
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved == [2]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["loss"] == "nan"


# ---------------------------------------------------------------------------------------------
# Optimiser: NumPy references written from torch.optim.SGD / detectron2 semantics


def _optim_cfg(**kw) -> ml_collections.ConfigDict:
    from regionclip_jax.config import base_config

    o = base_config().optim
    o.update(kw)
    return o


def test_lr_schedule_is_detectron2_warmup_multistep():
    o = _optim_cfg(lr=0.02, warmup_steps=10, warmup_factor=0.001, decay_steps=(30, 50),
                   decay_factor=0.1)  # fmt: skip
    sched = optim.lr_schedule(o)
    for step in (0, 1, 5, 9, 10, 29, 30, 49, 50, 80):
        # detectron2 WarmupMultiStepLR: factor = wf (1 - a) + a, a = it / warmup, below warmup.
        warm = 0.001 * (1 - step / 10) + step / 10 if step < 10 else 1.0
        expected = 0.02 * warm * 0.1 ** sum(step >= s for s in (30, 50))
        assert float(sched(step)) == pytest.approx(expected, rel=1e-6)
        assert optim.lr_at(o, step) == pytest.approx(expected, rel=1e-12)


def test_sgd_momentum_decay_per_param_clip_and_freeze_match_numpy():
    rng = np.random.default_rng(0)
    params = {
        "visual": {"conv1": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                   "layer1": {"0": {"bias": rng.normal(size=(4,)).astype(np.float32)}},
                   "head": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}},
        "logit_scale": np.float32(2.0),
    }  # fmt: skip
    o = _optim_cfg(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, decay_min_ndim=0,
                   clip_grad_norm=1.5, freeze=(r"^visual/conv1/", r"^visual/layer1/"))  # fmt: skip
    tx = optim.make_optimizer(o, params)
    p = jax.tree.map(jnp.asarray, params)
    st = tx.init(p)
    ref = jax.tree.map(np.array, params)
    buf = jax.tree.map(np.zeros_like, params)
    frozen = {"visual/conv1/kernel", "visual/layer1/0/bias"}
    for _ in range(3):
        grads = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32) * 3, params)
        upd, st = tx.update(jax.tree.map(jnp.asarray, grads), st, p)
        p = jax.tree.map(lambda a, b: a + b, p, upd)
        # torch: clip_grad_norm_ per tensor, then SGD(weight_decay) adds wd * p, momentum buffer.
        flat_g = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(grads)))
        flat_r = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(ref)))
        flat_b = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(buf)))
        for name, g in flat_g.items():
            if name in frozen:
                continue
            g = g.astype(np.float64) * min(1.0, 1.5 / (np.linalg.norm(g) + 1e-6))
            g = g + 0.01 * flat_r[name]
            flat_b[name][...] = 0.9 * flat_b[name] + g
            flat_r[name][...] = flat_r[name] - 0.1 * flat_b[name]
    for name, value in zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(p)):
        np.testing.assert_allclose(np.asarray(value), flat_r[name], rtol=1e-5, atol=1e-6)
        if name in frozen:
            orig = dict(zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(params)))
            np.testing.assert_array_equal(np.asarray(value), orig[name])


def test_adamw_skips_decay_below_min_ndim():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    o = _optim_cfg(name="adamw", lr=0.1, weight_decay=0.5, decay_min_ndim=2)
    tx = optim.make_optimizer(o, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients: only decoupled decay moves a parameter: -lr * wd * p for decayed ones.
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(upd["b"]), 0.0)


# ---------------------------------------------------------------------------------------------
# Persistent-cache guard for multi-device CPU runs

_CACHE_GUARD = """
import jax
from regionclip_jax.train import loop
assert jax.config.jax_enable_compilation_cache
print("GUARD", loop.avoid_cpu_multidevice_cache_hang(), jax.config.jax_enable_compilation_cache)
"""


@pytest.mark.parametrize("devices, turned_off", [(8, True), (1, False)])
def test_persistent_cache_is_turned_off_only_for_multi_device_cpu(tmp_path, devices, turned_off):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
        "JAX_ENABLE_COMPILATION_CACHE": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CACHE_GUARD], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"GUARD {turned_off} {not turned_off}" in proc.stdout
    assert ("persistent compilation cache disabled" in proc.stderr) == turned_off
