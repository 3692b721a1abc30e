"""The orchestrator and the layout: a step with a missing input names what to run first; only the pipeline runs
an earlier step; the resolved config is saved beside each output; every path comes from ris_utils.layout."""

import json

import pytest
import yaml

from ris_utils import export, filtering, layout, pipeline, profiles
from ris_utils.__main__ import main


def _cfg(tmp_path, step, **kw):
    return profiles.step_config("shapes", step, data_root=str(tmp_path / "data"), work_dir=str(tmp_path / "work"),
                                **kw)


def test_layout_paths():
    cfg = {"work_dir": "/w", "data_root": "/d", "profile": "p"}
    assert str(layout.masks_dir(cfg, "train")) == "/w/masks/train"
    assert layout.step_dirs(cfg, "naive", "val", 3, 0) == (layout.captions_dir("/w", "naive", "val_seed3"),
                                                          layout.filter_dir("/w", "naive", "val_seed3"))
    assert str(layout.captions_dir(cfg, "distinctive", "train", 0, 0)) == "/w/captions/distinctive/train"
    assert str(layout.export_dir(cfg, "pseudo_ris")) == "/w/export/pseudo_ris"
    assert str(layout.captioner_cache(cfg, "coca_shapes")) == "/w/captioner/coca_shapes.pt"
    assert str(layout.feature_cache_dir(cfg)) == "/w/ris/features"
    assert str(layout.refs_path(cfg, "shapes", "shapes")) == "/d/shapes/refs(shapes).p"
    assert str(layout.image_dir(cfg)) == "/d/images/train2014"  # nothing there: the REFER toolkit's folder
    assert filtering.step_dirs is layout.step_dirs
    with pytest.raises(ValueError, match="work_dir is not set .*shared.work_dir"):
        layout.masks_dir({"profile": "p"}, "train")
    with pytest.raises(ValueError, match="runs_dir must be a folder name"):
        layout.ris_runs_dir(cfg, "../x")


def test_require_names_the_notebook_and_the_command(tmp_path):
    ccfg = _cfg(tmp_path, "captions")
    with pytest.raises(pipeline.MissingInput) as e:
        pipeline.require(ccfg, "captions")
    msg = str(e.value)
    assert "captions/naive/train not found" in msg
    assert ("run notebooks/02_distinctive_captions.ipynb (or `python -m ris_utils.runs --profile shapes --only 02`)"
            " first") in msg
    with pytest.raises(pipeline.MissingInput, match="01_mask_proposals.ipynb .*--only 01"):
        pipeline.require(ccfg, "masks", splits=["val"])
    for mode in ("naive", "distinctive"):
        for split in ("train", "val"):
            d = layout.captions_dir(ccfg, mode, split)
            d.mkdir(parents=True)
            (d / layout.RECORDS).write_text("")
    assert len(pipeline.require(ccfg, "captions")) == 4
    ecfg = _cfg(tmp_path, "export")
    with pytest.raises(pipeline.MissingInput, match="export/naive .*03_distinctiveness_filtering.ipynb"):
        pipeline.require(ecfg, "export")


def test_a_step_with_missing_input_fails_naming_the_step_to_run_first(tmp_path):
    fcfg = _cfg(tmp_path, "filter")
    cdir, fdir = layout.step_dirs(fcfg, "naive", "train", 0, 0)
    with pytest.raises(FileNotFoundError, match=r"run the captions step first \(notebook 02_distinctive_captions"):
        filtering.run_filter_jobs(fcfg, [(cdir, fdir)])
    with pytest.raises(FileNotFoundError, match="run the captions step first"):
        filtering.run_filter(cdir, fdir, fcfg)
    ecfg = _cfg(tmp_path, "export")
    with pytest.raises(FileNotFoundError, match=r"export.trainsets.naive: .*captions/naive/train/records.jsonl not "
                                                r"found: run the captions"):
        export.write_trainsets(ecfg)
    assert not fdir.exists() and not layout.export_dir(ecfg).exists()


def test_cli_filter_without_captions_names_the_step_and_saves_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["filter", "--profile", "shapes", "--candidates", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert "02_distinctive_captions.ipynb" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_resolved_config_is_saved_beside_the_output(tmp_path):
    cfg = _cfg(tmp_path, "export", order="doc")
    out = profiles.save_config(cfg, tmp_path / "out")
    saved = yaml.safe_load(out.read_text())
    assert out.name == "config.yaml" and saved == json.loads(json.dumps(cfg))
    assert saved["order"] == "doc" and saved["step"] == "export" and saved["profile"] == "shapes"


def test_commands_go_through_the_orchestrator():
    from ris_utils import __main__ as cli

    assert cli.COMMANDS is pipeline.COMMANDS
    assert [s.name for s in pipeline.STEPS] == ["data", "masks", "captions", "filter", "export", "ris", "tables"]
    assert pipeline.run_first("filter", "paper") == ("run notebooks/03_distinctiveness_filtering.ipynb "
                                                     "(or `python -m ris_utils.runs --profile paper --only 03`) first")
