"""Runs a notebook end to end in a real Jupyter kernel, the way Colab or papermill would.

`run_notebook(path, parameters, cwd)` reads the notebook, injects the test's settings papermill-style
(a new cell right after the one tagged `parameters`, so that the notebook's own defaults are what a
user sees and the test only overrides them), and executes every cell in order with nbclient in an
IPython kernel of this interpreter (`python3` kernel spec of ipykernel: the same venv, and the test
process's environment — JAX_PLATFORMS, the compile cache, and `tests/subprocess_warnings` on
PYTHONPATH, so a deprecation of our stack fails the notebook as it would fail a test). A failing cell
raises `nbclient.exceptions.CellExecutionError` naming the cell and its traceback.

The executed notebook is returned (outputs included) and written to `cwd/<name>.executed.ipynb`, which
pytest keeps for a failed test (`tmp_path`).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def parameters_source(parameters: Mapping[str, Any]) -> str:
    """`NAME = repr(value)` lines: the values must be literals (str, numbers, None, lists, dicts)."""
    lines = ["# Parameters injected by the test suite (papermill-style)"]
    lines += [f"{name} = {value!r}" for name, value in parameters.items()]
    return "\n".join(lines) + "\n"


def run_notebook(
    name: str, parameters: Mapping[str, Any], cwd: str | os.PathLike, *, timeout: int = 600
):
    """Executes notebooks/`name` with `parameters` injected; returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    unknown = set(parameters) - _assigned_names(nb.cells[tagged[0]].source)
    assert not unknown, (
        f"{name}: injected parameters {sorted(unknown)} are not in its parameters cell"
    )
    injected = nbformat.v4.new_code_cell(
        parameters_source(parameters), metadata={"tags": ["injected-parameters"]}
    )
    nb.cells.insert(tagged[0] + 1, injected)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": os.fspath(cwd)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, Path(cwd) / name.replace(".ipynb", ".executed.ipynb"))
    return nb


def _assigned_names(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.add(t.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def cell_outputs(nb, tag: str) -> str:
    """The text (stdout + plain-text results) of the code cell tagged `tag`."""
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    text = []
    for out in cells[0].get("outputs", []):
        if out.get("output_type") == "stream":
            text.append(out.get("text", ""))
        elif "data" in out and "text/plain" in out["data"]:
            text.append(out["data"]["text/plain"])
    return "".join(text)


def has_image_output(nb) -> bool:
    """Whether any cell displayed a picture (PNG)."""
    return any(
        "image/png" in out.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
    )
