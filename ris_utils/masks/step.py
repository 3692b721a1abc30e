"""Step 1 (notebook 01): mask proposals for every image -- SAM or a classical segmenter, then a selector.

The step itself: one image -> one engine record (:func:`make_step_fn`), the image lists it runs on (a folder, a
list file, a REFER split) and the CLI (``python -m ris_utils masks``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import engine
from ..data.refer import load_refer
from ..images import MAX_PIXELS, display_path, load_image_rgb
from ..layout import masks_dir
from ..profiles import parse_params, save_config, step_config
from ..settings import complete
from .components import ComponentsSegmenter
from .proposals import Proposal, dedup_exact, proposal_from_ann
from .sam import CheckpointError, build_sam_generator
from .selectors import load_external_masks, make_selector

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")



def propose_masks(image: np.ndarray, backend, selector=None, external: list[dict] | None = None) -> list[Proposal]:
    """Mask proposals of one image.

    Arguments:
      image (np.ndarray): HxWx3 uint8, RGB.
      backend: anything with ``generate(image) -> [ann]`` in segment-anything's record format, e.g. a
        ``SamAutomaticMaskGenerator`` (any output_mode) or a :class:`ComponentsSegmenter`.
      selector: ``None`` (exact de-duplication only), a ``selector:`` config dict (:func:`make_selector`) or
        a callable ``(proposals, (h, w), external) -> proposals``.
      external (list[dict] | None): external instance masks of this image (COCO RLEs) for the
        ``external`` selector.

    Returns:
      list[Proposal]: segmentation (COCO RLE, str counts), bbox xywh, area, predicted_iou, stability_score.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"propose_masks expects an HxWx3 uint8 RGB array, got "
                         f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
    props = [proposal_from_ann(a) for a in backend.generate(image)]
    if selector is None:
        return dedup_exact(props)
    if isinstance(selector, dict):
        selector = make_selector(selector)
    return selector(props, image.shape[:2], external)


def build_backend(cfg: dict):
    """The backend of a ``masks`` config (builds SAM here, so checkpoint problems fail before any image)."""
    cfg = complete("masks", cfg)
    backend = cfg["backend"]
    if backend == "sam":
        return build_sam_generator(cfg)
    if backend == "components":
        return ComponentsSegmenter(**(cfg.get("components") or {}))
    raise ValueError(f"masks.backend must be 'sam' or 'components', got {backend!r}")


#: masks-config keys whose values change the records (fingerprinted, so a resume with others refuses).
OUTPUT_KEYS = ("backend", "sam_variant", "checkpoint", "random_init", "amg", "selector", "components",
               "external_masks", "external_min_score", "external_max_per_image", "min_side")


def make_step_fn(cfg: dict) -> Callable[[dict], dict]:
    """``fn(item) -> {"path", "height", "width", "proposals"}`` for :func:`ris_utils.engine.run`; builds the backend,
    the selector and the external masks NOW (fail fast). Settings missing from ``cfg`` take their defaults
    (:class:`ris_utils.settings.Masks`)."""
    cfg = complete("masks", cfg)
    backend = build_backend(cfg)
    selector = make_selector(cfg.get("selector"))
    external = None
    if cfg["external_masks"]:
        external = load_external_masks(cfg["external_masks"], min_score=float(cfg["external_min_score"]),
                                       max_per_image=int(cfg["external_max_per_image"]))
    min_side = int(cfg["min_side"])
    max_pixels = check_max_pixels(cfg["max_pixels"])

    def fn(item: dict) -> dict:
        image = load_image_rgb(item["path"], min_side=min_side, max_pixels=max_pixels)
        ext = None if external is None else external.get(item["image_id"], [])
        props = propose_masks(image, backend, selector, ext)
        # the image's path travels with the record, so step 2 reads the very file step 1 segmented
        return {"path": str(item["path"]), "height": int(image.shape[0]), "width": int(image.shape[1]),
                "proposals": [p.to_dict() for p in props]}

    return fn


def run_masks(cfg: dict, items: list[dict], out_dir: str | os.PathLike, *, fn: Callable | None = None,
              progress: bool = True) -> dict:
    """Run step 1 over ``items`` through the engine into ``out_dir``; returns the engine summary.

    ``fn``: a step function from :func:`make_step_fn` (same ``cfg``) to reuse a built model across splits;
    by default it is built here, before any image is read.
    """
    cfg = complete("masks", cfg)
    fn = fn or make_step_fn(cfg)
    conf = {k: cfg.get(k) for k in OUTPUT_KEYS}  # option groups (amg, selector, components) may be absent
    summary = engine.run("masks", items, fn, out_dir, seed=int(cfg["seed"]), config=conf,
                         desc="masks", progress=progress)
    save_config(cfg, out_dir)  # the resolved settings beside the records
    return summary


