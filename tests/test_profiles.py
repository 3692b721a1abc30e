import pytest

from ris_utils import profiles, record, recorded


def test_step_config_merges_shared_section_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "papermill_runs").mkdir()
    (tmp_path / "papermill_runs" / "p.yaml").write_text(
        "shared: {seed: 1, data_root: data/p}\nmasks: {backend: sam, amg: {points_per_side: 32, pred_iou_thresh: 0.5}}\n"
    )
    monkeypatch.setenv("PSEUDO_RIS_ROOT", str(tmp_path))
    cfg = profiles.step_config("p", "masks", backend=None, amg={"points_per_side": 8})
    assert cfg["backend"] == "sam"  # None = take it from the profile
    assert cfg["amg"] == {"points_per_side": 8, "pred_iou_thresh": 0.5}  # deep merge
    assert cfg["seed"] == 1 and cfg["profile"] == "p"
    assert cfg["data_root"] == str((tmp_path / "data" / "p").resolve())
    with pytest.raises(KeyError, match="no section 'ris'"):
        profiles.step_config("p", "ris")
    with pytest.raises(FileNotFoundError, match="unknown profile 'nope'"):
        profiles.load_profile("nope")


def test_extends_merges_the_base_profile_section_by_section(tmp_path, monkeypatch):
    d = tmp_path / "papermill_runs"
    d.mkdir()
    (d / "base.yaml").write_text("shared: {seed: 1, note: base}\nris: {epochs: 2, lr: 0.1, experiments: {seeds: [0, 1], "
                                 "workers: 2}}\ncaptions: {modes: [naive]}\n")
    (d / "long.yaml").write_text("extends: base\nshared: {note: long}\nris: {epochs: 10, experiments: {seeds: [0, 1, 2]}}\n")
    monkeypatch.setenv("PSEUDO_RIS_ROOT", str(tmp_path))
    cfg = profiles.step_config("long", "ris")
    assert cfg["epochs"] == 10 and cfg["lr"] == 0.1  # overridden / inherited
    assert cfg["experiments"] == {"seeds": [0, 1, 2], "workers": 2}  # nested merge, lists replace
    assert cfg["note"] == "long" and cfg["profile"] == "long" and cfg["seed"] == 1
    assert profiles.step_config("long", "captions")["modes"] == ["naive"]
    assert profiles.step_config("base", "ris")["epochs"] == 2  # the base is untouched
    (d / "loop.yaml").write_text("extends: loop2\nshared: {}\n")
    (d / "loop2.yaml").write_text("extends: loop\nshared: {}\n")
    with pytest.raises(ValueError, match="'extends' loops"):
        profiles.load_profile("loop")
    (d / "orphan.yaml").write_text("extends: missing\nshared: {}\n")
    with pytest.raises(FileNotFoundError, match="extends: missing"):
        profiles.load_profile("orphan")


def test_parse_params():
    assert profiles.parse_params(["a.b=1", "c=x", "d=[1, 2]"]) == {"a": {"b": 1}, "c": "x", "d": [1, 2]}
    with pytest.raises(ValueError, match="key=value"):
        profiles.parse_params(["novalue"])


def test_shipped_profiles_load():
    names = profiles.available_profiles()
    assert "shapes" in names
    for name in names:
        prof = profiles.load_profile(name)
        assert "shared" in prof


def test_record_validates_and_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("PSEUDO_RIS_METRICS", raising=False)
    record("a.b", 0.5)
    assert recorded()["a.b"] == 0.5
    target = tmp_path / "m.json"
    monkeypatch.setenv("PSEUDO_RIS_METRICS", str(target))
    record("x", 1)
    record("y", "short")
    import json

    assert json.loads(target.read_text()) == {"x": 1, "y": "short"}
    with pytest.raises(ValueError):
        record("bad name", 1)
    with pytest.raises(ValueError):
        record("nan", float("nan"))
    with pytest.raises(TypeError):
        record("obj", object())
