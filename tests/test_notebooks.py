"""Every notebook in notebooks/ runs top to bottom (smoke settings: a tiny teacher, a few steps), in a kernel of
this very Python, in a temporary folder; the repository's notebook files are only read."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_found_and_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_quickstart.ipynb", "02_compare_methods.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert not any(cell.outputs or cell.execution_count for cell in code), f"clear the outputs of {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LD_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("LD_NOTEBOOK_TEACHER", tiny_teacher_dir)
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOKS[0].parents[1]))  # the kernel imports this checkout
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, if a cell fails
    kernel_python = nb.cells[0].outputs[0]["text"].strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve(), (
        f"the kernel ran {kernel_python}, not {sys.executable}: install this venv's kernel with "
        f"`{sys.executable} -m ipykernel install --sys-prefix`")
