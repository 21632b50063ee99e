"""Committed notebooks carry no outputs and have a papermill parameters cell."""

import ast

import nbformat
import pytest

from lib.params import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_parsable_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
    tree = ast.parse(tagged[0].source)
    assert tree.body and all(isinstance(node, ast.Assign) for node in tree.body)
    # papermill's own parser must see every parameter (it skips lines it cannot parse, e.g. some trailing comments)
    from papermill.translators import PythonTranslator

    assigned = [target.id for node in tree.body for target in node.targets]
    assert [p.name for p in PythonTranslator.inspect(tagged[0])] == assigned, (
        f"{path.name}: papermill cannot parse a parameter line"
    )


def test_stage_notebooks_exist():
    from lib.pipeline import STAGES

    assert all((ROOT / "notebooks" / name).is_file() for name in STAGES.values())
