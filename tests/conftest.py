"""Shared pytest set-up: CPU-only JAX, a persistent compile cache, and the torch_ref skip rule."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

# Tests run on the CPU with one device unless a test re-executes itself with fake devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Repeated compiles of the same programs (across tests and subprocesses) hit this cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/regionclip_jax_test_cache")

_TORCH_REFS = ("torch", "torchvision", "open_clip")
MISSING_TORCH = [m for m in _TORCH_REFS if importlib.util.find_spec(m) is None]
_SUBPROCESS_WARNINGS = os.path.join(os.path.dirname(__file__), "subprocess_warnings")


def pytest_addoption(parser):
    parser.addoption(
        "--learning-seed",
        type=int,
        default=0,
        help="seed of the data, init and training randomness of the `learning` tests (make "
        "audit-learning runs them with several)",
    )


def pytest_configure(config):
    # grain worker processes read absl flags; outside app.run they must be marked parsed.
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    # Python processes the tests start apply the same warning filters (a sitecustomize there).
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SUBPROCESS_WARNINGS, path) if p)


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


@pytest.fixture(scope="session")
def learning_seed(request) -> int:
    """The seed a `learning` test derives all its randomness from (`--learning-seed`, default 0)."""
    return int(request.config.getoption("--learning-seed"))


@pytest.fixture
def report_margin(request, learning_seed):
    """`report(value, threshold, higher_is_better)`: prints a learning test's margin over its
    threshold and, when $REGIONCLIP_MARGINS is set, appends it there as a JSON line (read by
    `tests/learning_margins.py`, the table of `make audit-learning`)."""

    def report(value: float, threshold: float, *, higher_is_better: bool, what: str = "") -> None:
        value, threshold = float(value), float(threshold)
        margin = value - threshold if higher_is_better else threshold - value
        row = dict(
            test=request.node.nodeid,
            what=what,
            seed=learning_seed,
            value=value,
            threshold=threshold,
            margin=margin,
            relative_margin=margin / abs(threshold) if threshold else None,
        )
        print(f"learning margin: {json.dumps(row)}")
        path = os.environ.get("REGIONCLIP_MARGINS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return report
