"""Metric writing: TensorBoard event files (tensorboardX, no TensorFlow), JSONL and a console line.

Files in the workdir (process 0 only):
  events.out.tfevents.*   TensorBoard scalars (`tensorboard --logdir WORKDIR`)
  metrics.jsonl           one JSON object per logged step: {"step": n, "loss": ..., ...}
Console: `step 120/1000 | loss 2.3104 | 412.5 img/s | lr 1.0e-03 | ETA 0:03:12`.

A run that starts at step S (resumed from checkpoint S, or S = 0) replaces whatever an earlier,
interrupted run logged after S: those rows are dropped from metrics.jsonl (rewritten atomically)
and TensorBoard is told to discard those events (`purge_step`: a SessionLog.START at S + 1 in
the new event file), so every step is shown once.
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


def drop_rows_after(path: str, step: int) -> int:
    """Removes the rows of JSONL file `path` whose "step" is > `step` (and a last line cut off
    mid-write), rewriting it atomically; returns how many lines were removed."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                continue  # the process was killed while writing this line
            keep.append(line)  # not ours to judge
            continue
        row_step = row.get("step") if isinstance(row, dict) else None
        if isinstance(row_step, (int, float)) and row_step > step:
            continue
        keep.append(line)
    if len(keep) == len(lines):
        return 0
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".metrics.jsonl.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(lines) - len(keep)


class MetricWriter:
    """Writes scalars to TensorBoard + JSONL; `enabled=False` (other processes) writes nothing.

    `start_step`: the step this run starts from; what an earlier run logged after it is dropped
    (metrics.jsonl) or hidden (TensorBoard's purge of the events of steps >= start_step + 1).
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        drop_rows_after(path, int(start_step))
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            # Only where an earlier run left events: a fresh workdir's file stays plain.
            earlier = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
            purge = int(start_step) + 1 if earlier else None
            # lazy: tensorboardX imports torch when it is installed (~1 s per process); only the
            # process that writes metrics pays for it.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=workdir, flush_secs=10, purge_step=purge)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        # NaN/Inf are not JSON: written as strings so the line stays parseable.
        row = {"step": int(step)}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class Progress:
    """Console progress line: loss, images/s and ETA from the steady-state step rate."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int, stream=None):
        self.total = total_steps
        self.batch = batch_size
        self.stream = stream or sys.stdout
        self._t0: float | None = None
        self._s0 = start_step

    def start(self, step: int) -> None:
        """Starts the clock (call after the first, compiling, step)."""
        self._t0, self._s0 = time.perf_counter(), step

    def rate(self, step: int) -> float:
        """Steps per second since `start` (0 before)."""
        if self._t0 is None or step <= self._s0:
            return 0.0
        return (step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)

    def line(self, step: int, scalars: Mapping[str, Any]) -> str:
        rate = self.rate(step)
        parts = [f"step {step}/{self.total}"]
        if "loss" in scalars:
            parts.append(f"loss {_scalar(scalars['loss']):.4f}")
        if rate > 0:
            eta = datetime.timedelta(seconds=round((self.total - step) / rate))
            parts += [f"{rate * self.batch:.1f} img/s", f"ETA {eta}"]
        if "perf/mfu" in scalars:
            parts.append(f"MFU {_scalar(scalars['perf/mfu']):.1%}")
        if "lr" in scalars:
            parts.append(f"lr {_scalar(scalars['lr']):.2e}")
        return " | ".join(parts)

    def print(self, step: int, scalars: Mapping[str, Any]) -> None:
        print(self.line(step, scalars), file=self.stream, flush=True)
