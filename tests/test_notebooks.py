"""notebooks/: each one executes top to bottom (tiny settings) and is stored without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The dev extra installs these; the GPU image does not have them, and its `-m gpu` run must still collect.
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there():
    assert {path.name for path in NOTEBOOKS} >= {"quickstart.ipynb", "replication.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: tiny settings (read by each notebook's first cell), the
    # fast pure-torch norm path, this checkout's hf_gns first on the path, and no network.
    monkeypatch.setenv("HF_GNS_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("HF_GNS_BACKEND", "torch")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks its inline backend
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    images = [
        out
        for cell in notebook.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} drew no plot"
    # what a cell shows is printed on purpose: no stray value of a last expression (quickstart's "5")
    stray = [
        out
        for cell in notebook.cells
        for out in cell.get("outputs", [])
        if out.output_type == "execute_result"
    ]
    assert not stray, f"{path.name}: a cell ends in an expression whose value is shown: {stray[0]}"
    # item 12 in the notebooks: no library noise in red before the first result
    noise = [
        out.text
        for cell in notebook.cells
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and "IProgress not found" in out.text
    ]
    assert not noise, f"{path.name}: {noise[0]}"
