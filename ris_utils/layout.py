"""Where everything lives: every ``work_dir`` / ``data_root`` path of the pipeline, for the code and the notebooks.

Each function takes ``work`` (or ``root``): a path, or a resolved step config (``profiles.step_config``), whose
``work_dir`` (``data_root``) is used. Nothing is created here.

``<data_root>`` (REFER layout, written by notebook 00 / ``ris_utils.data``)::

    <dataset>/instances.json, <dataset>/refs(<split_by>).p     refs_path / instances_path
    images/train2014/<file_name>                               image_dir (IMAGE_SUBDIR; or IMAGE_DIRS' others)

``<work_dir>`` (the steps' outputs, each an engine folder with ``records.jsonl`` unless noted)::

    masks/<split>                                  step 1   masks_dir
    captions/<mode>/<split>[_seed<s>]              step 2   captions_dir (another seed than the profile's: _seed<s>)
    captioner/<model>.pt                           step 2   captioner_cache (a captioner trained on first use)
    filter/<mode>/<split>[_seed<s>]                step 3   filter_dir
    export/<name>                                  step 3   export_dir (REFER: <dataset>/refs(<split_by>).p,
                                                            images/train2014, dataset_card.json)
    fidelity/                                      docs     fidelity_dir
    ris/ (or experiments.runs_dir)                 step 4   ris_runs_dir; features/ = feature_cache_dir

``papermill_runs/output/<profile>/``: executed notebooks, ``metrics.json`` (``profiles.output_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The REFER toolkit's image folder under a data root (and under an export).
IMAGE_SUBDIR = "images/train2014"
#: Image folders a data root may use, in the order they are looked for (the samples world writes the first,
#: the paper profile's COCO download too; the shapes world and exports the second).
IMAGE_DIRS = ("images/mscoco/images/train2014", IMAGE_SUBDIR, "images")
#: The file each step's engine folder is complete with (``ris_utils.engine.RECORDS``).
RECORDS = "records.jsonl"
#: The resolved config saved beside every step's output.
CONFIG_FILE = "config.yaml"


def _root(work, key: str = "work_dir") -> Path:
    if isinstance(work, dict):
        if not work.get(key):
            raise ValueError(f"{key} is not set (profile {work.get('profile')!r}); set shared.{key} in the profile")
        work = work[key]
    return Path(work)


# --------------------------------------------------------------------------------------------- data_root


def image_dir(data_root) -> Path:
    """The image folder of a REFER data root: the first of :data:`IMAGE_DIRS` that exists under it, else
    ``<data_root>/images/train2014`` (where the REFER toolkit reads RefCOCO-family images)."""
    root = _root(data_root, "data_root")
    for d in IMAGE_DIRS:
        if (root / d).is_dir():
            return root / d
    return root / IMAGE_SUBDIR


def images_of(cfg: dict) -> Path:
    """A step's image folder: ``cfg["images"]`` when set, else the data root's (:func:`image_dir`)."""
    if cfg.get("images"):
        return Path(cfg["images"])
    return image_dir(cfg.get("data_root") or ".")


def refs_path(root, dataset: str, split_by: str) -> Path:
    return _root(root, "data_root") / dataset / f"refs({split_by}).p"


def instances_path(root, dataset: str) -> Path:
    return _root(root, "data_root") / dataset / "instances.json"


# --------------------------------------------------------------------------------------------- work_dir


def seeded_split(split: str, seed: int | None = None, base_seed: int | None = None) -> str:
    """``split`` for the profile's seed, ``<split>_seed<s>`` for another (notebook 02's extra seeds)."""
    if seed is None or base_seed is None or int(seed) == int(base_seed):
        return split
    return f"{split}_seed{int(seed)}"


def masks_dir(work, split: str) -> Path:
    """``<work_dir>/masks/<split>``: step 1's records."""
    return _root(work) / "masks" / split


def captions_dir(work, mode: str, split: str, seed: int | None = None, base_seed: int | None = None) -> Path:
    """``<work_dir>/captions/<mode>/<split>[_seed<s>]``: step 2's records."""
    return _root(work) / "captions" / mode / seeded_split(split, seed, base_seed)


def filter_dir(work, mode: str, split: str, seed: int | None = None, base_seed: int | None = None) -> Path:
    """``<work_dir>/filter/<mode>/<split>[_seed<s>]``: step 3's records."""
    return _root(work) / "filter" / mode / seeded_split(split, seed, base_seed)


def step_dirs(work, mode: str, split: str, seed: int, base_seed: int = 0) -> tuple[Path, Path]:
    """``(captions_dir, filter_dir)`` of one mode / split / caption seed."""
    return captions_dir(work, mode, split, seed, base_seed), filter_dir(work, mode, split, seed, base_seed)


def captioner_cache(work, model: str) -> Path:
    """``<work_dir>/captioner/<model>.pt``: a shapes captioner trained on first use."""
    return _root(work) / "captioner" / f"{model}.pt"


def export_dir(work, name: str | None = None) -> Path:
    """``<work_dir>/export`` or ``<work_dir>/export/<name>``: the exported training sets."""
    d = _root(work) / "export"
    return d / name if name else d


def export_images(out_dir) -> Path:
    """The image folder inside an export (the REFER toolkit's fallback dir)."""
    return Path(out_dir) / IMAGE_SUBDIR


def fidelity_dir(work) -> Path:
    """``<work_dir>/fidelity``: the fidelity measurements (docs/fidelity.md)."""
    return _root(work) / "fidelity"


def ris_runs_dir(work, name: str | None = None) -> Path:
    """``<work_dir>/<name>`` (default ``ris``): notebook 04's training runs."""
    name = name or "ris"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"ris.experiments.runs_dir must be a folder name under work_dir, got {name!r}")
    return _root(work) / name


def ris_run_dir(runs, trainset: str, style: str | None, seed: int) -> Path:
    """``<runs dir>/<trainset>/<style or any>/seed<k>``: one run of the grid (``last.pt``, ``eval/``, ...)."""
    return Path(runs) / trainset / (style or "any") / f"seed{int(seed)}"


def your_images_dir(work) -> Path:
    """``<work_dir>/../your_images``: notebook 06's demo photos and outputs (beside the profile's work_dir)."""
    return _root(work).parent / "your_images"


def feature_cache_dir(work, runs: str | None = None) -> Path:
    """``<runs dir>/features``: the frozen towers' features, shared by every run."""
    return ris_runs_dir(work, runs) / "features"


def is_done(folder: str | os.PathLike) -> bool:
    """Whether an engine folder holds its records (a step's output exists)."""
    return (Path(folder) / RECORDS).is_file()
