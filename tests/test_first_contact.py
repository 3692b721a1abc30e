"""A clean first contact (issue 12): loading the committed shapes checkpoints prints no open_clip
"initialized randomly" warning, the package metadata uses an SPDX license string, ipywidgets is there."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

from ris_utils import profiles

ROOT = Path(__file__).resolve().parents[1]


def _assert_quiet(caplog, capsys):
    text = caplog.text + "".join(capsys.readouterr())
    assert "initialized randomly" not in text and "No pretrained weights" not in text, text


def test_committed_shapes_checkpoints_load_without_the_random_init_warning(caplog, capsys):
    from ris_utils.captioning.train import load_captioner
    from ris_utils.filtering import build_clip

    caplog.set_level(logging.INFO)
    cap = load_captioner(profiles.step_config("shapes", "captions"), device="cpu")
    assert cap.card is not None  # the committed checkpoint, not a freshly trained one
    build_clip(profiles.step_config("shapes", "filter"), device="cpu")
    _assert_quiet(caplog, capsys)


def test_quiet_random_init_hides_only_that_warning(caplog):
    from ris_utils.models import quiet_random_init

    caplog.set_level(logging.INFO)
    with quiet_random_init():
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        logging.warning("something else")
    logging.warning("after: Model initialized randomly.")
    assert "something else" in caplog.text and caplog.text.count("initialized randomly") == 1


def test_pyproject_license_is_an_spdx_string_and_widgets_are_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # a table is deprecated by setuptools >= 77
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    import ipywidgets  # noqa: F401  (tqdm.auto renders widgets in JupyterLab instead of a TqdmWarning)
