"""Packaging: the wheel holds every package, the experiment configs included (`configs/` is installed
as `regionclip_jax.configs`), so a non-editable install runs `regionclip-jax demo` without a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from regionclip_jax.configs import clip_shapesworld, common

REPO = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_in_tree() -> set[str]:
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "regionclip_jax").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    return found | {"regionclip_jax.configs"}


def test_pyproject_lists_every_package_and_maps_configs():
    # pyproject.toml lists the packages by name (a `packages.find` cannot map configs/ beside it):
    # a new package directory must be added there or the wheel leaves it out.
    setuptools = _setuptools()
    assert set(setuptools["packages"]) == _packages_in_tree()
    assert setuptools["package-dir"] == {"regionclip_jax.configs": "configs"}


def test_configs_import_as_a_package():
    assert clip_shapesworld.common is common
    assert clip_shapesworld.get_config("runlocal").mode == "clip"


def test_the_wheel_holds_every_package_and_the_configs(tmp_path):
    # Without build isolation (no registry in the tests): setuptools >= 70.1 builds wheels itself.
    # The Python 3.12 leg's venv has no setuptools.
    pytest.importorskip("setuptools", minversion="70.1")
    # Build from a copy so the checkout gets no build/ directory.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("regionclip_jax", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("regionclip_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _packages_in_tree():
        assert package.replace(".", "/") + "/__init__.py" in names, package
    configs = {p.name for p in (REPO / "configs").glob("*.py")}
    assert {n.split("/")[-1] for n in names if n.startswith("regionclip_jax/configs/")} >= configs
    assert "regionclip_jax/demo.py" in names
