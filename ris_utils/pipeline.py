"""The orchestrator: the only code that runs a step's missing upstream output.

The pipeline, each step reading the one before from the layout of :mod:`ris_utils.layout`::

    data (00)  ->  masks (01)  ->  captions (02)  ->  filter (03)  ->  export (03)  ->  ris (04)  ->  tables (05)
    data_root      masks/<split>   captions/<mode>/<split>   filter/<mode>/<split>   export/<name>   ris/

A step module (``masks``, ``captioning.step``, ``filtering``, ``export``, ``ris``) takes its inputs and, when
they are missing, fails naming the notebook or command to run first; it never imports a later step. This
module is where a later step runs an earlier one on demand:

- :func:`filter_jobs` -- missing captions are written first (and a missing shapes CLIP trained once), then
  :func:`ris_utils.filtering.run_filter_jobs`;
- :func:`build_trainsets` -- the filtered sets' filter jobs, the unfiltered sets' captions, then
  :func:`ris_utils.export.write_trainsets`;
- :func:`require` -- what a notebook calls first: ``pipeline.require(cfg, "captions")`` raises
  :class:`MissingInput` ("... run notebooks/02_distinctive_captions.ipynb (or `python -m ris_utils captions
  --profile shapes`) first") when the step's output is not there;
- :func:`save_config` -- the resolved config beside a step's output (``config.yaml``);
- :data:`COMMANDS` / :func:`run_command` -- ``python -m ris_utils <command>`` (``ris_utils.__main__``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ris_utils import engine, layout, settings
from ris_utils.profiles import project_root, save_config  # noqa: F401 - save_config: the pipeline's API too

# The step modules (torch, open_clip, segment-anything behind them) are imported where a function runs a step,
# so that `python -m ris_utils --help` and `pipeline.require` in a notebook's first cell stay instant.

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    notebook: str       # notebooks/<notebook>
    command: str        # python -m ris_utils <command> (None: the notebook only)
    output: str         # what it writes (ris_utils.layout)


#: The pipeline's steps in order.
STEPS = (
    Step("data", "00_setup_and_data.ipynb", "shapes", "<data_root> (REFER layout)"),
    Step("masks", "01_mask_proposals.ipynb", "masks", "<work_dir>/masks/<split>"),
    Step("captions", "02_distinctive_captions.ipynb", "captions", "<work_dir>/captions/<mode>/<split>"),
    Step("filter", "03_distinctiveness_filtering.ipynb", "filter", "<work_dir>/filter/<mode>/<split>"),
    Step("export", "03_distinctiveness_filtering.ipynb", "export", "<work_dir>/export/<name>"),
    Step("ris", "04_ris_training.ipynb", "train", "<work_dir>/ris"),
    Step("tables", "05_benchmark_tables.ipynb", None, "papermill_runs/output/<profile>"),
)
STEP = {s.name: s for s in STEPS}


class MissingInput(FileNotFoundError):
    """A step's input (an earlier step's output) is missing; the message names what to run first."""


def run_first(step: str, profile: str | None = None) -> str:
    """``"run notebooks/NN_x.ipynb (or `python -m ris_utils.runs --profile P --only NN`) first"``: the notebook
    that writes ``step``'s output, and the command that runs that notebook as ``make reproduce`` does (the
    step's own command, ``Step.command``, needs arguments that depend on what it is run on)."""
    s = STEP[step]
    return (f"run notebooks/{s.notebook} (or `python -m ris_utils.runs --profile {profile or 'NAME'} "
            f"--only {s.notebook[:2]}`) first")


def _outputs(cfg: dict, step: str, splits, modes) -> list[Path]:
    if step == "data":
        return []
    if step == "masks":
        return [layout.masks_dir(cfg, sp) for sp in splits]
    if step in ("captions", "filter"):
        fn = layout.captions_dir if step == "captions" else layout.filter_dir
        return [fn(cfg, m, sp) for m in modes for sp in splits]
    if step == "export":
        return [layout.export_dir(cfg, name) for name in cfg.get("trainsets") or {}]
    raise ValueError(f"pipeline.require: no output check for step {step!r} (steps: masks, captions, filter, export)")


