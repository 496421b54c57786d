"""Shared pytest set-up: CPU-only JAX, a persistent compile cache, and the torch_ref skip rule."""

from __future__ import annotations

import importlib.util
import os

import pytest

# Tests run on the CPU with one device unless a test re-executes itself with fake devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Repeated compiles of the same programs (across tests and subprocesses) hit this cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/regionclip_jax_test_cache")

_TORCH_REFS = ("torch", "torchvision", "open_clip")
MISSING_TORCH = [m for m in _TORCH_REFS if importlib.util.find_spec(m) is None]


def pytest_configure(config):
    # grain worker processes read absl flags; outside app.run they must be marked parsed.
    from absl import flags

    flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    if not MISSING_TORCH:
        return
    reason = (
        f"PyTorch reference not installed ({', '.join(MISSING_TORCH)} missing): "
        "runs on the pinned Python 3.11 CI leg"
    )
    for item in items:
        if "torch_ref" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
