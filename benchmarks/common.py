"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a machine line."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


def machine_line() -> str:
    """One line naming the hardware and the software that produced a table."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}; {os.cpu_count()} cores; jax {jax.__version__} on {jax.default_backend()} "
        f"({devices}); python {platform.python_version()}"
    )


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Runs each callable `warmup` times, then `repeats` rounds of one call each, interleaved.

    Interleaving puts the contenders under the same machine load (these machines are shared), so the
    ratio of medians is meaningful even when absolute times drift. Each callable must block until its
    result is ready (e.g. call `.block_until_ready()`).

    Returns:
      name -> list of `repeats` wall-clock times in seconds.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
