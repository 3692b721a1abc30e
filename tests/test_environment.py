"""environment.yml (conda) and pyproject.toml name the same packages with the same pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*(?:;.*)?$")


def normalise(name: str) -> str:
    """PEP 503 name: case-insensitive, runs of '-', '_', '.' are equal (open_clip_torch == open-clip-torch)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(lines: list[str], where: str) -> dict[str, str]:
    """``{normalised name: pin without spaces}`` ('' when unpinned); pip options such as ``-e .`` skipped."""
    out: dict[str, str] = {}
    for line in lines:
        if not isinstance(line, str):
            raise AssertionError(f"{where}: unexpected entry {line!r}")
        if line.strip().startswith("-"):
            continue
        m = _REQ.match(line)
        assert m, f"{where}: cannot parse requirement {line!r}"
        name = normalise(m.group(1))
        assert name not in out, f"{where}: {m.group(1)} listed twice"
        out[name] = re.sub(r"\s+", "", m.group(2))
    return out


def conda_env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml: expected exactly one pip: section under dependencies"
    return sections[0]


def test_normalise_and_parse():
    assert normalise("Open_Clip.Torch") == normalise("open-clip-torch")
    assert parse_requirements(["torch == 2.14.1", "PyYAML", "-e .", "x[extra]>=1,<2"], "t") == {
        "torch": "==2.14.1", "pyyaml": "", "x": ">=1,<2"}


def test_environment_yml_and_pyproject_agree():
    env_reqs = parse_requirements(pip_section(conda_env()), "environment.yml pip")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    proj_reqs = parse_requirements(project["dependencies"], "pyproject.toml [project].dependencies")
    only_env = sorted(set(env_reqs) - set(proj_reqs))
    only_proj = sorted(set(proj_reqs) - set(env_reqs))
    assert not only_env and not only_proj, (
        f"only in environment.yml: {only_env}; only in pyproject.toml: {only_proj}")
    differ = {n: (env_reqs[n], proj_reqs[n]) for n in env_reqs if env_reqs[n] != proj_reqs[n]}
    assert not differ, f"pins differ (environment.yml, pyproject.toml): {differ}"


def test_environment_yml_pins_python_311_and_installs_the_package():
    env = conda_env()
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pythons = [d for d in conda if re.match(r"^python\s*[=<>!]", d) or d == "python"]
    assert len(pythons) == 1, f"environment.yml: expected one python entry, got {pythons}"
    assert re.fullmatch(r"python\s*==?\s*3\.11(\.\*|\.\d+)?", pythons[0]), pythons[0]
    assert "pip" in conda
    assert any(str(x).replace(" ", "") in ("-e.", "-e./") for x in pip_section(env)), \
        "environment.yml: the pip section should install the package itself (-e .)"


@pytest.mark.parametrize("pkg, pin", [("torch", "==2.14.1"), ("torchvision", "==0.29.1")])
def test_torch_pins(pkg, pin):
    """torch 2.14.1 + torchvision 0.29.1: the only pair measured to work here (see DEVELOPERS.md)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert parse_requirements(project["dependencies"], "pyproject.toml")[pkg] == pin
