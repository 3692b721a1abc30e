"""The paper's data (``data.world: refer``, notebook 00): the RefCOCO family and COCO train2014 under the data root,
checked (and downloaded with :mod:`ris_utils.download` when the profile says so), and PhraseCut, the
unseen-domain benchmark, converted once into its own REFER root."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..download import SOURCES, download, is_present, resolve_names
from ..fileio import atomic_write
from ..layout import IMAGE_DIRS
from ..profiles import resolve_paths
from ..settings import complete
from . import phrasecut
from .refer import refer_statistics

logger = logging.getLogger(__name__)

#: files in COCO's train2014 folder (every RefCOCO / RefCOCO+ / RefCOCOg image is one of them)
COCO_TRAIN2014_IMAGES = 82_783


def prepare(cfg: dict) -> dict:
    """``data.world: refer`` (the paper profile): check / download what the profile needs, return statistics.

    Keys read from ``cfg`` (the profile's ``data`` section merged with ``shared``): ``data_root``,
    ``datasets`` (list of ``{name, split_by}``), ``need`` (``--what`` names, default: the datasets +
    ``coco-train2014``), ``download`` (bool: fetch what is missing; false = only check and say what to run),
    ``pseudo_split`` (dataset/split whose unique images step 1 uses, e.g. ``{dataset: refcoco+, split_by:
    unc, split: train}``), ``unseen_domain`` (optional: PhraseCut, see :func:`prepare_unseen_domain`).

    Returns flat statistics (``data.<dataset>.<split>.refs`` ..., ``data.train2014_images``; with PhraseCut
    also ``data.<split_by>.<split>.refs`` ..., e.g. ``data.phrasecut_unseen.test.refs``).
    """
    cfg = complete("data", cfg)
    root = Path(cfg["data_root"])
    datasets = cfg["datasets"] or [{"name": "refcoco+", "split_by": "unc"}]   # the paper's RefCOCO+ (UNC)
    need = cfg["need"] or [*(d["name"] for d in datasets), "coco-train2014"]
    missing = [s for s in resolve_names(need) if not is_present(s, root)]
    if missing and cfg["download"]:
        download([s.name for s in missing], root, progress=cfg["progress"])
        missing = [s for s in missing if not is_present(s, root)]
    if missing:
        names = ",".join(s.name for s in missing)
        raise FileNotFoundError(
            f"the paper profile needs {names} under data_root={root}, which are missing. Run\n"
            f"  python -m ris_utils download --what {names} --data-root {root}\n"
            f"or set data.download: true in the profile (papermill_runs/{cfg['profile'] or 'paper'}.yaml)."
        )
    stats = refer_statistics(root, datasets, cfg.get("pseudo_split"))
    n_coco = stats.get("data.train2014_images")
    if "coco-train2014" in need and n_coco is not None and n_coco < COCO_TRAIN2014_IMAGES:
        logger.warning("%s holds %d images, COCO train2014 has %d: images of some refs may be missing",
                       root / IMAGE_DIRS[0], n_coco, COCO_TRAIN2014_IMAGES)
    if cfg.get("unseen_domain"):
        stats.update(prepare_unseen_domain(cfg["unseen_domain"], root))
    return stats


def prepare_unseen_domain(ud: dict, data_root: str | os.PathLike) -> dict:
    """Convert PhraseCut (the unseen-domain benchmark) into its own REFER root, once; return its ref counts.

    ``ud`` = the profile's ``data.unseen_domain``: ``root`` (the PhraseCut folder ``data/VGPhraseCut_v0``,
    relative to ``data_root``), ``out`` (the REFER root to write, relative to the project root like the
    profile's paths; its own root because ``<out>/images`` becomes a link to PhraseCut's images while
    ``data_root/images`` holds COCO's), ``splits`` (PhraseCut splits, default ``[test]``, the benchmark split)
    and ``unseen_only`` (default true: only ``refs(phrasecut_unseen).p``, the tasks outside COCO's 80
    categories). When ``root`` is absent this logs a warning naming the manual download and returns ``{}``.
    The conversion is skipped when the refs file is newer than every source file and was written with the
    same splits / unseen_only (``<out>/phrasecut/convert.json``). Returns ``data.<split_by>.<split>.refs``
    (+ ``.sentences``, ``.images``) for each refs file written.
    """
    for key in ("root", "out"):
        if not ud.get(key):
            raise ValueError(f"data.unseen_domain needs {key!r} (PhraseCut folder under data_root / REFER root "
                             f"to write), got {ud!r}")
    src = Path(data_root) / ud["root"]
    out = Path(resolve_paths({"data_root": str(ud["out"])})["data_root"])
    splits = [str(s) for s in (ud.get("splits") or ["test"])]
    unseen_only = bool(ud.get("unseen_only", True))
    if not src.is_dir():
        logger.warning("unseen domain: no PhraseCut folder at %s, so its benchmark is not prepared (the grid "
                       "skips it). %s", src, SOURCES["phrasecut"].note)
        return {}
    split_bys = [phrasecut.SPLIT_BY_UNSEEN] + ([] if unseen_only else [phrasecut.SPLIT_BY])
    refs_file = out / phrasecut.DATASET / f"refs({phrasecut.SPLIT_BY_UNSEEN}).p"
    stamp = out / phrasecut.DATASET / "convert.json"
    settings = {"root": str(src.resolve()), "splits": splits, "unseen_only": unseen_only}
    sources = [src / "image_data_split.json", *(src / f"refer_{sp}.json" for sp in splits)]
    newest = max((p.stat().st_mtime for p in sources if p.is_file()), default=0.0)
    fresh = (refs_file.is_file() and refs_file.stat().st_mtime > newest and stamp.is_file()
             and json.loads(stamp.read_text()) == settings
             and all((out / phrasecut.DATASET / f"refs({sb}).p").is_file() for sb in split_bys))
    if fresh:
        logger.info("unseen domain: %s is up to date", refs_file)
    else:
        t0 = time.time()
        res = phrasecut.convert(src, out, tuple(splits), unseen_only=unseen_only)
        atomic_write(stamp, json.dumps(settings, indent=1))
        logger.info("unseen domain: PhraseCut %s -> %s (%d refs, %d unseen) in %.0f s", splits, res["out"],
                    res["refs"], res["refs_unseen"], time.time() - t0)
    stats: dict = {}
    for sb in split_bys:
        if not (out / phrasecut.DATASET / f"refs({sb}).p").is_file():
            continue  # no unseen task at all (convert writes no unseen file then)
        counts = refer_statistics(out, [{"name": phrasecut.DATASET, "split_by": sb}])
        prefix = f"data.{phrasecut.DATASET}."
        stats.update({f"data.{sb}." + k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix)})
    return stats
