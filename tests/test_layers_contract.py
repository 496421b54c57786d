"""The package's layered import contract (`.importlinter`, README "Architecture").

`make lint` runs `lint-imports`; these tests run the same check and prove it can fail: a copy of the
package with one upward import, and one with an import cycle between two sibling modules, must each
break a contract. lint-imports runs as a subprocess so that it analyses the copy found first on
PYTHONPATH, not the package this interpreter imported.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "regionclip_jax"

# lint-imports' console entry point, through this interpreter (leg 1 and leg 2 venvs alike).
LINT = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Runs lint-imports with `root`'s .importlinter on the package found in `root`."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [*LINT, "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_repo(tmp_path: Path) -> Path:
    """Copies the package and its contract to `tmp_path` (sources only)."""
    shutil.copytree(
        REPO / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_repository_keeps_every_contract():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_copy_without_changes_keeps_every_contract(tmp_path):
    # The control for the two failure tests below: the copy itself is clean.
    result = _lint_imports(_copy_repo(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_upward_import_breaks_the_layers_contract(tmp_path):
    root = _copy_repo(tmp_path)
    # ops (bottom floor) reaching up into train (a floor near the top).
    (root / PACKAGE / "ops" / "_upward.py").write_text(
        f"from {PACKAGE} import train  # noqa: F401\n"
    )
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "layers (top imports bottom, never the reverse) BROKEN" in result.stdout, result.stdout
    assert f"{PACKAGE}.ops._upward -> {PACKAGE}.train" in result.stdout, result.stdout


@pytest.mark.parametrize("package", ["ops", "models"])
def test_sibling_cycle_breaks_the_acyclic_contract(tmp_path, package):
    root = _copy_repo(tmp_path)
    # Two modules of one package that import each other: no layer is crossed, only the cycle rule sees it.
    folder = root / PACKAGE / package
    (folder / "_cycle_a.py").write_text(f"from {PACKAGE}.{package} import _cycle_b  # noqa: F401\n")
    (folder / "_cycle_b.py").write_text(f"from {PACKAGE}.{package} import _cycle_a  # noqa: F401\n")
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert (
        "no import cycles between sibling modules (any package, any depth) BROKEN" in result.stdout
    ), result.stdout
    assert "layers (top imports bottom, never the reverse) KEPT" in result.stdout, result.stdout
