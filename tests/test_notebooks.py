"""Every numbered notebook: stored without outputs, exactly one `parameters` cell with `profile`; code cells of
at most 15 lines that call no private (underscore) name of the package; notebooks 02-05 stop at their start
check, naming the notebook to run first, when their inputs are missing."""

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from ris_utils.runs import NOTEBOOK_RE

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if NOTEBOOK_RE.match(p.name))
MAX_CELL_LINES = 15


def code_cells(path):
    return [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]


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


# ------------------------------------------------------------------------------------------ thin cells


def long_cells(path, limit=MAX_CELL_LINES):
    """(cell number among the code cells, non-empty lines) of every code cell longer than ``limit``."""
    out = []
    for i, c in enumerate(code_cells(path)):
        n = sum(1 for line in c.source.splitlines() if line.strip())
        if n > limit:
            out.append((i, n))
    return out


def private_calls(*sources: str) -> list[str]:
    """Private (single-underscore) names of ``ris_utils`` that cells import or reach through an attribute of a
    name they import from the package (the names bound by imports count across all the given cells)."""
    trees = [ast.parse(s) for s in sources]
    package_names, hits = set(), []
    for node in (n for t in trees for n in ast.walk(t)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ris_utils":
                    package_names.add(a.asname or a.name.split(".")[0])
                    hits += [a.name for part in a.name.split(".") if part.startswith("_")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ris_utils":
            hits += [f"{node.module}.{part}" for part in node.module.split(".") if part.startswith("_")]
            for a in node.names:
                package_names.add(a.asname or a.name)
                if a.name.startswith("_"):
                    hits.append(f"{node.module}.{a.name}")
    for node in (n for t in trees for n in ast.walk(t)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in package_names:
                hits.append(ast.unparse(node))
    return hits


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_code_cells_are_short(path):
    assert not long_cells(path), f"{path.name}: code cells (index, lines) over {MAX_CELL_LINES}: {long_cells(path)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_private_package_names(path):
    # the notebooks hold only the package's imports, so a name they import is the package's
    found = private_calls(*(c.source for c in code_cells(path)))
    assert not found, f"{path.name} calls private names of ris_utils: {found}"


def test_the_structure_checks_catch_what_they_forbid(tmp_path):
    """The two checks above fail on a long cell and on each way of reaching a private name."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("\n".join(f"x{i} = {i}" for i in range(16))),
                nbformat.v4.new_code_cell("x = 1\n\n\n" * 5)]  # 5 lines + blank lines: short
    p = tmp_path / "07_x.ipynb"
    nbformat.write(nb, str(p))
    assert long_cells(p) == [(0, 16)]
    assert private_calls("from ris_utils import filtering", "filtering._extractor(cfg).backend") == [
        "filtering._extractor"]  # imported in one cell, called in another (notebook 03 before this change)
    assert private_calls("import ris_utils.filtering\nris_utils.filtering._x()") == ["ris_utils.filtering._x"]
    assert private_calls("from ris_utils.filtering import _extractor") == ["ris_utils.filtering._extractor"]
    assert private_calls("from ris_utils.ris import experiments as ex\nex.foo._bar") == ["ex.foo._bar"]
    assert private_calls("import pandas as pd\npd._libs\nfrom ris_utils import viz\nviz.flatten({})") == []
    assert private_calls("from ris_utils import viz\nviz.__name__") == []


# ------------------------------------------------------------------------------------------ start checks


FIRST = {"02": "01_mask_proposals.ipynb", "03": "02_distinctive_captions.ipynb", "04": "03_distinctiveness_filtering.ipynb",
         "05": "04_ris_training.ipynb"}


def run_until_error(path: Path, params: dict, max_cells: int = 12):
    """Execute a notebook's code cells in this process (the Colab cell is a no-op off Colab), the parameters
    cell followed by ``params``; return (cells run, the exception that stopped them or None)."""
    from IPython.display import display

    ns = {"display": display, "__name__": "__main__"}
    for k, c in enumerate(code_cells(path)[:max_cells]):
        try:
            exec(compile(c.source, f"{path.name}#cell{k}", "exec"), ns)
            if "parameters" in c.metadata.get("tags", []):
                ns.update(params)
        except Exception as e:  # noqa: BLE001 - the error is what the test looks at
            return k, e
    return max_cells, None


@pytest.mark.parametrize("number", sorted(FIRST))
def test_start_check_names_the_notebook_to_run_first(number, tmp_path):
    """With an empty work_dir, a notebook 02-05 stops right after reading its settings (before loading a model
    or any step's work) with one line naming the notebook and the command that write its inputs."""
    prof = yaml.safe_load((ROOT / "papermill_runs" / "shapes.yaml").read_text())
    prof["shared"]["work_dir"] = str(tmp_path / "work")
    prof_path = tmp_path / "empty.yaml"
    prof_path.write_text(yaml.safe_dump(prof))
    path = next(p for p in NOTEBOOKS if p.name.startswith(number))
    cells = code_cells(path)
    params_at = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    ran, err = run_until_error(path, {"profile": str(prof_path)})
    assert isinstance(err, FileNotFoundError), f"{path.name}: expected the start check to fail, got {err!r}"
    msg = str(err)
    assert FIRST[number] in msg and "python -m ris_utils" in msg and str(tmp_path / "work") in msg, msg
    assert "\n" not in msg
    assert ran <= params_at + 3, f"{path.name}: the start check ran at code cell {ran}, not at the start"
    assert re.search(r"check_inputs|require", cells[ran].source)
