"""Every numbered notebook: stored without outputs, exactly one `parameters` cell with `profile`."""

from pathlib import Path

import nbformat
import pytest

from ris_utils.runs import NOTEBOOK_RE

NOTEBOOKS = sorted(p for p in (Path(__file__).parents[1] / "notebooks").glob("*.ipynb") if NOTEBOOK_RE.match(p.name))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_clean_and_parametrised(path):
    nb = nbformat.read(str(path), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(params)}"
    assert "profile" in params[0].source, f"{path.name}: the parameters cell must define `profile`"
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, f"{path.name}: stored with outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def test_notebooks_are_numbered_uniquely():
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert len(numbers) == len(set(numbers))
