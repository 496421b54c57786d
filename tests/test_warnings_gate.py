"""The pytest configuration turns deprecations of the stack we build on into errors (pyproject.toml,
`filterwarnings`): raised inside jax/flax/optax/orbax/grain, or attributed by `stacklevel` to our own
code. Other libraries' deprecations stay warnings."""

from __future__ import annotations

import subprocess
import sys
import warnings

import jax.numpy as jnp
import pytest
from flax import nnx


def _warn_from(module: str) -> None:
    warnings.warn_explicit("old API", DeprecationWarning, "somewhere.py", 1, module=module)


@pytest.mark.parametrize(
    "module",
    ["jax._src.deprecations", "flax.nnx.variablelib", "optax", "orbax.checkpoint.args",
     "grain._src.python", "regionclip_jax.models.clip", "test_pretrain"],
)  # fmt: skip
def test_stack_and_own_deprecations_are_errors(module):
    with pytest.raises(DeprecationWarning, match="old API"):
        _warn_from(module)


@pytest.mark.parametrize("module", ["tensorflow_datasets.core", "flaxen", "somepkg.jax"])
def test_other_deprecations_stay_warnings(module):
    with pytest.warns(DeprecationWarning, match="old API"):
        _warn_from(module)


def test_a_real_flax_deprecation_fails():
    """flax NNX's `Variable.value` setter is deprecated (use `v[...] =`): raised inside flax."""
    v = nnx.Param(jnp.ones(2))
    with pytest.raises(DeprecationWarning, match="value"):
        v.value = jnp.zeros(2)


@pytest.mark.parametrize(
    "module, fails", [("flax.nnx.graph", True), ("tensorflow_datasets", False)]
)
def test_subprocesses_apply_the_same_filters(module, fails):
    """Python processes started by the tests (main.py runs, fake devices, several JAX processes)
    inherit the filters through tests/subprocess_warnings/sitecustomize.py."""
    code = (
        "import warnings\n"
        f"warnings.warn_explicit('old API', DeprecationWarning, 'x.py', 1, module={module!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode != 0) == fails, proc.stderr
    assert ("DeprecationWarning: old API" in proc.stderr) == fails, proc.stderr
