"""Faults a long unattended run must come back from (issue 19): a damaged latest checkpoint, no
restorable checkpoint at all, a workdir of another model, a NaN step, an unwritable checkpoint
directory, and metrics of steps redone after an interruption.

Tiny CLIP runs on the ShapesWorld of test_train_loop (in-process, a few steps each). Resume after
SIGKILL / SIGTERM with bit-identical losses is tested in test_train_loop.py
(`test_sigkill_and_restart_resumes_exactly`, `test_sigterm_...`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train_loop import sw_dir, tiny_config  # noqa: F401  (sw_dir: the module's fixture)

from regionclip_jax import parallel
from regionclip_jax.train import checkpointing, clip_trainer, loop

REPO = Path(__file__).resolve().parents[1]

# The base run: 8 scheduled steps, stopped after 4, checkpoints at 2 and 4.
TOTAL = 8


def _run(data_dir: str, workdir: Path, stop_after: int, **changes) -> loop.TrainResult:
    changes = {"total_steps": TOTAL, "log_every": 1, "checkpoint_every": 2, **changes}
    cfg = tiny_config(data_dir, **changes)
    return clip_trainer.run(cfg, str(workdir), stop_after=stop_after, keep_state=False)


def _steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _truncate_biggest_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(100)
    return biggest


@pytest.fixture(scope="module")
def base(sw_dir, tmp_path_factory):  # noqa: F811
    """A workdir stopped after step 4 (checkpoints 2 and 4, metrics rows 1-4)."""
    workdir = tmp_path_factory.mktemp("faults") / "base"
    _run(sw_dir, workdir, stop_after=4)
    assert _steps(workdir) == [2, 4]
    return workdir


@pytest.fixture
def work(base, tmp_path) -> Path:
    """A copy of the base workdir for one test to damage."""
    d = tmp_path / "work"
    shutil.copytree(base, d)
    return d


@pytest.fixture
def unraisable(monkeypatch) -> list:
    """What reaches `sys.unraisablehook` during the test (where Orbax's aborted reads report)."""
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def _no_orbax_noise(text: str, unraisable: list) -> None:
    time.sleep(0.2)  # reads still in flight end on TensorStore's threads
    gc.collect()  # abandoned read coroutines
    assert not unraisable, [(u.object, u.exc_value) for u in unraisable]
    assert "Event loop is closed" not in text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    sw_dir,  # noqa: F811
    base,
    work,
    caplog,
    capfd,
    unraisable,
):
    _truncate_biggest_file(work / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        result = _run(sw_dir, work, stop_after=6)
    out, err = capfd.readouterr()
    assert result.step == 6
    assert f"resuming from {work / 'checkpoints'}/2" in out
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint 4" in warnings[0], caplog.text
    assert "\n" not in warnings[0] and "OUT_OF_RANGE" in warnings[0]
    _no_orbax_noise(err + caplog.text, unraisable)
    # The damaged step was set aside (and written again by this run); the redone steps are exact.
    assert (work / "checkpoints.broken" / "4").is_dir()
    assert _steps(work) == [2, 4, 6]
    ref = {r["step"]: r["loss"] for r in _rows(base)}
    np.testing.assert_array_equal([result.losses[s] for s in (3, 4)], [ref[3], ref[4]])


def test_no_restorable_checkpoint_is_one_short_error_naming_the_workdir(
    sw_dir,  # noqa: F811
    work,
    caplog,
    capfd,
    unraisable,
):
    for step in (2, 4):
        _truncate_biggest_file(work / "checkpoints" / str(step))
    with caplog.at_level(logging.WARNING), pytest.raises(checkpointing.CheckpointError) as info:
        _run(sw_dir, work, stop_after=6)
    msg = str(info.value)
    assert isinstance(info.value, checkpointing.NoRestorableCheckpointError)
    assert f"workdir {work}" in msg and "new workdir" in msg
    assert "checkpoint 4: ValueError: OUT_OF_RANGE" in msg and "checkpoint 2:" in msg
    assert len(msg.splitlines()) <= 5, msg
    _, err = capfd.readouterr()
    _no_orbax_noise(err + caplog.text, unraisable)
    assert _steps(work) == [2, 4]  # nothing is moved or deleted when nothing restores
    assert not (work / "checkpoints.broken").exists()


def test_workdir_of_another_model_is_refused_before_reading_naming_the_parameter(
    sw_dir,  # noqa: F811
    work,
    caplog,
    capfd,
    unraisable,
):
    with caplog.at_level(logging.INFO), pytest.raises(checkpointing.CheckpointError) as info:
        _run(sw_dir, work, stop_after=6, **{"model.overrides.vision_width": 16})
    msg = str(info.value)
    assert isinstance(info.value, checkpointing.CheckpointMismatchError)
    # vision_width 8 -> 16: the first differing parameter (sorted names) and both shapes.
    assert "parameter 'visual/attnpool/c_proj/kernel'" in msg, msg
    assert "shape (256, 32) in checkpoint 4, shape (512, 32) in this config" in msg, msg
    assert "new workdir" in msg and len(msg.splitlines()) <= 3
    out, err = capfd.readouterr()
    _no_orbax_noise(err + caplog.text, unraisable)
    assert len((err + caplog.text).splitlines()) < 15, err + caplog.text
    assert "resuming" not in out
    assert _steps(work) == [2, 4] and not (work / "checkpoints.broken").exists()


def test_workdir_of_another_model_from_the_command_line_is_a_few_lines(sw_dir, work, tmp_path):  # noqa: F811
    cfg = tiny_config(
        sw_dir, total_steps=TOTAL, log_every=1, checkpoint_every=2,
        **{"model.overrides.vision_width": 16},
    )  # fmt: skip
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import ml_collections\n\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({cfg.to_dict()!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "regionclip_jax.main", f"--config={cfg_file}", f"--workdir={work}"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "cannot resume: workdir" in err and "new workdir" in err, err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert len(err.strip().splitlines()) <= 8, err


# ---------------------------------------------------------------------------------------------
# NaN step, unwritable checkpoint directory


def _restore_latest(config, workdir: Path) -> tuple[int, dict]:
    task = clip_trainer.ClipTask(config)
    mesh, rules = parallel.mesh_from_config(config), parallel.rules_from_config(config)
    program = loop.build_step(config, task, mesh, rules)
    ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
    try:
        step, state = ckpt.restore_latest(program.abstract_state)
    finally:
        ckpt.close()
    return step, state


def test_nan_stops_the_run_and_no_checkpoint_holds_the_nan_state(sw_dir, tmp_path):  # noqa: F811
    # The default asynchronous checkpointing: the guard must read step t's loss before saving t.
    changes = {"total_steps": 6, "log_every": 1, "checkpoint_every": 2}
    cfg = tiny_config(sw_dir, async_checkpointing=True, **{"debug.nan_at_step": 4}, **changes)
    workdir = tmp_path / "nan"
    with pytest.raises(loop.NonFiniteError) as info:
        clip_trainer.run(cfg, str(workdir), keep_state=False)
    assert info.value.step == 4
    assert _steps(workdir) == [2]
    step, state = _restore_latest(cfg, workdir)
    assert step == 2 and int(state["step"]) == 2
    for leaf in jax.tree.leaves(state["params"]):
        assert np.all(np.isfinite(np.asarray(leaf)))


_UNWRITABLE_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_faults import _run
try:
    _run({data!r}, {workdir!r}, stop_after=6)
except Exception as e:
    print("RAISED", type(e).__name__, e)
"""


def _run_with_read_only_checkpoints(data_dir: str, workdir: Path) -> str:
    """Runs steps 5-6 of `workdir` with `checkpoints/` unwritable; returns what was raised.

    Not root: chmod. Root (where chmod does not bite): a read-only bind mount in a private mount
    namespace (`unshare -m`, in a subprocess); skipped where that is not allowed either."""
    ckpt_dir = workdir / "checkpoints"
    if os.geteuid() != 0:
        os.chmod(ckpt_dir, 0o555)
        try:
            _run(data_dir, workdir, stop_after=6)
        except Exception as e:
            return f"RAISED {type(e).__name__} {e}"
        finally:
            os.chmod(ckpt_dir, 0o755)
        return "no error"
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: the checkpoint directory cannot be made unwritable")
    code = _UNWRITABLE_RUN.format(tests=str(REPO / "tests"), data=data_dir, workdir=str(workdir))
    d = shlex.quote(str(ckpt_dir))
    script = (
        f"mount --bind {d} {d} && mount -o remount,bind,ro {d} && echo MOUNTED_RO && "
        f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if "MOUNTED_RO" not in proc.stdout:
        pytest.skip(f"root, and no read-only bind mount possible here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((x for x in proc.stdout.splitlines() if x.startswith("RAISED")), "no error")


def test_unwritable_checkpoint_directory_keeps_the_previous_checkpoint(
    sw_dir,  # noqa: F811
    work,
):
    ckpt_dir = work / "checkpoints"
    before = {p: p.read_bytes() for p in (ckpt_dir / "4").rglob("*") if p.is_file()}
    raised = _run_with_read_only_checkpoints(sw_dir, work)
    assert raised.startswith("RAISED") and "checkpoints/6" in raised, raised
    assert _steps(work) == [2, 4]
    assert {p: p.read_bytes() for p in (ckpt_dir / "4").rglob("*") if p.is_file()} == before
    result = _run(sw_dir, work, stop_after=6)
    assert result.step == 6 and _steps(work)[-1] == 6
    assert sorted(result.losses) == [5, 6]  # resumed from 4
    assert [r["step"] for r in _rows(work)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Metrics of redone steps


def _tb_scalars(workdir: Path, tag: str) -> list[int]:
    """Steps of `tag` as TensorBoard shows them: event files in name order, a SessionLog.START
    at step s discarding the events read so far with step >= s (TensorBoard's purge)."""
    from tensorboardX.proto import event_pb2

    steps: list[int] = []
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                steps = [s for s in steps if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(int(event.step))
    return steps


def test_steps_redone_after_an_interruption_are_logged_once(sw_dir, tmp_path):  # noqa: F811
    workdir = tmp_path / "interrupted"
    # Checkpoint at 3; steps 1-4 logged; the run dies before step 6.
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run(sw_dir, workdir, stop_after=8, checkpoint_every=3, **{"debug.fail_at_step": 6})
    assert _steps(workdir) == [3]
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4]
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and was killed while writing a line
    result = _run(sw_dir, workdir, stop_after=6, checkpoint_every=3)
    assert sorted(result.losses) == [4, 5, 6]
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["loss"] == result.losses[4]  # the redone step's row, not the lost run's
    assert _tb_scalars(workdir, "loss") == [1, 2, 3, 4, 5, 6]
