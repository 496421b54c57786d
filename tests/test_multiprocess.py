"""Multi-process training on one machine (jax.distributed over gloo, CPU devices per process):
2 processes x 2 devices == 1 process x 4 devices, checkpoints restored onto other device and
process counts, every mode ending with its model (`export/`) and evaluation whatever the process
count, and a failing process ending the job instead of hanging it.

Every run is `python -m regionclip_jax.main` in subprocesses, as a user would start it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import TINY_TRAIN_OVERRIDES, config_module  # noqa: E402
from test_pretrain import tiny_pretrain_config  # noqa: E402
from test_train_loop import _losses_from_jsonl as _losses  # noqa: E402
from test_train_loop import apply_changes, tiny_config  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_ENABLE_COMPILATION_CACHE": "false",  # see loop.avoid_cpu_multidevice_cache_hang
    # 2 cores shared by several processes: collectives may wait long for a slow peer.
    "XLA_FLAGS": "--xla_cpu_collective_call_terminate_timeout_seconds=600"
    " --xla_cpu_collective_timeout_seconds=600",
}


@pytest.fixture(scope="module")
def sw_dir(tmp_path_factory):
    from regionclip_jax.data import shapesworld

    d = tmp_path_factory.mktemp("sw_mp")
    shapesworld.generate(d, num_train=96, num_val=0, seed=0, image_size=64)
    return str(d)


def _config_file(path: Path, sw_dir: str, **changes) -> Path:
    # data x fsdp: parameters and optimizer state are sharded across the processes too.
    cfg = tiny_pretrain_config(
        sw_dir, log_every=1, **{"data.batch_size": 8, "mesh": {"data": -1, "fsdp": 2}}, **changes
    )
    return _write_config(path, cfg)


def _write_config(path: Path, cfg) -> Path:
    path.write_text(
        "import ml_collections\n\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({cfg.to_dict()!r})\n"
    )
    return path


def _exported_params(directory: Path) -> dict[str, np.ndarray]:
    """The parameters of a `save_clip` export, flattened by path."""
    import jax
    from flax import nnx

    from regionclip_jax.convert.checkpoint import load_clip

    state = nnx.to_pure_dict(nnx.state(load_clip(directory), nnx.Param))
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state)
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(cfg_file, workdir, *, processes: int, devices: int, extra=(), timeout=400):
    """Starts `processes` copies of main (each with `devices` CPU devices); returns
    [(returncode, stdout, stderr)] in process order and the wall time."""
    base = [
        sys.executable, "-m", "regionclip_jax.main", f"--config={cfg_file}",
        f"--workdir={workdir}", f"--num_cpu_devices={devices}", *extra,
    ]  # fmt: skip
    if processes > 1:
        port = _free_port()
        base += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    procs = [
        subprocess.Popen(
            base + ([f"--process_id={i}"] if processes > 1 else []),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(processes)
    ]
    start = time.time()
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.time() - start)))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results, time.time() - start


def _ok(results) -> None:
    for i, (rc, _out, err) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{err[-3000:]}"


def test_two_processes_match_one_and_resume_its_checkpoint(sw_dir, tmp_path):
    """2 processes x 2 devices == 1 process x 8 devices (losses and the exported student), and the
    8-device run's step-2 checkpoint resumes on 2 processes x 2 devices (another device AND
    process count: the data position is mapped, the fsdp shards re-laid) with the same losses."""
    cfg = _config_file(tmp_path / "cfg.py", sw_dir, total_steps=4, checkpoint_every=2)
    ref_dir = tmp_path / "eight"
    ref_run, _ = _run_job(cfg, ref_dir, processes=1, devices=8)
    _ok(ref_run)
    ref = _losses(ref_dir)
    assert sorted(ref) == [1, 2, 3, 4]

    # Through the local launcher, as a user would start it.
    two_dir = tmp_path / "two"
    launcher = subprocess.run(
        ["bash", str(REPO / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "2",
         "--port", str(_free_port()), str(cfg), str(two_dir)],
        cwd=REPO, env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    for i in range(2):
        log = (two_dir / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} of 2 (explicit): 2 local / 4 devices" in log
    got = _losses(two_dir)
    assert sorted(got) == [1, 2, 3, 4]
    # Another device count sums in another order: fp32 rounding (~1e-6), grown over four SGD
    # steps to <= 2e-5 here. A wrong data split, position or state would differ by O(1).
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-4)
    # Both processes wrote their part of the checkpoint (and their data position).
    data = two_dir / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # The run ends with the student (gathered from both processes' fsdp shards), as one process's.
    want, have = _exported_params(ref_dir / "export"), _exported_params(two_dir / "export")
    assert sorted(want) == sorted(have)
    for k in want:
        np.testing.assert_allclose(have[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)

    # The 8-device run as if it had stopped at step 2, resumed by 2 processes of 2 devices.
    run_dir = tmp_path / "resumed"
    shutil.copytree(ref_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "4")
    shutil.rmtree(run_dir / "export")
    results, _ = _run_job(cfg, run_dir, processes=2, devices=2)
    _ok(results)
    assert f"resuming from {run_dir / 'checkpoints'}/2" in results[0][1]
    assert "written by another number of processes" in results[0][2]
    got = _losses(run_dir)
    np.testing.assert_allclose(
        [got[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=1e-4, err_msg="resumed on 2 x 2"
    )


def _same_run(one_dir: Path, two_dir: Path) -> None:
    ref, got = _losses(one_dir), _losses(two_dir)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=2e-5)


def test_clip_mode_exports_and_evaluates_with_two_processes(tmp_path):
    sw = tmp_path / "sw"
    cfg = tiny_config(str(sw), total_steps=4, log_every=1, checkpoint_every=2)
    with cfg.unlocked():
        cfg.data.batch_size = 4
        cfg.data.shapesworld.num_train = 32
        cfg.data.shapesworld.num_val = 8
    cfg_file = _write_config(tmp_path / "cfg.py", cfg)
    one, _ = _run_job(cfg_file, tmp_path / "one", processes=1, devices=2)
    _ok(one)
    two, _ = _run_job(cfg_file, tmp_path / "two", processes=2, devices=1)
    _ok(two)
    _same_run(tmp_path / "one", tmp_path / "two")
    want, have = (
        _exported_params(tmp_path / "one" / "export"),
        _exported_params(tmp_path / "two" / "export"),
    )
    for k in want:
        np.testing.assert_allclose(have[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    retrieval = [
        next(x for x in r[1].splitlines() if x.startswith("val retrieval"))
        for r in (one[0], two[0])
    ]
    assert retrieval[0] == retrieval[1]  # the same model evaluated on the same batches


def test_rpn_and_detection_modes_with_two_processes_match_one(tmp_path):
    """Detection batches and losses do not depend on the process count, and both modes end with
    their model (rpn: export/) and evaluation (detect: eval/STEP/metrics.json)."""
    data = tmp_path / "data"
    runs = {}
    for mode, name in (("rpn", "rpn_shapesworld"), ("detect", "detect_shapesworld")):
        cfg = config_module(name).get_config(f"runlocal,data={data}")
        cfg.unlock()
        apply_changes(cfg, {"data.batch_size": 4, "async_checkpointing": False})
        cfg.model.overrides.update(TINY_TRAIN_OVERRIDES)  # compile time is most of each job
        cfg.data.context_length = TINY_TRAIN_OVERRIDES["context_length"]
        if mode == "rpn":  # parameters sharded across the processes: the export gathers them
            cfg.mesh = {"data": -1, "fsdp": 2}
        cfg.debug.print_memory = False
        if mode == "detect":
            cfg.detect.rpn_init = str(runs["rpn"])
        cfg_file = _write_config(tmp_path / f"{mode}.py", cfg)
        one, _ = _run_job(cfg_file, tmp_path / f"{mode}_one", processes=1, devices=2)
        _ok(one)
        two, _ = _run_job(cfg_file, tmp_path / f"{mode}_two", processes=2, devices=1)
        _ok(two)
        _same_run(tmp_path / f"{mode}_one", tmp_path / f"{mode}_two")
        runs[mode] = tmp_path / f"{mode}_one"
    for n in ("one", "two"):
        export = tmp_path / f"rpn_{n}" / "export"
        assert (export / "rpn.json").is_file() and (export / "params.npz").is_file()
    a, b = (np.load(tmp_path / f"rpn_{n}" / "export" / "params.npz") for n in ("one", "two"))
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    metrics = [
        json.loads((tmp_path / f"detect_{n}" / "eval" / "4" / "metrics.json").read_text())
        for n in ("one", "two")
    ]
    assert metrics[0].keys() == metrics[1].keys()
    for k in metrics[0]:  # NaN where pycocotools has no object of a size: NaN on both
        np.testing.assert_allclose(metrics[1][k], metrics[0][k], atol=1e-3, err_msg=k)


def test_a_failing_process_ends_the_job_with_a_message(sw_dir, tmp_path):
    cfg = _config_file(
        tmp_path / "cfg.py",
        sw_dir,
        total_steps=50,
        checkpoint_every=100,
        **{"debug.fail_at_step": 3, "debug.fail_process": 1},
    )
    results, seconds = _run_job(
        cfg, tmp_path / "run", processes=2, devices=2, extra=["--heartbeat_timeout=10"], timeout=300
    )
    (rc0, _, err0), (rc1, _, err1) = results
    assert rc1 == 1, err1[-2000:]
    assert "process 1 of 2 failed: RuntimeError: debug.fail_at_step" in err1
    # Process 0 does not hang: it stops on the lost peer or on the missed heartbeats.
    assert rc0 != 0
    # Gloo words the lost peer by how its socket ended (a close or a reset: a race of the exit).
    assert re.search(r"another task died|Connection (closed|reset) by peer", err0), err0[-2000:]
    assert seconds < 240
