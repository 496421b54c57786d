"""Throughput and model FLOPs utilisation (MFU) of the compiled train step.

MFU = (FLOPs of one step per device, from XLA's cost analysis of the compiled program)
      / (step time) / (peak FLOP/s of one device).
Peaks are dense bf16 matmul figures from the vendors' data sheets (what MFU is conventionally
measured against, whatever dtype the model computes in); an unknown device (the CPU) reports
throughput only. XLA counts the FLOPs of the program it compiled, rematerialised recomputation
included, so this is what the hardware did, not the 6*N*D model estimate.
"""

from __future__ import annotations

from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (chip for TPUs, GPU for NVIDIA). Matched against
# `device.device_kind` (lowercase, first match wins: put the longer names first).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
    ("h200", 989e12),  # SXM; same tensor cores as H100 SXM
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the first device), or None if unknown."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs per device of one call of a compiled (`jit(...).lower(...).compile()`) program, or
    None where the backend gives no cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning nothing
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def mfu(flops_per_device: float | None, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when a factor is unknown."""
    if not flops_per_device or not peak or step_seconds <= 0:
        return None
    return flops_per_device / step_seconds / peak
