"""The notebooks of examples/notebooks are committed without outputs, each a recipe run here and
remotely that ends in a figure (tests/integration/test_notebooks.py executes them in a kernel)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "examples" / "notebooks").glob("*.ipynb"))


def test_the_cookbooks_main_recipes_are_notebooks():
    assert {path.stem for path in NOTEBOOKS} == {"logit_lens", "patching", "attribution", "attention", "steering"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_a_notebook_is_committed_without_outputs_and_ends_in_a_figure(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "clear the outputs"
    source = "\n".join(cell.source for cell in code)
    assert "remote=False" in source and "remote=True" in source and "assert" in source  # both runs, compared
    assert "fig" in code[-1].source and "plt." in code[-1].source  # it ends in a matplotlib figure
    assert notebook.metadata["kernelspec"]["name"] == "python3"