def require(cfg: dict, step: str, splits=None, modes=None) -> list[Path]:
    """Fail with :class:`MissingInput` naming the notebook / command to run when ``step``'s output is missing.

    ``cfg``: a resolved config (``profiles.step_config``: its ``work_dir`` and ``profile`` are used; for
    ``export``, the export section's ``trainsets``). ``splits`` / ``modes``: which folders (default: the
    ``cfg``'s own ``splits`` / ``modes``, else ``train`` / both modes). Returns the folders checked."""
    if step not in STEP:
        raise ValueError(f"pipeline.require: unknown step {step!r} (steps: {', '.join(STEP)})")
    splits = list(splits or cfg.get("splits") or ["train"])
    modes = list(modes or cfg.get("modes") or ["naive", "distinctive"])
    folders = _outputs(cfg, step, splits, modes)
    if step == "export":
        missing = [d for d in folders if not (d / "dataset_card.json").is_file()]
    else:
        missing = [d for d in folders if not layout.is_done(d)]
    if step == "data" and not Path(cfg.get("data_root") or ".").is_dir():
        missing = [Path(cfg.get("data_root") or ".")]
    if missing:
        raise MissingInput(f"{missing[0]} not found (the {step} step's output): "
                           f"{run_first(step, cfg.get('profile'))}")
    return folders


# --------------------------------------------------------------------------------------------- step 2 -> 3


def ensure_captions(captions_cfg: dict, cdir, mode: str, split: str, seed: int, captioner=None,
                    progress: bool = True) -> Path:
    """Run the captions step into ``cdir`` (with ``seed``) unless its ``records.jsonl`` exists."""
    from ris_utils.captioning import step as captions_step

    cdir = Path(cdir)
    if not layout.is_done(cdir):
        logger.info("pipeline: no captions under %s, running the captions step (seed %d)", cdir, seed)
        captions_step.run_captions({**captions_cfg, "seed": int(seed)}, split, mode, captioner, out_dir=cdir,
                                   progress=progress)
    return cdir


def _train_clip_if_missing(cfg: dict) -> None:
    """The profile's own shapes CLIP, trained once here when missing (``filter.clip.train_if_missing``)."""
    from ris_utils import filtering

    ccfg = cfg.get("clip") or {}
    ckpt = ccfg.get("checkpoint")
    if ckpt and ccfg.get("train_if_missing"):
        if not (Path(ckpt) if Path(ckpt).is_absolute() else project_root() / ckpt).is_file():
            filtering.make_scorer(cfg)  # trains and saves it (ris_utils.clip_scorer.build_clip)


def filter_jobs(cfg: dict, captions_cfg: dict, jobs: list[dict], workers: int | None = 1, scorer=None,
                captioner=None, progress: bool = True) -> list[Path]:
    """Filter several mode / split / caption-seed jobs, writing their missing captions first.

    Arguments:
      cfg: ``profiles.step_config(profile, "filter")``. captions_cfg: ``step_config(profile, "captions")``
        (a seed other than its own is captioned into ``<split>_seed<s>``, :func:`ris_utils.layout.step_dirs`).
      jobs: ``[{"mode", "split", "seed" (optional: default the captions seed)}]``.
      workers: ``filter.workers`` (:func:`ris_utils.filtering.run_filter_jobs`); missing captions are written
        with ``captions.workers`` processes (:func:`ris_utils.captioning.step.run_caption_jobs`) when
        ``workers`` > 1, else here in turn with ``captioner`` (loaded once).
    Returns:
      the filter folder of each job, in the order of ``jobs``.
    """
    from ris_utils import filtering
    from ris_utils.captioning import step as captions_step
    from ris_utils.captioning import train as train_captioner

    cfg = settings.complete("filter", cfg)
    jobs = filtering.check_filter_jobs(jobs)
    n = engine.check_workers(workers, "filter.workers")
    if scorer is None and (cfg.get("clip") or {}).get("train_if_missing"):
        filtering.check_clip_checkpoint(cfg)  # a typo'd checkpoint path fails here, before captions or training
    base = int(captions_cfg.get("seed") or 0)
    seeds = [base if job.get("seed") is None else int(job["seed"]) for job in jobs]
    dirs = [layout.step_dirs(cfg, job["mode"], job["split"], s, base) for job, s in zip(jobs, seeds)]
    if len({f.resolve() for _, f in dirs}) != len(dirs):
        raise ValueError("filter jobs: two jobs name the same mode / split / seed (the same filter folder)")
    missing = [k for k, (cdir, _) in enumerate(dirs) if not layout.is_done(cdir)]
    if missing and n <= 1:
        scorer = scorer or filtering.make_scorer(cfg)  # as before: the scorer (and a missing CLIP) first
        for k in missing:
            captioner = captioner or train_captioner.load_captioner(captions_cfg)
            ensure_captions(captions_cfg, dirs[k][0], jobs[k]["mode"], jobs[k]["split"], seeds[k], captioner,
                            progress)
    elif missing:  # every captions folder complete BEFORE the filter workers read it (sharded, merged)
        logger.info("pipeline: no captions for %d filter job(s), running the captions step first", len(missing))
        cjobs = [{"split": jobs[k]["split"], "mode": jobs[k]["mode"], "seed": seeds[k], "out_dir": str(dirs[k][0])}
                 for k in missing]
        captions_step.run_caption_jobs(captions_cfg, cjobs, workers=captions_cfg.get("workers") or 1,
                                       progress=progress, captioner=captioner)
    if n > 1:
        _train_clip_if_missing(cfg)
    return filtering.run_filter_jobs(cfg, dirs, n, scorer=scorer, progress=progress)


