"""MFU bookkeeping: XLA's FLOP count of a compiled program against the textbook count, the
peak table, and the MFU formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from regionclip_jax.train import throughput


def test_compiled_flops_of_a_matmul_are_2mnk():
    m, k, n = 64, 48, 16
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert throughput.compiled_flops(compiled) == pytest.approx(2 * m * k * n)


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v4", 275e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_kind(kind, peak):
    assert throughput.peak_flops(_Device(kind)) == peak


def test_mfu_is_achieved_over_peak():
    assert throughput.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert throughput.mfu(None, 0.5, 4e12) is None
    assert throughput.mfu(1e12, 0.5, None) is None
