"""``python -m ris_utils generate --images DIR --out DIR``: pseudo-supervision for your own images, one command.

Runs the paper's steps on a folder of images (recursive; ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` and the
other formats of :data:`ris_utils.masks.IMAGE_EXTENSIONS`) with the settings of a profile, through the same
step functions as notebooks 01-03 and the step commands:

1. masks -- :func:`ris_utils.masks.run_masks` (SAM + selector, or the shapes world's segmenter);
2. captions -- :func:`ris_utils.captioning.step.run_caption_jobs`, distinctive caption sampling;
3. filter -- :func:`ris_utils.pipeline.filter_jobs`, DoC > 1;

then the REFER export (:func:`ris_utils.export.export_dataset`), the other formats
(:func:`ris_utils.formats.write_formats`), the report (:func:`ris_utils.report.write_report`) and a summary::

    <out>/work/masks/train/  work/captions/distinctive/train/  work/filter/distinctive/train/   (engine runs)
    <out>/refer/<dataset>/refs(<split_by>).p + instances.json, refer/images/train2014/, dataset card
    <out>/cris/anns/<dataset>/train.json + cris/masks/<dataset>/<segment_id>.png     (--format cris)
    <out>/hf/data/train-00000-of-00001.parquet + hf/README.md                          (--format hf)
    <out>/report.html + report_files/        <out>/summary.json

Every step is resumable (finished images are committed atomically; after a ``kill -9`` a rerun of the same
command continues and writes the same bytes as an uninterrupted run); the export, the formats and the report
are rewritten from the step records on every run. Unreadable or corrupt images become error records, listed
in the summary with their reason. ``--workers N`` runs captions and filtering in N processes (records are
byte-identical to one process); under ``torchrun --nproc_per_node K`` every step is sharded over the ranks
and rank 0 writes the outputs. Image ids are the paths relative to ``--images`` (and so are the REFER
``file_name``s: two ``1.jpg`` in different subfolders stay apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import time
from pathlib import Path

from ris_utils import engine, export, layout, pipeline, settings
from ris_utils.captioning.step import run_caption_jobs
from ris_utils.data.samples import write_random_checkpoint
from ris_utils.formats import parse_formats, write_formats
from ris_utils.masks import IMAGE_EXTENSIONS, make_step_fn, run_masks
from ris_utils.profiles import parse_params, step_config
from ris_utils.report import write_report

logger = logging.getLogger(__name__)

MODE = "distinctive"   # the paper's pseudo-supervision: distinctive captions, then the DoC filter
SPLIT = "train"
STEP_SECTIONS = ("masks", "captions", "filter", "export")


def image_items(images, exclude=None) -> list[dict]:
    """Engine items of every image file under ``images`` (recursive, sorted): ``image_id`` = ``file_name`` =
    the path relative to ``images`` (posix); files under ``exclude`` (the output folder) are left out."""
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such folder")
    skip = Path(exclude).resolve() if exclude is not None else None
    items = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        if skip is not None and f.resolve().is_relative_to(skip):
            continue
        rel = f.relative_to(root).as_posix()
        items.append({"image_id": rel, "file_name": rel, "path": str(f)})
    if not items:
        raise ValueError(f"--images {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return items


def step_configs(profile, out_dir, params: dict | None = None, workers: int | None = None) -> dict:
    """``{section: step_config}`` for masks / captions / filter / export with ``work_dir = <out>/work``.

    ``params``: nested overrides; a key naming a section (``{"masks": {"amg": {...}}}``) applies to that
    step, any other key to every step."""
    params = dict(params or {})
    common = {k: v for k, v in params.items() if k not in STEP_SECTIONS}
    valid = {sec: set(settings.defaults(sec)) | {f.name for f in dataclasses.fields(settings.section_class(sec))}
             for sec in STEP_SECTIONS}
    for key in common:  # a key for every step: refused when no step has it (the closest key named)
        if not any(key in v for v in valid.values()):
            settings.check_overrides("masks", {key: common[key]}, "--param (a key for every step)")
    work = str(Path(out_dir).resolve() / "work")
    cfgs = {}
    for sec in STEP_SECTIONS:
        over = {**{k: v for k, v in common.items() if k in valid[sec]}, **(params.get(sec) or {}), "work_dir": work}
        if workers is not None and sec in ("captions", "filter"):
            over["workers"] = int(workers)
        cfgs[sec] = step_config(profile, sec, **over)
    cfgs["captions"]["max_images"] = None  # every image of the folder
    return cfgs


def _ensure_random_checkpoints(profile) -> None:
    """The random-init checkpoints a profile reads (paper-tiny's CoCa; notebook 00 writes them too)."""
    dcfg = step_config(profile, "data")
    specs = dcfg.get("random_checkpoints") or []
    if specs:

        for spec in specs:
            write_random_checkpoint(spec["model"], Path(dcfg["data_root"]) / spec["path"], int(spec.get("seed", 0)))


def _finished(step_dir: Path) -> bool:
    return (step_dir / engine.RECORDS).is_file() and (step_dir / engine.SUMMARY).is_file()


def _step_view(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("n_items", "ok", "failed", "failed_reasons")}


def generate(images, out_dir, profile: str = "shapes", formats="refer", workers: int | None = None,
             params: dict | None = None, report: bool = True, progress: bool = True,
             image_mode: str | None = None, report_max_images: int | None = 5000) -> dict:
    """Run masks -> captions -> filter -> export (+ formats, report) on the images under ``images``.

    Arguments:
      images: a folder (searched recursively). out_dir: where everything goes (layout in the module docstring).
      profile: a profile name or YAML path (its masks / captions / filter / export sections are used).
      formats: ``"refer,cris,hf"`` or a list (refer is always written: the others derive from it).
      workers: processes for captions and filtering (default: the profile's ``captions.workers`` /
        ``filter.workers``).
      params: nested overrides (see :func:`step_configs`). image_mode: link | copy | none (default: profile).
      report_max_images: the report shows the first N images (None: all; see :func:`ris_utils.report.write_report`).
    Returns:
      the summary (also written to ``<out>/summary.json``); on a rank > 0 of torchrun, that rank's part only.
    """
    out_dir = Path(out_dir).resolve()
    fmts = parse_formats(formats)
    rank, world = engine.dist_info()
    if world > 1 and (workers or 1) > 1:
        raise ValueError("--workers > 1 and torchrun do not mix: use one of them")
    cfgs = step_configs(profile, out_dir, params, 1 if world > 1 else workers)
    items = image_items(images, exclude=out_dir)
    for sec in ("captions", "filter", "export"):  # file_name = path under --images (records without a path)
        cfgs[sec]["images"] = str(Path(images).resolve())
    if rank == 0:  # before the masks step, whose end (a barrier under torchrun) precedes any captioner load
        _ensure_random_checkpoints(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    mdir, fdir, csum = _run_steps(cfgs, items, out_dir / "work", progress, seconds)
    if rank != 0:
        return {"rank": rank, "world_size": world, "merged": False}
    fsum = engine.read_summary(fdir)
    if not fsum.get("ok"):
        reasons = [e["error"] for e in (engine.read_summary(mdir).get("errors") or fsum.get("errors") or [])][:3]
        raise ValueError(f"generate: no image of {images} made it through the steps (first reasons: {reasons})")

    t = time.perf_counter()
    ecfg = cfgs["export"]
    refer_dir = out_dir / "refer"
    # the export's sentence-selection settings the installed export_dataset knows (e.g. max_sentences_per_ref)
    known = inspect.signature(export.export_dataset).parameters
    extra = {k: ecfg[k] for k in ("max_sentences_per_ref", "order") if k in known and ecfg.get(k) is not None}
    card = export.export_dataset(fdir, refer_dir, dataset=ecfg["dataset"], split_by=ecfg["split_by"],
                                 images=image_mode or ecfg["image_mode"], images_dir=ecfg["images"],
                                 dedupe=bool(ecfg["dedupe"]), name=out_dir.name, **extra)
    written = write_formats(refer_dir, [f for f in fmts if f != "refer"], out_root=out_dir, progress=progress)
    seconds["export"] = time.perf_counter() - t

    msum = engine.read_summary(mdir)
    failures = [{"image_id": e["image_id"], "file_name": e.get("file_name"), "step": "masks", "error": e["error"]}
                for e in msum.get("errors") or []]
    failures += [{"image_id": e["image_id"], "file_name": e.get("file_name"), "step": "captions/filter",
                  "error": e["error"]} for e in fsum.get("errors") or []]
    if report:
        t = time.perf_counter()
        write_report(fdir, out_dir, card=card, failures=[f for f in failures if f["step"] == "masks"],
                     images_dir=ecfg["images"], max_images=report_max_images,
                     progress=progress, title=f"Pseudo-RIS pseudo-supervision: {out_dir.name}")
        seconds["report"] = time.perf_counter() - t
    summary = _summary(cfgs, items, card, failures, msum, csum, fsum, written, report)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}  # printed, not written (reruns compare)
    return summary


def _run_steps(cfgs: dict, items: list[dict], work: Path, progress: bool, seconds: dict):
    """Masks, captions and filter into ``work``; returns ``(masks_dir, filter_dir, captions summary)``."""
    t = time.perf_counter()
    mdir = layout.masks_dir(work, SPLIT)
    run_masks(cfgs["masks"], items, mdir, fn=make_step_fn(cfgs["masks"]), progress=progress)
    seconds["masks"] = time.perf_counter() - t

    t = time.perf_counter()
    ccfg, fcfg = cfgs["captions"], cfgs["filter"]
    cdir, fdir = layout.step_dirs(work, MODE, SPLIT, int(ccfg["seed"]), int(ccfg["seed"]))
    # a finished step (merged records) is checked and skipped in this process: no worker start-up on a rerun
    [csum] = run_caption_jobs(ccfg, [{"split": SPLIT, "mode": MODE}], progress=progress,
                              workers=1 if _finished(cdir) else ccfg["workers"])
    seconds["captions"] = time.perf_counter() - t

    t = time.perf_counter()
    [fdir] = pipeline.filter_jobs(fcfg, ccfg, [{"mode": MODE, "split": SPLIT}],
                                  1 if _finished(fdir) else fcfg["workers"], progress=progress)
    seconds["filter"] = time.perf_counter() - t
    return mdir, fdir, csum


def _summary(cfgs, items, card, failures, msum, csum, fsum, written, report) -> dict:
    c = card["counts"]
    return {
        "profile": cfgs["masks"].get("profile"), "images": len(items),
        "images_ok": c["images"], "images_failed": len(failures), "images_with_refs": c["images_with_refs"],
        "masks": c["masks"], "masks_exported": c["masks_exported"],
        "masks_dropped_by_reason": c["masks_dropped_by_reason"], "candidates": c["candidates"],
        "candidates_kept_by_doc": c["candidates_kept_by_doc"], "expressions": c["expressions"],
        "unique_expressions": c["unique_expressions"],
        "steps": {"masks": _step_view(msum), "captions": _step_view(csum), "filter": _step_view(fsum)},
        "failures": failures,
        "outputs": {"refer": "refer", **{f: f for f in written if f != "refer"},
                    **({"report": "report.html"} if report else {})},
    }


def summary_text(summary: dict, out_dir) -> str:
    """The closing summary as a few lines of text."""
    s = summary
    lines = [f"generate: {s['images']} images -> {out_dir}",
             f"  images ok {s['images_ok']}, with refs {s['images_with_refs']}, failed {s['images_failed']}",
             f"  masks {s['masks']}, exported {s['masks_exported']}, dropped "
             + (", ".join(f"{k} {v}" for k, v in s["masks_dropped_by_reason"].items()) or "0"),
             f"  expressions kept {s['expressions']} ({s['unique_expressions']} unique) of {s['candidates']} "
             f"candidates ({s['candidates_kept_by_doc']} with DoC > 1)"]
    for f in s["failures"]:
        lines.append(f"  failed [{f['step']}] {f['file_name']}: {f['error']}")
    lines.append("  outputs: " + ", ".join(f"{k} -> {v}" for k, v in s["outputs"].items()))
    if s.get("seconds"):
        lines.append("  seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    """``python -m ris_utils generate --images DIR --out DIR [--profile P] [--format refer,cris,hf] [--workers N]``."""
    ap = argparse.ArgumentParser(prog="python -m ris_utils generate", description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, help="output folder (a rerun resumes)")
    ap.add_argument("--profile", default="shapes", help="profile name or YAML path: shapes | paper-tiny | paper")
    ap.add_argument("--format", default="refer", help="comma-separated: refer,cris,hf (default refer)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes for captions and filtering (default: the profile's; not with torchrun)")
    ap.add_argument("--image-mode", default=None, choices=("link", "copy", "none"),
                    help="how images go into refer/images/train2014 (default: the profile's export.image_mode)")
    ap.add_argument("--no-report", action="store_true", help="skip report.html")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any image failed")
    ap.add_argument("--report-max-images", type=int, default=5000,
                    help="images shown in report.html (default 5000, ~20 KB each; 0 = all)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--param", action="append", default=[],
                    help="override a setting: section.key=value (e.g. masks.amg.points_per_side=16) or key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = generate(args.images, args.out, args.profile, args.format, args.workers, parse_params(args.param),
                           report=not args.no_report, progress=not args.no_progress, image_mode=args.image_mode,
                           report_max_images=args.report_max_images or None)
    except (engine.ResumeMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("merged") is False:
        return 0
    print(summary_text(summary, Path(args.out)))
    return 1 if args.strict and summary["images_failed"] else 0


__all__ = ["generate", "image_items", "step_configs", "summary_text", "cli"]
