"""Step 2 as a pipeline step: caption candidates for every mask, written through the engine.

``python -m ris_utils captions --masks DIR --out DIR --profile NAME [--mode naive|distinctive] [--workers W]
[--param k=v]``

For each image of a split: the masks (step 1's proposals from ``<work_dir>/masks/<split>/records.jsonl``,
or with ``source: gt`` the shapes world's object masks), their 4 views (:mod:`ris_utils.crops`), and the
paper's candidates per mask - per view, 1 beam-search caption + one sampled caption per top-k / top-p
setting (:func:`ris_utils.captioning.generate_candidates`) - naive (plain sampling) or distinctive
(the contrast term of distinctive caption sampling). One engine record per image
(``<work_dir>/captions/<mode>/<split>/records.jsonl``, resumable), body as in docs/DESIGN.md::

    {"height", "width", "masks": [{"mask_index", "segmentation", "bbox",
                                   "candidates": [{"text", "view", "setting", "mode"}]}]}

Masks with no pixel get an empty candidate list and do not count in N (the masks decoded together).

:func:`run_caption_jobs` runs several split x mode (x seed) jobs in ``captions.workers`` processes, each
captioning one engine shard of every job (same records as one process).

:func:`distinct_rate` scores candidates on the shapes world (docs/DESIGN.md): each mask is matched to the
ground-truth object of highest IoU (>= 0.5, else unmatched, reported apart); a candidate is distinct when
``shapes.referee(text, scene) == {that object}``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import weakref
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from ris_utils import engine, layout, profiles, settings
from ris_utils.captioning import CocaDecoder, generate_candidates
from ris_utils.captioning.train import check_captioner_checkpoint, load_captioner
from ris_utils.data import refer, shapes
from ris_utils.images import load_image_rgb
from ris_utils.models import torch_threads

logger = logging.getLogger(__name__)

MODES = ("naive", "distinctive")


# ------------------------------------------------------------------------------------------ settings


def decode_settings(cfg: dict) -> list[dict]:
    """The per-view candidate settings of the profile: the beam, then one per top_k / top_p value."""
    out = []
    beam = cfg.get("beam")
    if beam:
        out.append({"kind": "beam", **dict(beam)})
    out += [{"top_k": int(k)} for k in (cfg.get("top_k") or [])]
    out += [{"top_p": float(p)} for p in (cfg.get("top_p") or [])]
    if not out:
        raise ValueError("captions: no decoding settings (give beam, top_k and/or top_p in the profile)")
    return out


def view_kinds(cfg: dict) -> tuple:
    views = settings.complete("captions", cfg)["views"]
    out = []
    for v in views:
        if isinstance(v, str) and v != "masked":
            try:
                v = float(v)
            except ValueError as e:
                raise ValueError(f"captions.views: {v!r} is neither 'masked' nor an enlargement factor") from e
        out.append(v if isinstance(v, str) else float(v))
    return tuple(out)


def step_settings(cfg: dict, mode: str) -> dict:
    """The settings that define a run's output (stored by the engine; a rerun with others is refused)."""
    given, cfg = cfg, settings.complete("captions", cfg)
    n_range = cfg["n_range"]
    return {"mode": mode, "model": given.get("model"), "pretrained": str(cfg["pretrained"]),
            "tokenizer": given.get("tokenizer"), "views": [str(v) for v in view_kinds(cfg)],
            "fill": cfg["fill"], "settings": decode_settings(cfg), "seq_len": int(cfg["seq_len"]),
            "min_seq_len": int(cfg["min_seq_len"]), "temperature": float(cfg["temperature"]),
            "n_range": [int(n_range[0]), int(n_range[1])], "seed": int(cfg["seed"]),
            "box": cfg["box"], "precision": cfg["precision"]}


# ------------------------------------------------------------------------------------------ items


