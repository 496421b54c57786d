"""Imported at start-up by every Python process the tests launch (`conftest.py` puts this folder
first on their PYTHONPATH): applies pyproject.toml's pytest `filterwarnings` there too, so that a
deprecation of jax/flax/optax/orbax/grain met in a subprocess (a `main.py` run, 8 fake devices,
several JAX processes) fails its test as it would in-process.

Same semantics as pytest's ini filters: `action:message:category:module`, message and module are
regexes matched at the start, later entries take precedence."""

from __future__ import annotations

import builtins
import pathlib
import tomllib
import warnings


def _apply() -> None:
    pyproject = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    filters = tomllib.loads(pyproject.read_text())["tool"]["pytest"]["ini_options"]
    for spec in filters.get("filterwarnings", []):
        action, message, category, module = (spec.split(":", 3) + ["", "", ""])[:4]
        warnings.filterwarnings(
            action,
            message=message,
            category=getattr(builtins, category or "Warning"),
            module=module,
        )


_apply()
