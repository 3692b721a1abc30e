"""Profiles: every setting of a run lives in ``papermill_runs/<profile>.yaml``, not in code.

A profile file has a ``shared`` section (keys every step sees), one section per step (``data``,
``masks``, ``captions``, ``filter``, ``export``, ``ris``, ``tables``) and optionally ``notebooks``
(extra papermill parameters per notebook number). The notebooks and the CLI both call
:func:`step_config`, so a notebook and a CLI run of the same profile do the same thing.

The sections and their defaults are the dataclasses of :mod:`ris_utils.settings`: a profile file with an
unknown key, or an unknown ``--param`` / notebook override, is refused when it is loaded (one line naming
the key, the file or the overrides, and the closest valid key); :func:`step_config` fills every key the
profile does not set with its default, so a step reads ``cfg["key"]``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from ris_utils import settings

#: Keys whose values are paths, resolved against the project root when relative.
PATH_KEYS = ("data_root", "work_dir", "output_dir", "checkpoint", "images", "cache_dir", "external_masks")


def project_root() -> Path:
    """The repository root: ``$PSEUDO_RIS_ROOT``, else the folder above the package, else the cwd."""
    env = os.environ.get("PSEUDO_RIS_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "papermill_runs").is_dir():
        return here
    cwd = Path.cwd().resolve()
    for p in (cwd, *cwd.parents):
        if (p / "papermill_runs").is_dir():
            return p
    return cwd


def profiles_dir() -> Path:
    return project_root() / "papermill_runs"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml") if p.stem != "paper_numbers")


def profile_path(profile: str | os.PathLike) -> Path:
    """Path of a profile given by name (``shapes``) or as a path to a YAML file."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"profile file {p} does not exist")
        return p
    path = profiles_dir() / f"{profile}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"unknown profile {profile!r}: {path} does not exist; available: {', '.join(available_profiles())}"
        )
    return path


def deep_merge(base: dict, override: dict) -> dict:
    """Merge ``override`` into a copy of ``base``; nested dicts merge, ``None`` values are ignored."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_profile(profile: str | os.PathLike, _chain: tuple = ()) -> dict:
    """Load a profile file as a dict (``name`` is set to the profile's name).

    A profile may start with ``extends: <profile>``: it is then the named profile (same folder) with this
    file's settings merged over it section by section (:func:`deep_merge`: nested mappings merge, lists and
    values replace, ``null`` keeps the base value) -- e.g. a variant of ``shapes`` with a longer RIS grid.
    """
    path = profile_path(profile)
    if path.resolve() in _chain:
        raise ValueError(f"profile file {path}: 'extends' loops ({' -> '.join(p.stem for p in _chain)} -> "
                         f"{path.stem}); remove one of the 'extends:' lines")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"profile file {path} is not valid YAML{where}: {what}; fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"profile file {path} must be a mapping with a 'shared' section")
    settings.check_profile(data, f"profile file {path}")
    base = data.pop("extends", None)
    if base is not None:  # a variant: the base profile's settings, overridden section by section
        if not isinstance(base, str):
            raise ValueError(f"profile file {path}: 'extends' must name another profile, got {base!r}")
        base_path = Path(base) if Path(base).suffix in (".yaml", ".yml") else path.parent / f"{base}.yaml"
        if not base_path.is_file():
            raise FileNotFoundError(f"profile file {path}: 'extends: {base}' but {base_path} does not exist")
        parent = load_profile(base_path, _chain + (path.resolve(),))
        parent.pop("name", None)
        parent.get("shared", {}).pop("profile", None)
        data = deep_merge(parent, data)
    if "shared" not in data:
        raise ValueError(f"profile file {path} must be a mapping with a 'shared' section")
    data.setdefault("name", path.stem)
    data["shared"].setdefault("profile", path.stem)
    return data


def parse_value(text: str):
    """Parse a ``--param`` value as YAML (``8`` -> int, ``[1, 2]`` -> list, ``abc`` -> str)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_params(pairs: list[str] | None) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}``."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value)
    return out


def resolve_paths(cfg: dict, root: Path | None = None) -> dict:
    """Make the values of :data:`PATH_KEYS` absolute (relative to the project root)."""
    root = root or project_root()
    out = dict(cfg)
    for k in PATH_KEYS:
        v = out.get(k)
        if isinstance(v, str) and v and "://" not in v and not Path(v).is_absolute():
            out[k] = str((root / v).resolve())
    return out


def step_config(profile: str | os.PathLike, step: str, **overrides) -> dict:
    """The resolved settings of one step: ``{**defaults, **shared, **profile[step], **overrides}``.

    ``None`` overrides are ignored, so a notebook can pass its parameters-cell values straight through
    (``None`` = "take it from the profile file"); keys the profile does not set get their default
    (:func:`ris_utils.settings.defaults`). An override no section has is refused before any work
    (:class:`ris_utils.settings.UnknownSettingError`, naming the closest valid key). Dotted keys in
    ``overrides`` are not expanded here; use :func:`parse_params` first.
    """
    prof = load_profile(profile)
    if step not in prof and step != "shared":
        raise KeyError(f"profile {prof['name']!r} has no section {step!r} (sections: {sorted(prof)})")
    settings.check_overrides(step, overrides, f"--param / notebook overrides of profile {prof['name']!r}")
    cfg = deep_merge(prof["shared"], prof.get(step) or {}) if step != "shared" else dict(prof["shared"])
    cfg = settings.complete(step, deep_merge(cfg, overrides))
    cfg["step"] = step
    return resolve_paths(cfg)


def _as_path(value) -> Path:
    p = Path(str(value))
    return (p if p.is_absolute() else project_root() / p).resolve()


def is_profile_default(cfg: dict, step: str, key: str, value) -> bool:
    """Whether ``value`` is what the profile file itself sets for ``<step>.<key>`` (dotted), compared as paths:
    i.e. not a path the user named through ``--param`` / notebook parameters. A ``cfg`` without ``profile`` (built
    in code) counts as the defaults; a profile that cannot be reloaded by name (given as a path) does not.

    Used where a missing asset may be trained on first use: only the profile's own default asset is."""
    if not cfg.get("profile"):
        return True
    try:
        node = load_profile(cfg["profile"]).get(step) or {}
    except (OSError, ValueError):
        return False
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node is not None and _as_path(node) == _as_path(value)


def notebook_parameters(profile: str | os.PathLike, notebook_number: str) -> dict:
    """Papermill parameters for one notebook: ``profile`` plus the profile's ``notebooks.<NN>`` entry."""
    prof = load_profile(profile)
    params = {"profile": prof["name"]}
    params.update((prof.get("notebooks") or {}).get(str(notebook_number), {}) or {})
    return params


def output_dir(profile: str | os.PathLike) -> Path:
    """``papermill_runs/output/<profile>``."""
    name = load_profile(profile)["name"]
    return profiles_dir() / "output" / name


def save_config(cfg: dict, out_dir) -> Path:
    """Write the resolved config ``cfg`` to ``<out_dir>/config.yaml`` (the settings beside a step's output)."""
    from ris_utils.fileio import atomic_write
    from ris_utils.layout import CONFIG_FILE

    out = Path(out_dir) / CONFIG_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, yaml.safe_dump(dict(cfg), sort_keys=True, default_flow_style=None))
    return out