def image_path(rec: dict, cfg: dict) -> str:
    """The image file of a record: its ``path``, else ``<images or the data root's image folder>/<file_name>``
    (:func:`ris_utils.layout.image_dir`: ``images/train2014`` in the REFER toolkit's layout)."""
    if rec.get("path"):
        return rec["path"]
    return str(layout.images_of(cfg) / rec["file_name"])


def split_cap(max_images, split: str) -> int | None:
    """``captions.max_images`` for one split: a number (every split), ``{split: number}`` (splits not named
    are not capped) or null."""
    if isinstance(max_images, dict):
        max_images = max_images.get(split)
    if max_images is None:
        return None
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
        raise ValueError(f"captions.max_images must be null, an int >= 0 or {{split: int}}, got {max_images!r} "
                         f"(split {split!r})")
    return max_images or None


def items_from_masks(masks_dir, cfg: dict, max_images: int | None = None) -> list[dict]:
    """Engine items from step 1's records (``masks_dir/records.jsonl``; failed images are skipped)."""
    items = []
    for rec in engine.read_records(masks_dir, only_ok=True):
        props = rec.get("proposals")
        if props is None:
            raise ValueError(f"{Path(masks_dir) / 'records.jsonl'}: record of image {rec.get('image_id')} has "
                             "no 'proposals' (is this a masks-step output?)")
        items.append({"image_id": rec["image_id"], "file_name": rec.get("file_name"),
                      "path": image_path(rec, cfg), "height": rec.get("height"), "width": rec.get("width"),
                      "masks": [{"mask_index": i, "segmentation": p["segmentation"], "bbox": p.get("bbox")}
                                for i, p in enumerate(props)]})
        if max_images and len(items) >= max_images:
            break
    return items


def items_from_gt(cfg: dict, split: str, max_images: int | None = None) -> list[dict]:
    """Engine items whose masks are the shapes world's ground-truth objects (``source: gt``)."""
    scenes = shapes.load_scenes(cfg["data_root"])
    items = []
    for image_id in sorted(scenes):
        sc = scenes[image_id]
        if sc.split != split:
            continue
        masks = shapes.object_masks(sc)
        items.append({"image_id": image_id, "file_name": sc.file_name,
                      "path": str(shapes.image_path(cfg["data_root"], sc.file_name)),
                      "height": sc.height, "width": sc.width,
                      "masks": [{"mask_index": o.obj_id, "segmentation": refer.encode_mask(masks[o.obj_id]),
                                 "bbox": refer.mask_bbox_xywh(masks[o.obj_id])} for o in sc.objects]})
        if max_images and len(items) >= max_images:
            break
    if not items:
        raise ValueError(f"captions source gt: no scene of split {split!r} under {cfg['data_root']}")
    return items


# ------------------------------------------------------------------------------------------ the step


def caption_image(item: dict, captioner, cfg: dict, mode: str, decoder=None) -> dict:
    """Record body of one image (see the module docstring)."""
    cfg = settings.complete("captions", cfg)
    if mode not in MODES:
        raise ValueError(f"captions mode must be one of {MODES}, got {mode!r}")
    image = load_image_rgb(item["path"])
    h, w = image.shape[:2]
    entries = []
    decoded = []
    for m in item["masks"]:
        mask = refer.decode_segmentation(m["segmentation"], h, w).astype(bool)
        entries.append({"mask_index": int(m["mask_index"]), "segmentation": m["segmentation"],
                        "bbox": m.get("bbox") or refer.mask_bbox_xywh(mask), "candidates": []})
        decoded.append(mask)
    live = [k for k, mask in enumerate(decoded) if mask.any()]
    if live:
        st = step_settings(cfg, mode)
        views = captioner.views(image, [decoded[k] for k in live], view_kinds(cfg), fill=cfg["fill"],
                                box=cfg["box"])
        dev = next(captioner.model.parameters()).device
        with torch.no_grad(), precision_context(cfg["precision"], dev):
            cands = generate_candidates(
                captioner.model, captioner.tokenizer, views.to(dev), st["settings"],
                distinctive=mode == "distinctive", seed=st["seed"], image_key=item["image_id"],
                seq_len=st["seq_len"], min_seq_len=st["min_seq_len"], temperature=st["temperature"],
                min_masks=st["n_range"][0], max_masks=st["n_range"][1],
                mask_indices=[entries[k]["mask_index"] for k in live], decoder=decoder)
        for k, cs in zip(live, cands):
            entries[k]["candidates"] = [{"text": c["text"], "view": int(c["view"]), "setting": c["setting"],
                                         "mode": c["mode"]} for c in cs]
    return {"height": int(h), "width": int(w), "masks": entries}


