"""The notebooks in notebooks/ run from top to bottom on small data and draw their figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: Figures (image/png outputs) each notebook must produce.
EXPECTED_FIGURES = {"quickstart.ipynb": 3, "out_of_core.ipynb": 2, "model_selection.ipynb": 2}
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_every_notebook_is_executed_by_this_suite():
    assert {path.name for path in NOTEBOOKS} == set(EXPECTED_FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    # Prose above every code cell except a figure that continues the previous cell's section.
    code_cells = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    assert sum(nb.cells[i - 1].cell_type == "markdown" for i in code_cells) >= len(code_cells) - 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_and_draws_its_figures(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DGMM_NOTEBOOK_SMALL", "1")  # the kernel inherits it: small data
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) >= EXPECTED_FIGURES[path.name], f"{path.name}: {len(figures)} figures"
