"""The papermill runner: order, parameter injection, metrics merge, and a clear stop on failure."""

import json

import nbformat
import pytest

from ris_utils import runs


def _notebook(path, code_cells, params="profile = 'x'\nvalue = 1"):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), p] + [nbformat.v4.new_code_cell(c) for c in code_cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "papermill_runs").mkdir()
    (tmp_path / "papermill_runs" / "toy.yaml").write_text(
        "shared: {seed: 3}\nnotebooks:\n  '01': {value: 7}\n"
    )
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setenv("PSEUDO_RIS_ROOT", str(tmp_path))
    return tmp_path


def test_runs_in_order_injects_parameters_and_merges_metrics(project):
    nbs = project / "notebooks"
    # 01 reads a file written by 00: only works when the order is numeric
    _notebook(nbs / "00_first.ipynb", ["import ris_utils, pathlib",
                                       "pathlib.Path('order.txt').write_text('00')",
                                       "ris_utils.record('first.value', value)"])
    _notebook(nbs / "01_second.ipynb", ["import ris_utils, pathlib",
                                        "assert pathlib.Path('order.txt').read_text() == '00'",
                                        "ris_utils.record('second.value', value * 2)",
                                        "ris_utils.record('second.profile', profile)"])
    _notebook(nbs / "notes.ipynb", ["raise RuntimeError('unnumbered notebooks are not run')"])
    metrics = runs.run_profile("toy", progress=False)
    out = project / "papermill_runs" / "output" / "toy"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert on_disk["first.value"] == 1
    assert on_disk["second.value"] == 14  # value=7 injected from the profile's notebooks.01 entry
    assert on_disk["second.profile"] == "toy"
    assert "runtime.00_first.seconds" in on_disk
    assert (out / "00_first.ipynb").exists() and (out / "01_second.ipynb").exists()
    executed = nbformat.read(str(out / "01_second.ipynb"), as_version=4)
    assert executed.metadata.papermill.parameters["value"] == 7
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


def test_only_and_params(project):
    nbs = project / "notebooks"
    _notebook(nbs / "00_a.ipynb", ["raise RuntimeError('00 must not run')"])
    _notebook(nbs / "01_b.ipynb", ["import ris_utils", "ris_utils.record('b', value)"])
    metrics = runs.run_profile("toy", only=["1"], params={"value": 5}, progress=False)
    assert metrics["b"] == 5
    with pytest.raises(SystemExit, match="no notebook numbered 07"):
        runs.run_profile("toy", only=["07"], progress=False)


def test_failing_notebook_stops_with_cell_and_error(project, capsys):
    nbs = project / "notebooks"
    _notebook(nbs / "00_ok.ipynb", ["import ris_utils", "ris_utils.record('ok', 1)"])
    _notebook(nbs / "01_bad.ipynb", ["x = 1", "raise ValueError('boom in cell')"])
    _notebook(nbs / "02_never.ipynb", ["import ris_utils", "ris_utils.record('never', 1)"])
    with pytest.raises(SystemExit) as exc:
        runs.run_profile("toy", progress=False)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "01_bad.ipynb" in err
    assert "raise ValueError('boom in cell')" in err  # the failing cell's source
    assert "ValueError: boom in cell" in err
    out = project / "papermill_runs" / "output" / "toy"
    assert (out / "01_bad.ipynb").exists()  # partly executed notebook kept
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ok"] == 1 and "never" not in metrics


def test_cli_exit_code(project):
    _notebook(project / "notebooks" / "00_bad.ipynb", ["1/0"])
    with pytest.raises(SystemExit) as exc:
        runs.main(["--profile", "toy", "--no-progress"])
    assert exc.value.code == 1


def test_rerun_replaces_a_notebooks_keys_and_keeps_the_others(project):
    nbs = project / "notebooks"
    _notebook(nbs / "00_a.ipynb", ["import ris_utils", "ris_utils.record('a.kept', 1)"])
    _notebook(nbs / "01_b.ipynb", ["import ris_utils", "ris_utils.record('b.old', 1)"])
    runs.run_profile("toy", progress=False)
    _notebook(nbs / "01_b.ipynb", ["import ris_utils", "ris_utils.record('b.new', 2)"])
    metrics = runs.run_profile("toy", only=["01"], progress=False)
    assert metrics["a.kept"] == 1 and metrics["b.new"] == 2
    assert "b.old" not in metrics  # no stale number survives a rerun