def check_max_pixels(value) -> int:
    """``masks.max_pixels`` as a positive int (refused with the setting named otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1 or int(value) != value:
        raise ValueError(f"masks.max_pixels must be a positive number of pixels (default {MAX_PIXELS:,}), got {value!r}")
    return int(value)


def image_items_from(images: str | os.PathLike) -> list[dict]:
    """Engine items from a folder (image files, sorted, recursive), a text file (one path per line,
    relative to the list's folder) or a JSON list of ``{"image_id", "path"}``. ``image_id`` = the path
    relative to the folder / as listed. A listed file that is missing becomes an error record later, and so
    does (in a folder) a dangling symlink, a symlink loop, an unreadable file, a name that is not valid UTF-8
    (its ``image_id`` / ``file_name`` show the bad bytes as ``\\xNN``), and (in a JSON list) an item without
    ``path``."""
    p = Path(images)
    if p.is_dir():
        # not f.is_dir(): regular files, and also dangling links / loops, which become error records
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and not f.is_dir())
        if not files:
            raise ValueError(f"--images {p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return [{"image_id": display_path(f.relative_to(p)), "path": str(f), "file_name": display_path(f.name)}
                for f in files]
    if not p.is_file():
        raise FileNotFoundError(f"--images {p}: no such folder or list file")
    if p.suffix == ".json":
        try:
            items = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--images {p}: not valid JSON ({e}); a JSON list of {{'image_id', 'path'}} "
                             f"expected") from None
        if not isinstance(items, list):
            raise ValueError(f"--images {p}: a JSON list of {{'image_id', 'path'}} expected")
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise ValueError(f"--images {p}: item {i} is {type(it).__name__}, not an object "
                                 f"{{'image_id', 'path'}}")
            if it.get("path") and not Path(it["path"]).is_absolute():
                it["path"] = str(p.parent / it["path"])
            if "image_id" not in it:  # keyed by its path, or by its position when it has none
                it["image_id"] = it.get("path") or f"{p.name}[{i}]"
            if not it.get("path"):  # the engine makes it an error record naming the list and the item
                it["file_name"] = f"{p.name}[{i}]"
        return items
    items = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            f = Path(line) if Path(line).is_absolute() else p.parent / line
            items.append({"image_id": line, "path": str(f), "file_name": f.name})
    return items


def split_items(cfg: dict, split: str) -> list[dict]:
    """The unique images of a REFER split of the profile's dataset (``masks.dataset``/``masks.split_by``)."""
    dataset, split_by = cfg.get("dataset"), cfg.get("split_by")
    if not dataset or not split_by:
        raise ValueError("masks.dataset and masks.split_by must name the REFER dataset whose split images "
                         f"are processed (profile {cfg.get('profile')!r})")
    return load_refer(cfg["data_root"], dataset, split_by).image_items(split)


def output_dir_for(cfg: dict, split: str) -> Path:
    """``<work_dir>/masks/<split>`` (:func:`ris_utils.layout.masks_dir`)."""
    return masks_dir(cfg, split)


def cli(argv: list[str] | None = None) -> int:
    """``python -m ris_utils masks (--images DIR_OR_LIST --out DIR | --split S) --profile NAME [--param k=v]``."""
    ap = argparse.ArgumentParser(prog="python -m ris_utils masks", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, a text file of paths, or a JSON list of items")
    src.add_argument("--split", action="append",
                     help="REFER split(s) of the profile's dataset (repeatable); default out: <work_dir>/masks/<split>")
    ap.add_argument("--out", help="output folder (required with --images)")
    ap.add_argument("--profile", default="shapes")
    ap.add_argument("--param", action="append", default=[], help="override a masks setting: key=value (dotted keys)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any image became an error record")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = step_config(args.profile, "masks", **parse_params(args.param))
    if args.images and not args.out:
        ap.error("--out is required with --images")
    try:
        fn = make_step_fn(cfg)  # the model first: checkpoint problems fail before any image
        if args.images:
            jobs = [(image_items_from(args.images), Path(args.out))]
        else:
            jobs = [(split_items(cfg, s), Path(args.out) / s if args.out else output_dir_for(cfg, s))
                    for s in args.split]
        summaries = []
        for items, out in jobs:
            summaries.append((out, run_masks(cfg, items, out, fn=fn, progress=not args.no_progress)))
    except (engine.ResumeMismatchError, engine.FolderBusyError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for out, summary in summaries:
        if summary.get("merged"):
            print(json.dumps({k: summary[k] for k in ("step", "n_items", "ok", "failed", "failed_reasons")}))
            print(f"records: {out / engine.RECORDS}")
    # failed images are error records counted in summary.json; they fail the command only with --strict
    return engine.strict_exit(args.strict, [s for _, s in summaries])



if __name__ == "__main__":
    sys.exit(cli())