PRECISIONS = ("autocast_fp16", "fp32")


def precision_context(precision: str, device):
    """The decoding precision (``captions.precision``): ``"autocast_fp16"`` = the authors' ``with
    torch.no_grad(), torch.cuda.amp.autocast():`` around generation (``distinctive_caption_generation.py``
    l. 223 / 234 at de5d124), i.e. ``torch.autocast("cuda", torch.float16)``, on CUDA only: on any other
    device it is a no-op (fp32), as ``torch.cuda.amp.autocast`` is for CPU tensors. ``"fp32"``: no autocast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"captions.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "autocast_fp16" and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def output_dir(cfg: dict, mode: str, split: str) -> Path:
    """``<work_dir>/captions/<mode>/<split>`` (:func:`ris_utils.layout.captions_dir`)."""
    return layout.captions_dir(cfg, mode, split)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> CocaDecoder (beam memo)


def run_captions(cfg: dict, split: str, mode: str, captioner=None, items: list[dict] | None = None,
                 out_dir=None, masks_dir=None, progress: bool = True, *, rank: int | None = None,
                 world_size: int | None = None, merge_output: bool = True) -> dict:
    """Caption one split in one mode through the engine (resumable). Returns the engine summary + seconds.

    Arguments:
      cfg: ``profiles.step_config(profile, "captions", ...)``.
      split: the split name (``train``, ``val``, ...): picks ``<work_dir>/masks/<split>`` / the GT scenes.
      mode: ``naive`` or ``distinctive``.
      captioner: a loaded :class:`ris_utils.captioning.train.Captioner` (default: ``load_captioner(cfg)``).
      items: engine items (default: from ``masks_dir`` or, with ``source: gt``, the world's objects).
      out_dir: default ``<work_dir>/captions/<mode>/<split>``.
      rank, world_size, merge_output: passed to :func:`ris_utils.engine.run` (one shard of the images,
        merged later with ``engine.merge``; see :func:`run_caption_jobs`). Default: one process, merged.
    """
    cfg = settings.complete("captions", cfg)
    if mode not in MODES:
        raise ValueError(f"captions mode must be one of {MODES}, got {mode!r}")
    max_images = split_cap(cfg["max_images"], split)
    if items is None:
        if cfg["source"] == "gt":
            items = items_from_gt(cfg, split, max_images)
        else:
            masks_dir = Path(masks_dir or layout.masks_dir(cfg, split))
            if not layout.is_done(masks_dir):
                raise FileNotFoundError(f"{masks_dir / engine.RECORDS} not found: run the masks step for split "
                                        f"{split!r} first (notebook 01_mask_proposals.ipynb or `python -m ris_utils "
                                        f"masks --split {split}`), or set captions.source: gt")
            items = items_from_masks(masks_dir, cfg, max_images)
    captioner = captioner or load_captioner(cfg)
    decoder = _DECODERS.get(captioner.model)
    if decoder is None or decoder.fingerprint != decoder.weights_fingerprint():
        # one decoder per model, kept across runs (modes, splits, seeds) for its beam memo; a new one
        # (empty memo) when the weights changed
        decoder = CocaDecoder(captioner.model)
        decoder.fingerprint = decoder.weights_fingerprint()
        _DECODERS[captioner.model] = decoder
    out_dir = Path(out_dir) if out_dir else output_dir(cfg, mode, split)
    st = step_settings(cfg, mode)
    t0 = time.perf_counter()
    with torch_threads(cfg["threads"], "captions.threads"):
        summary = engine.run("captions", items, lambda it: caption_image(it, captioner, cfg, mode, decoder),
                             out_dir, seed=st["seed"], desc=f"captions {mode} {split}", config=st,
                             progress=progress, rank=rank, world_size=world_size, merge_output=merge_output)
    if merge_output and engine.dist_info()[0] == 0:
        profiles.save_config(cfg, out_dir)  # the resolved settings beside the records
    summary = dict(summary)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["out_dir"] = str(out_dir)
    return summary


# ------------------------------------------------------------------------------------------ several jobs


def _check_jobs(cfg: dict, jobs) -> list[dict]:
    out, dirs = [], set()
    for k, job in enumerate(jobs):
        if not isinstance(job, dict) or "split" not in job or "mode" not in job:
            raise ValueError(f"captions job {k}: a dict with 'split' and 'mode' expected, got {job!r}")
        unknown = set(job) - {"split", "mode", "seed", "out_dir", "masks_dir"}
        if unknown:
            raise ValueError(f"captions job {k}: unknown keys {sorted(unknown)}")
        if job["mode"] not in MODES:
            raise ValueError(f"captions mode must be one of {MODES}, got {job['mode']!r}")
        out_dir = _job_out_dir(cfg, job).resolve()
        if out_dir in dirs:
            raise ValueError(f"captions job {k}: output folder {out_dir} is also another job's")
        dirs.add(out_dir)
        out.append(dict(job))
    return out


def _job_cfg(cfg: dict, job: dict) -> dict:
    return {**cfg, "seed": int(job["seed"])} if job.get("seed") is not None else cfg


def _job_out_dir(cfg: dict, job: dict) -> Path:
    return Path(job["out_dir"]) if job.get("out_dir") else output_dir(cfg, job["mode"], job["split"])


def _run_job(cfg: dict, job: dict, captioner, progress: bool, **shard) -> dict:
    return run_captions(_job_cfg(cfg, job), job["split"], job["mode"], captioner, out_dir=_job_out_dir(cfg, job),
                        masks_dir=job.get("masks_dir"), progress=progress, **shard)


def _caption_shard(cfg: dict, jobs: list[dict], progress: bool, rank: int, world_size: int) -> list[dict]:
    """One worker of :func:`run_caption_jobs`: shard ``rank`` of every job, in order, with one captioner
    (and so one decoder: its beam memo is kept across the jobs). Runs in a spawned process."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    captioner = load_captioner(cfg)
    return [_run_job(cfg, job, captioner, progress, rank=rank, world_size=world_size, merge_output=False)
            for job in jobs]


def run_caption_jobs(cfg: dict, jobs: list[dict], workers: int | None = 1, progress: bool = True,
                     captioner=None) -> list[dict]:
    """Run several captions jobs (:func:`run_captions`), in ``workers`` processes. Returns one summary per job.

    Arguments:
      cfg: ``profiles.step_config(profile, "captions", ...)``.
      jobs: ``[{"split", "mode", "seed" (optional: overrides cfg's), "out_dir" (optional),
        "masks_dir" (optional)}]``.
      workers: ``captions.workers``. 1 (or None/0): the jobs one after the other in this process, with
        ``captioner`` (default: ``load_captioner(cfg)``, loaded once). W > 1: W spawned processes; process r
        runs shard r (engine ``rank=r, world_size=W``) of every job in order, with its own
        ``load_captioner(cfg)`` (``captioner`` is not used: pass ``workers=1`` for a captioner that is not
        the one the profile names) and ``torch.set_num_threads(captions.threads)``; then the shards of each
        job are merged here. The records are byte-identical whatever W (noise is keyed per image) and a
        rerun resumes with any W. A worker's exception is raised here (with a note naming the worker).

    Each summary is the engine's merged summary plus ``seconds`` (with W > 1: the slowest worker's time on
    that job, ``seconds_by_rank`` lists them), ``out_dir`` and ``workers``.
    """
    cfg = settings.complete("captions", cfg)
    jobs = _check_jobs(cfg, jobs)
    n = engine.check_workers(workers, "captions.workers")
    if not jobs:
        return []
    if captioner is None:
        check_captioner_checkpoint(cfg)  # a typo'd captions.pretrained fails here, before workers or training
    if n <= 1:
        captioner = captioner or load_captioner(cfg)
        return [{**_run_job(cfg, job, captioner, progress), "workers": 1} for job in jobs]
    if captioner is None and cfg["tokenizer"] != "open_clip":
        # a shapes captioner whose checkpoint does not match the profile is trained on first use: do it
        # once here (it is cached under the work dir), not once per worker (a given one was loaded already)
        load_captioner(cfg)
    shards = engine.run_shard_workers(_caption_shard, (cfg, jobs, progress), n, "captions")
    out = []
    for k, job in enumerate(jobs):
        out_dir = _job_out_dir(cfg, job)
        summary = dict(engine.merge(out_dir, step="captions"))
        profiles.save_config(_job_cfg(cfg, job), out_dir)
        per_rank = [shards[r][k]["seconds"] for r in range(n)]
        summary.update(seconds=max(per_rank), seconds_by_rank=per_rank, out_dir=str(out_dir), workers=n)
        out.append(summary)
    return out


# ------------------------------------------------------------------------------------------ distinct rate


def candidate_table(records, scenes, min_iou: float = 0.5) -> list[dict]:
    """One row per candidate of the records, scored on the shapes world.

    ``scenes``: ``shapes.load_scenes(data_root)``, or a :class:`ris_utils.data.shapes.DistinctJudge` over them
    (its verdicts are kept for later calls on the same split). Row keys: ``image_id, mask_index, obj_id``
    (matched GT object or None), ``iou, text, view, setting, mode, n_words, distinct``
    (``referee(text, scene) == {obj_id}``; False when unmatched).
    """
    judge = shapes.DistinctJudge.of(scenes, min_iou)
    rows = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            continue
        judge.scene(rec["image_id"], "distinct_rate")
        for m in rec["masks"]:
            obj, iou = judge.mask_object(rec, m)
            for c in m["candidates"]:
                ok = judge.is_distinct(rec["image_id"], c["text"], obj)
                rows.append({"image_id": rec["image_id"], "mask_index": m["mask_index"], "obj_id": obj,
                             "iou": round(float(iou), 4), "text": c["text"], "view": c["view"],
                             "setting": c["setting"], "mode": c["mode"], "n_words": len(c["text"].split()),
                             "distinct": bool(ok)})
    return rows


def distinct_rate(records, scenes, min_iou: float = 0.5) -> dict:
    """Distinct rate of caption candidates (docs/DESIGN.md); ``scenes`` as in :func:`candidate_table`.

    Each mask is matched to the GT object of highest IoU (>= ``min_iou``, else unmatched); a candidate is
    distinct when ``shapes.referee(text, scene) == {matched object}``.

    Returns:
      ``{"rate": distinct / candidates over matched masks (nan if none), "n_candidates", "n_distinct",
      "n_masks", "n_matched_masks", "n_unmatched_masks", "n_unmatched_candidates",
      "by_setting": {setting: rate}, "by_view": {view: rate}}``.
    """
    rows = candidate_table(records, scenes, min_iou)
    matched = [r for r in rows if r["obj_id"] is not None]
    masks = {(r["image_id"], r["mask_index"]): r["obj_id"] for r in rows}

    def rate(rs):
        return sum(r["distinct"] for r in rs) / len(rs) if rs else float("nan")

    groups_s, groups_v = defaultdict(list), defaultdict(list)
    for r in matched:
        groups_s[r["setting"]].append(r)
        groups_v[r["view"]].append(r)
    return {"rate": rate(matched), "n_candidates": len(matched), "n_distinct": sum(r["distinct"] for r in matched),
            "n_masks": len(masks), "n_matched_masks": sum(v is not None for v in masks.values()),
            "n_unmatched_masks": sum(v is None for v in masks.values()),
            "n_unmatched_candidates": len(rows) - len(matched),
            "by_setting": {k: rate(v) for k, v in groups_s.items()},
            "by_view": {k: rate(v) for k, v in sorted(groups_v.items())}}


def text_statistics(records) -> dict:
    """Mean caption length (words), vocabulary size and share of unique candidates per mask."""
    lengths, vocab, uniq = [], Counter(), []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            continue
        for m in rec["masks"]:
            texts = [c["text"] for c in m["candidates"]]
            for t in texts:
                words = t.split()
                lengths.append(len(words))
                vocab.update(words)
            if texts:
                uniq.append(len(set(texts)) / len(texts))
    return {"mean_length": float(np.mean(lengths)) if lengths else float("nan"), "vocab_size": len(vocab),
            "unique_share": float(np.mean(uniq)) if uniq else float("nan"), "n_candidates": len(lengths)}


# ------------------------------------------------------------------------------------------ CLI


def cli(argv: list[str] | None = None) -> int:
    """``python -m ris_utils captions --masks DIR --out DIR --profile NAME [--mode M] [--param k=v]``."""
    ap = argparse.ArgumentParser(prog="python -m ris_utils captions",
                                 description="Step 2: naive / distinctive caption candidates for every mask.")
    ap.add_argument("--masks", default=None,
                    help="folder with step 1's records.jsonl (default: <work_dir>/masks/<split>)")
    ap.add_argument("--out", default=None, help="output folder (default: <work_dir>/captions/<mode>/<split>)")
    ap.add_argument("--profile", default="shapes", help="profile name or YAML path (default: shapes)")
    ap.add_argument("--mode", default=None, choices=MODES,
                    help="naive or distinctive (default: every mode of the profile's captions.modes)")
    ap.add_argument("--split", default=None, help="split name (default: every split of captions.splits)")
    ap.add_argument("--param", action="append", default=[], help="override, e.g. max_images=10 (repeatable)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes, each captioning a shard of every image list (default: captions.workers)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any image became an error record")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = profiles.step_config(args.profile, "captions", **profiles.parse_params(args.param))
    modes = [args.mode] if args.mode else list(cfg.get("modes") or MODES)
    splits = [args.split] if args.split else list(cfg.get("splits") or ["train"])
    if (args.masks or args.out) and len(splits) * len(modes) > 1 and args.out:
        raise SystemExit("--out names one folder: give --mode and --split too (or leave --out out)")
    workers = args.workers if args.workers is not None else cfg["workers"]
    jobs = [{"split": split, "mode": mode, "out_dir": args.out, "masks_dir": args.masks}
            for split in splits for mode in modes]
    summaries = run_caption_jobs(cfg, jobs, workers)
    for job, s in zip(jobs, summaries):
        print(f"captions {job['mode']} {job['split']}: {s['ok']} ok, {s['failed']} failed in {s['seconds']} s "
              f"-> {s['out_dir']}")
    return engine.strict_exit(args.strict, summaries)


__all__ = ["decode_settings", "view_kinds", "step_settings", "items_from_masks", "items_from_gt", "image_path",
           "caption_image", "run_captions", "run_caption_jobs", "output_dir", "candidate_table", "distinct_rate",
           "text_statistics", "cli", "MODES"]
