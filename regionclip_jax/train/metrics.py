"""Metric writing: TensorBoard event files (tensorboardX, no TensorFlow), JSONL and a console line.

Files in the workdir (process 0 only):
  events.out.tfevents.*   TensorBoard scalars (`tensorboard --logdir WORKDIR`)
  metrics.jsonl           one JSON object per logged step: {"step": n, "loss": ..., ...}
Console: `step 120/1000 | loss 2.3104 | 412.5 img/s | lr 1.0e-03 | ETA 0:03:12`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Writes scalars to TensorBoard + JSONL; `enabled=False` (other processes) writes nothing."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=workdir, flush_secs=10)

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