def filter_split(cfg: dict, captions_cfg: dict, mode: str, split: str, seed: int | None = None, scorer=None,
                 captioner=None, progress: bool = True) -> Path:
    """One mode / split / caption seed (:func:`filter_jobs` of one job, in this process)."""
    job = {"mode": mode, "split": split, **({} if seed is None else {"seed": seed})}
    [fdir] = filter_jobs(cfg, captions_cfg, [job], 1, scorer, captioner, progress)
    return fdir


# --------------------------------------------------------------------------------------------- step 3 -> export


def build_trainsets(filter_cfg: dict, export_cfg: dict, split: str = "train", scorer=None, captions_cfg=None,
                    progress: bool = True, workers: int | None = None) -> dict:
    """Write the training sets of ``export.trainsets`` to ``<work_dir>/export/<name>``, running what is missing.

    The filtered sets' modes are filtered in one :func:`filter_jobs` call (``workers`` processes, default
    ``filter.workers``); the unfiltered sets' captions are written when ``captions_cfg`` is given; then
    :func:`ris_utils.export.write_trainsets` (the sets written by ``workers`` processes at once). Returns
    ``{name: dataset card}``.
    """
    from ris_utils import export, filtering

    export_cfg = settings.complete("export", export_cfg)
    filter_cfg = settings.complete("filter", filter_cfg)
    sets = export_cfg.get("trainsets") or {}
    sources = export.trainset_sources(export_cfg, split)
    workers = filter_cfg["workers"] if workers is None else workers
    modes = list(dict.fromkeys(spec.get("mode") for spec in sets.values() if spec.get("filtered")))
    filter_jobs(filter_cfg, captions_cfg or {"seed": 0}, [{"mode": m, "split": split} for m in modes], workers,
                scorer=scorer, progress=progress)
    if captions_cfg is not None:
        for name, (src, filtered) in sources.items():
            if not filtered:
                ensure_captions(captions_cfg, src, sets[name]["mode"], split, int(captions_cfg.get("seed") or 0),
                                progress=progress)
    return export.write_trainsets(export_cfg, filtering.images_dir_of(filter_cfg), split, workers=workers)


# --------------------------------------------------------------------------------------------- the CLI


#: ``python -m ris_utils <command>`` -> (module, one-line help); the module's ``cli_<command>`` or ``cli`` runs it.
COMMANDS = {
    "shapes": ("ris_utils.data.shapes", "generate the shapes world (REFER format)"),
    "masks": ("ris_utils.masks", "step 1: mask proposals for a folder or list of images"),
    "captions": ("ris_utils.captioning.step", "step 2: naive / distinctive caption candidates"),
    "filter": ("ris_utils.filtering", "step 3: distinctiveness (DoC) filtering of candidates"),
    "export": ("ris_utils.export", "write filtered candidates as a REFER-format dataset"),
    "mix": ("ris_utils.export", "semi-supervised mix of human and pseudo refs"),
    "pretrain": ("ris_utils.ris.pretrain", "pretrain the shapes world's dense CLIP for the RIS model"),
    "train": ("ris_utils.ris.train", "train the CRIS-style RIS model on a REFER-format dataset"),
    "evaluate": ("ris_utils.ris.evaluate", "evaluate a RIS checkpoint (mIoU, oIoU, Pr@X)"),
    "generate": ("ris_utils.generate", "masks -> captions -> filter -> export (+ report, formats) on a folder"),
    "download": ("ris_utils.download", "download datasets and checkpoints for the paper profile"),
}


def run_command(cmd: str, argv: list[str]) -> int:
    """Run ``python -m ris_utils <cmd> <argv>``: the command's step module, imported now."""
    import importlib

    module = importlib.import_module(COMMANDS[cmd][0])
    fn = getattr(module, f"cli_{cmd}", None) or module.cli
    return int(fn(argv) or 0)
