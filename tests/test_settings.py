"""Typed profiles (ris_utils.settings): unknown keys refused at load time, defaults written once."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from ris_utils import profiles, settings
from ris_utils.__main__ import main

SHIPPED = ("shapes", "paper", "paper-tiny")
STEPS = ("data", "masks", "captions", "filter", "export", "ris", "tables")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_every_step_resolves(name):
    for step in STEPS:
        cfg = profiles.step_config(name, step)
        assert cfg["step"] == step and cfg["profile"] == name
        for key, value in settings.defaults(step).items():  # every top-level key is present
            assert key in cfg, (name, step, key)
            if value is not None and key not in (profiles.load_profile(name).get(step) or {}):
                assert cfg[key] == value or key in profiles.load_profile(name)["shared"]


def test_cli_param_typo_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "masks_out"
    rc = main(["masks", "--profile", "shapes", "--split", "train", "--out", str(out), "--param", "backendd=sam"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert len(err.splitlines()) == 1
    assert "unknown setting 'masks.backendd'" in err and "did you mean 'masks.backend'" in err and "--param" in err


def test_cli_param_typo_exits_non_zero_as_a_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ris_utils", "masks", "--profile", "shapes", "--split", "train",
                          "--out", str(tmp_path / "o"), "--param", "backendd=sam"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert "did you mean 'masks.backend'" in res.stderr


def test_profile_file_with_a_misspelt_key_is_refused_naming_the_file(tmp_path, capsys):
    prof = yaml.safe_load((profiles.profiles_dir() / "shapes.yaml").read_text())
    prof["masks"]["componentz"] = prof["masks"].pop("components")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(settings.UnknownSettingError, match=r"'masks.componentz' in profile file .*typo.yaml; "
                                                           r"did you mean 'masks.components'"):
        profiles.load_profile(path)
    rc = main(["masks", "--profile", str(path), "--split", "train", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "typo.yaml" in err and "masks.components" in err and not (tmp_path / "o").exists()


def test_nested_and_section_typos_in_a_profile_file(tmp_path):
    for text, bad, good in (("shared: {}\nmaskz: {backend: sam}\n", "'maskz'", "'masks'"),
                            ("shared: {}\nfilter: {clip: {train: {stepz: 3}}}\n", "'filter.clip.train.stepz'",
                             "'filter.clip.train.steps'"),
                            ("shared: {}\nris: {experiments: {eval_sets: [{styel: x}]}}\n",
                             "'ris.experiments.eval_sets[0].styel'", "'ris.experiments.eval_sets[0].style'"),
                            ("shared: {sead: 1}\n", "'shared.sead'", "'shared.seed'")):
        (tmp_path / "p.yaml").write_text(text)
        with pytest.raises(settings.UnknownSettingError) as e:
            profiles.load_profile(tmp_path / "p.yaml")
        assert bad in str(e.value) and f"did you mean {good}" in str(e.value) and "p.yaml" in str(e.value)


def test_notebook_override_typo_is_refused_and_valid_overrides_work():
    with pytest.raises(settings.UnknownSettingError, match="'captions.max_image'.*did you mean 'captions.max_images'"):
        profiles.step_config("shapes", "captions", max_image=3)
    with pytest.raises(settings.UnknownSettingError, match="'ris.experiments.seedz'"):
        profiles.step_config("shapes", "ris", experiments={"seedz": [0]})
    cfg = profiles.step_config("shapes", "captions", max_images=3, seed=5, beam={"num_beams": 2}, threads=None)
    assert cfg["max_images"] == 3 and cfg["seed"] == 5 and cfg["threads"] == 1  # None = the profile's
    assert cfg["beam"] == {"num_beams": 2, "num_beam_groups": 3}  # nested overrides merge
    masks = profiles.step_config("shapes", "masks", **profiles.parse_params(["backend=sam", "amg.points_per_side=4"]))
    assert masks["backend"] == "sam" and masks["amg"]["points_per_side"] == 4


def test_cli_valid_param_still_works(tmp_path):
    from ris_utils.data import shapes

    world = tmp_path / "world"
    shapes.generate_world(world, {"train": 2, "val": 1, "testA": 1, "testB": 1}, seed=0)
    rc = main(["masks", "--profile", "shapes", "--split", "train", "--out", str(tmp_path / "o"),
               "--param", f"data_root={world}", "--param", "components.min_area=30", "--no-progress"])
    assert rc == 0 and (tmp_path / "o" / "train" / "records.jsonl").is_file()


def test_defaults_fill_missing_keys_once(tmp_path, monkeypatch):
    (tmp_path / "papermill_runs").mkdir()
    (tmp_path / "papermill_runs" / "p.yaml").write_text("shared: {}\nfilter: {fallback: drop, logit_scale: null}\n")
    monkeypatch.setenv("PSEUDO_RIS_ROOT", str(tmp_path))
    cfg = profiles.step_config("p", "filter")
    assert cfg["fallback"] == "drop" and cfg["nonpositive"] == "clamp" and cfg["batch_size"] == 256
    assert cfg["logit_scale"] is None and cfg["seed"] == 0 and cfg["device"] == "auto"
    assert "clip" not in cfg  # nested option groups are filled where they are used (settings.group)
    assert settings.group(settings.CaptionerTrain, {"steps": 3})["batch_size"] == 64
    with pytest.raises(settings.UnknownSettingError, match="did you mean 'steps'"):
        settings.group(settings.CaptionerTrain, {"stepz": 3}, "captions.train")
    full = settings.complete("export", {"dataset": "x", "order": None})
    assert full["dataset"] == "x" and full["order"] == "generation"
    assert settings.typed("export", full).order == "generation"


def test_the_captioner_defaults_are_the_profile_values():
    shapes = profiles.load_profile("shapes")["captions"]["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(settings.CaptionerTrain)}
    assert defaults == shapes  # one value (the profile's): 1400 steps, batch 64
    clip = profiles.load_profile("shapes")["filter"]["clip"]["train"]
    assert {f.name: f.default for f in dataclasses.fields(settings.ClipTrain) if f.name != "fill"} == clip


def test_the_ris_section_is_checked_but_left_as_given():
    """notebook 04's job keys hash the ris config: keys the profile does not set must not appear (else every
    finished run would be trained again); ris.train.resolve_config fills them."""
    prof = profiles.load_profile("shapes")
    cfg = profiles.step_config("shapes", "ris")
    assert set(cfg) - {"note"} == set(prof["shared"]) | set(prof["ris"]) | {"step"}
    assert "ris" in settings.NOT_FILLED


def test_every_ris_default_is_a_setting():
    """ris.train.DEFAULTS (until the ris code reads settings.Ris): every key a field, the same value."""
    from ris_utils.ris.train import DEFAULTS

    fields = {f.name: f for f in dataclasses.fields(settings.Ris)}
    for key, value in DEFAULTS.items():
        if key in ("seed", "device"):
            assert key in {f.name for f in dataclasses.fields(settings.Shared)}
            continue
        assert key in fields, f"ris.train.DEFAULTS[{key!r}]: add the field to ris_utils.settings.Ris"
        if fields[key].default not in (None, dataclasses.MISSING):
            assert fields[key].default == value, key
