"""Step 3 (notebook 03): distinctiveness-based text filtering with CLIP.

For every caption candidate ``c`` written for a target mask ``t`` of an image with masks ``k = 1..K``
(paper, step 3; CLIP RN50 with OpenAI weights, scores are CLIP logits = logit_scale x cosine)::

    noun_k(c)    = CLIP(masked crop of k,        "a photo of a {head noun of c}")
    caption_k(c) = CLIP(crop of k enlarged x1.2, c)
    product_k(c) = noun_k(c) * caption_k(c)
    DoC(c)       = product_t(c) / max_{k != t} product_k(c)

Candidates with ``DoC > 1`` survive (``DoC == 1``, a tie with another mask, does NOT). Images with a single
mask: ``DoC = noun_t(c)`` and the top ``C // 2`` of the mask's ``C`` candidates by it survive, ranked as the
authors rank them (``np.argsort(doc)[::-1][:C // 2]``, so ties follow numpy's argsort order;
``my_utils/pseudo_datasets.py`` l. 658-660 at de5d124). With ``C == 1`` that keeps none (the authors' code
then crashes on ``random.choice([])``; here the mask goes to the fallback below, which by default exports
its one candidate).

A mask none of whose candidates survives is handled by ``fallback`` (``filter.fallback``):

- ``"all"`` (default, the authors): every candidate of the mask becomes a survivor. The authors' loader
  draws uniformly over ALL of the mask's candidates at every fetch when none has DoC > 1
  (``np.random.choice(num_sent)``, ``my_utils/pseudo_datasets.py`` l. 655 and l. 469-470 at de5d124);
  exporting every candidate as a sentence of the ref gives the same distribution to a loader that draws
  one sentence per sample.
- ``"keep_random"``: one candidate drawn at random (seeded per image) -- the project's earlier rule.
- ``"drop"``: the mask gets no ref.

Non-positive scores (our choice; the ratio assumes positive scores, as CLIP logits of matching pairs are):
``nonpositive="clamp"`` (default) uses ``s+ = max(s, 0)`` in the products, i.e. a cosine <= 0 counts as
"no match at all". Then ``product_t == 0`` gives ``DoC = 0`` (not distinctive, also when every other
product is 0: 0/0 := 0), and ``product_t > 0`` with every ``product_{k!=t} == 0`` gives ``DoC = +inf``
(distinctive; written as ``Infinity`` by Python's json). When every score is positive this is exactly the
paper's formula. ``nonpositive="shift"`` instead adds ``logit_scale`` to every logit before the products
(``s + scale = scale * (1 + cos) >= 0``), a monotone positive transform that changes the ratio's values.
The single-mask rule ranks by the raw noun score (no transform needed).

Noun prompt (the authors, ``distinctive_caption_generation.py`` l. 259 / 287): ``"a photo of a " + noun``,
but ``"a photo of " + noun`` when the extracted noun phrase already starts with an article (``a / an /
the``): :meth:`ClipScorer.prompt_for` applies that rule to any template ending in ``"a {noun}"``.

Precision (``filter.precision``): ``"fp16"`` (the authors: OpenAI ``clip.load`` keeps fp16 weights on CUDA,
so their features, logits, products and DoC ratio are fp16) or ``"fp32"``. fp16 takes effect on CUDA only;
on CPU the scorer always runs in fp32 (a no-op, logged once).

Features are computed once per image: one CLIP image pass per view kind (``"masked"`` for all masks, then
``1.2`` for all masks) and one text pass over the distinct strings of the image (noun prompts and captions).

The step is run by :func:`run_filter` through the resumable engine (``ris_utils.engine``) and writes, in
``<out>/records.jsonl``, the captions body with, per candidate, ``"noun", "noun_scores": [per mask],
"caption_scores": [per mask], "doc", "keep"`` and, per mask, ``"survivors": [candidate indices]`` (after
the fallback), ``"fallback"`` (``None`` or the rule applied) and ``"dropped"`` (``None`` or the reason).
:func:`filter_jobs` runs several mode / split / seed jobs in ``filter.workers`` processes, each filtering one
engine shard of every job (same records as one process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from ris_utils import engine, layout, settings
from ris_utils.captioning.step import distinct_rate
from ris_utils.clip_scorer import (  # noqa: F401 - the scorer's names, importable from the step as before
    ARTICLES,
    DEFAULT_PROMPT,
    PRECISIONS,
    ClipScorer,
    build_clip,
    check_clip_checkpoint,
    make_scorer,
)
from ris_utils.data.refer import decode_segmentation
from ris_utils.data.shapes import DistinctJudge
from ris_utils.images import load_image_rgb
from ris_utils.models import torch_threads
from ris_utils.profiles import parse_params, project_root, save_config, step_config
from ris_utils.text import HeadNounExtractor

logger = logging.getLogger(__name__)

FALLBACKS = ("all", "keep_random", "drop")
NONPOSITIVE = ("clamp", "shift")


# --------------------------------------------------------------------------- the score


def degree_of_distinctiveness(noun_scores, caption_scores, target: int, nonpositive: str = "clamp",
                              logit_scale: float = 100.0, dtype: str = "float64") -> np.ndarray:
    """Degree of distinctiveness of the C candidates of mask ``target`` among the K masks of an image.

    The equation (Pseudo-RIS, Yu, Seo, Son, ECCV 2024, arXiv 2407.07412: the method's third step,
    "distinctiveness-based text filtering"; summarised in shared/paper.md, "Step 3")::

        S_noun(c, k) = CLIP(masked crop of mask k, "a photo of a {head noun of c}")
        S_cap(c, k)  = CLIP(crop of mask k's box enlarged x1.2, c)
        P(c, k)      = S_noun(c, k) * S_cap(c, k)

                      P(c, t)
        DoC(c) = -----------------          c survives iff DoC(c) > 1
                 max_{k != t} P(c, k)

    i.e. a caption is distinctive when it matches its own mask better than any other mask of the image (scores
    are CLIP logits, 100 x cosine for OpenAI weights). For ``K == 1`` the single-mask rule of the authors' code
    (``my_utils/pseudo_datasets.py`` l. 658-660): ``DoC(c) = S_noun(c, t)`` (:func:`select_survivors` keeps the
    top ``C // 2``). Non-positive scores: see the module docstring
    (``nonpositive="clamp"``: ``max(s, 0)``, ``0 / x = 0``, ``0 / 0 = 0``, ``x / 0 = inf``;
    ``"shift"``: ``s + logit_scale``).

    Arguments:
      noun_scores, caption_scores: CxK arrays of CLIP logits (candidate x mask).
      target: index of the candidates' own mask (0..K-1).
      nonpositive: ``"clamp"`` or ``"shift"``.
      logit_scale: the shift of ``"shift"`` (CLIP's logit scale: 100 for OpenAI weights).
      dtype: arithmetic of the products and the ratio: ``"float64"`` (default) or ``"float16"`` (the
        authors' fp16 CLIP on CUDA: ``target_score / max_other_score`` of fp16 tensors,
        ``distinctive_caption_generation.py`` l. 298-310; IEEE products and quotients are correctly
        rounded in numpy and torch alike, so the values are the same).
    Returns:
      float64 array (C,) of DoC values.
    """
    if dtype not in ("float64", "float16"):
        raise ValueError(f"DoC dtype must be 'float64' or 'float16', got {dtype!r}")
    n = np.asarray(noun_scores, dtype=np.float64)
    c = np.asarray(caption_scores, dtype=np.float64)
    if n.ndim != 2 or n.shape != c.shape:
        raise ValueError(f"noun_scores and caption_scores must both be CxK, got {n.shape} and {c.shape}")
    C, K = n.shape
    if not 0 <= target < K:
        raise ValueError(f"target mask index {target} out of range for K={K} masks")
    if nonpositive not in NONPOSITIVE:
        raise ValueError(f"filter.nonpositive must be one of {NONPOSITIVE}, got {nonpositive!r}")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(c))):
        raise ValueError("CLIP scores must be finite (got NaN or inf): check the model's weights / inputs")
    if K == 1:
        return n[:, 0].copy()
    if nonpositive == "clamp":
        n, c = np.maximum(n, 0.0), np.maximum(c, 0.0)
    else:
        n, c = n + logit_scale, c + logit_scale
    ft = np.float16 if dtype == "float16" else np.float64
    with np.errstate(over="ignore"):
        prod = n.astype(ft) * c.astype(ft)  # (C, K)
    own = prod[:, target]
    others = np.delete(prod, target, axis=1).max(axis=1)
    doc = np.zeros(C, dtype=np.float64)
    pos = own > 0
    with np.errstate(divide="ignore", over="ignore"):
        safe = np.where(others[pos] > 0, others[pos], ft(1.0))
        doc[pos] = np.where(others[pos] > 0, (own[pos] / safe).astype(np.float64), np.inf)
    return doc


def select_survivors(doc, n_masks: int, noun_scores_t=None, caption_scores_t=None) -> np.ndarray:
    """Boolean ``keep`` (C,) of one mask's candidates.

    ``n_masks > 1``: ``DoC > 1`` (strict). ``n_masks == 1``: the authors' rule, the top ``C // 2`` by ``doc``
    (= the noun score) in the order of ``np.argsort(doc)[::-1]`` (``my_utils/pseudo_datasets.py``
    l. 658-659 at de5d124: ties follow numpy's argsort order); ``C == 1`` keeps none (the fallback then
    applies). ``noun_scores_t`` / ``caption_scores_t`` are accepted for the callers' convenience and not used.
    """
    doc = np.asarray(doc, dtype=np.float64)
    C = len(doc)
    if n_masks > 1:
        return doc > 1.0
    keep = np.zeros(C, dtype=bool)
    if C == 0:
        return keep
    keep[np.argsort(doc)[::-1][: C // 2]] = True
    return keep


def apply_fallback(keep, fallback: str, rng: np.random.Generator) -> tuple[list[int], str | None, str | None]:
    """``(survivors, fallback_used, dropped_reason)`` of one mask from its ``keep`` flags.

    No candidate: dropped (``"no_candidates"``). No survivor: ``"all"`` (the authors: their loader draws
    over all candidates, ``my_utils/pseudo_datasets.py`` l. 655) -> every index; ``"keep_random"`` -> one
    index drawn with ``rng``; ``"drop"`` -> dropped (``"no_survivor"``). ``rng`` is used by
    ``"keep_random"`` only.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"filter.fallback must be one of {FALLBACKS}, got {fallback!r}")
    keep = np.asarray(keep, dtype=bool)
    if keep.size == 0:
        return [], None, "no_candidates"
    surv = [int(i) for i in np.flatnonzero(keep)]
    if surv:
        return surv, None, None
    if fallback == "all":
        return list(range(int(keep.size))), "all", None
    if fallback == "keep_random":
        return [int(rng.integers(keep.size))], "keep_random", None
    return [], None, "no_survivor"


# ``(captions_dir, filter_dir)`` of one mode / split / caption seed: ris_utils.layout (re-exported here)
step_dirs = layout.step_dirs


def missing_captions(cdir) -> FileNotFoundError:
    """The error of a filter run whose captions are missing: names the notebook / command to run first."""
    return FileNotFoundError(f"{Path(cdir) / engine.RECORDS} not found: run the captions step first (notebook "
                             f"02_distinctive_captions.ipynb or `python -m ris_utils captions --profile NAME`), "
                             f"or let ris_utils.pipeline.filter_jobs run it")


def check_filter_jobs(jobs) -> list[dict]:
    out = []
    for k, job in enumerate(jobs):
        if not isinstance(job, dict) or "mode" not in job or "split" not in job:
            raise ValueError(f"filter job {k}: a dict with 'mode' and 'split' expected, got {job!r}")
        unknown = set(job) - {"mode", "split", "seed"}
        if unknown:
            raise ValueError(f"filter job {k}: unknown keys {sorted(unknown)}")
        out.append(dict(job))
    return out


def _filter_shard(cfg: dict, dirs: list[tuple[str, str]], progress: bool, rank: int, world_size: int) -> list[dict]:
    """One worker of :func:`run_filter_jobs`: shard ``rank`` of every (captions, filter) folder pair, in order,
    with one scorer. Runs in a spawned process."""
    import torch

    torch.set_num_threads(int(cfg["threads"] or max(1, (os.cpu_count() or 1) // world_size)))
    scorer = make_scorer(cfg)
    return [run_filter(cdir, fdir, cfg, scorer=scorer, progress=progress, rank=rank, world_size=world_size,
                       merge_output=False) for cdir, fdir in dirs]


def run_filter_jobs(cfg: dict, dirs: list[tuple[Path, Path]], workers: int | None = 1,
                    scorer: ClipScorer | None = None, progress: bool = True) -> list[Path]:
    """Filter several ``(captions_dir, filter_dir)`` pairs (each captions folder complete) in ``workers``
    processes; returns the filter folders in order. (:func:`ris_utils.pipeline.filter_jobs` writes missing
    captions first.)

    workers: ``filter.workers``. 1 (or None/0): :func:`run_filter` for each pair in turn, in this process,
    with ``scorer`` (default: ``make_scorer(cfg)``, built once). W > 1: W spawned processes, process r
    filtering shard r (engine ``rank=r, world_size=W``) of every pair in order with its own
    ``make_scorer(cfg)`` (``scorer`` is not used: pass ``workers=1`` for a scorer the profile does not
    describe) and ``torch.set_num_threads(filter.threads)`` (unset: cores / W); the shards of each job are
    then merged here. The records are byte-identical whatever W (the fallback draw is seeded per image) and a
    rerun resumes with any W. A worker's exception is raised here (with a note naming the worker).
    """
    cfg = settings.complete("filter", cfg)
    n = engine.check_workers(workers, "filter.workers")
    fdirs = [Path(f).resolve() for _, f in dirs]
    if len(set(fdirs)) != len(fdirs):
        raise ValueError("filter jobs: two jobs name the same mode / split / seed (the same filter folder)")
    for cdir, _ in dirs:
        if not layout.is_done(cdir):
            raise missing_captions(cdir)
    if not dirs:
        return []
    if n <= 1:
        scorer = scorer or make_scorer(cfg)
        for cdir, fdir in dirs:
            run_filter(cdir, fdir, cfg, scorer=scorer, progress=progress)
        return [Path(f) for _, f in dirs]
    ckpt = (cfg.get("clip") or {}).get("checkpoint")
    if ckpt and (cfg.get("clip") or {}).get("train_if_missing"):
        if not (Path(ckpt) if Path(ckpt).is_absolute() else project_root() / ckpt).is_file():
            make_scorer(cfg)  # trains the missing CLIP once here, not once per worker
    pairs = [(str(c), str(f)) for c, f in dirs]
    engine.run_shard_workers(_filter_shard, (cfg, pairs, progress), n, "filter")
    for _, fdir in dirs:
        engine.merge(fdir, step="filter")
        save_config(cfg, fdir)
    return [Path(f) for _, f in dirs]


# --------------------------------------------------------------------------- per image


def head_noun_extractor(cfg: dict) -> HeadNounExtractor:
    """The profile's ``filter.head_noun`` extractor (``text -> noun``)."""
    hn = settings.group(settings.HeadNoun, cfg.get("head_noun"), "filter.head_noun")
    return HeadNounExtractor(hn["backend"], hn["spacy_model"], hn["nouns"], rule=hn["rule"])


def filter_record(record: dict, image: np.ndarray, scorer: ClipScorer, extractor, fallback: str = "all",
                  nonpositive: str = "clamp", seed: int = 0) -> dict:
    """The filter body of one image from its captions record (see the module docstring).

    Arguments:
      record: a captions record (``height``, ``width``, ``masks`` with ``segmentation`` and ``candidates``).
      image: HxWx3 uint8 RGB.
      scorer: a :class:`ClipScorer`. extractor: ``text -> noun``.
      fallback: ``"all"`` (the authors), ``"keep_random"`` or ``"drop"`` (:func:`apply_fallback`).
      nonpositive: see :func:`degree_of_distinctiveness`.
      seed: seeds the ``keep_random`` draw.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"filter.fallback must be one of {FALLBACKS}, got {fallback!r}")
    h, w = int(record["height"]), int(record["width"])
    if image.shape[:2] != (h, w):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but the record says {w}x{h}")
    masks_in = record.get("masks") or []
    body = {k: v for k, v in record.items() if k not in ("image_id", "file_name", "status", "error", "masks")}
    if not masks_in:
        return {**body, "masks": [], "n_masks": 0}
    masks = np.stack([decode_segmentation(m["segmentation"], h, w).astype(bool) for m in masks_in])
    cands = [[(c["text"], extractor(c["text"])) for c in m.get("candidates") or []] for m in masks_in]
    scores = scorer.score_image(image, masks, cands)
    rng = np.random.default_rng(seed)
    K = len(masks_in)
    out_masks = []
    for t, (m, cl, (ns, cs)) in enumerate(zip(masks_in, cands, scores)):
        doc = (degree_of_distinctiveness(ns, cs, t, nonpositive, scorer.logit_scale,
                                         getattr(scorer, "doc_dtype", "float64")) if cl else np.zeros(0))
        keep = select_survivors(doc, K, ns[:, t] if cl else None, cs[:, t] if cl else None)
        surv, fb, dropped = apply_fallback(keep, fallback, rng)
        new_c = []
        ns64, cs64 = np.asarray(ns, dtype=np.float64), np.asarray(cs, dtype=np.float64)  # exact: float(x) of each
        for i, (c, (_, noun)) in enumerate(zip(m.get("candidates") or [], cl)):
            new_c.append({**c, "noun": noun, "noun_scores": ns64[i].tolist(), "caption_scores": cs64[i].tolist(),
                          "doc": float(doc[i]), "keep": bool(keep[i])})
        out_masks.append({**m, "candidates": new_c, "survivors": surv, "fallback": fb, "dropped": dropped})
    return {**body, "masks": out_masks, "n_masks": K}


def _image_path(record: dict, images_dir: Path | None) -> Path:
    p = record.get("path")
    if p and Path(p).is_file():
        return Path(p)
    if images_dir is None:
        raise FileNotFoundError(f"image {record.get('file_name')!r}: no images directory (set filter.images)")
    return images_dir / record["file_name"]


def images_dir_of(cfg: dict) -> Path | None:
    """``cfg["images"]``, else the data root's image folder (:func:`ris_utils.layout.image_dir`:
    ``images/mscoco/images/train2014``, ``images/train2014`` or ``images``, the first that exists), else None."""
    if cfg.get("images") or cfg.get("data_root"):
        return layout.images_of(cfg)
    return None


def run_filter(candidates_dir, out_dir, cfg: dict, scorer: ClipScorer | None = None, progress: bool = True, *,
               rank: int | None = None, world_size: int | None = None, merge_output: bool = True) -> dict:
    """Filter every image of ``candidates_dir/records.jsonl`` into ``out_dir`` (resumable engine run).

    ``cfg`` keys: ``clip`` (see :func:`build_clip`), ``fallback``, ``nonpositive``, ``noun_prompt``, ``fill``,
    ``logit_scale``, ``head_noun``, ``precision`` (fp16 | fp32), ``box`` (exclusive | authors: the crop box,
    :data:`ris_utils.crops.BOX_MODES`), ``images`` (image folder; default :func:`images_dir_of`), ``seed``.
    Returns the engine's summary. Captions records with status ``error`` become error records.
    ``rank``, ``world_size``, ``merge_output`` are passed to :func:`ris_utils.engine.run` (one shard of the
    images, merged later with ``engine.merge``; see :func:`filter_jobs`). Default: one process, merged.
    """
    cfg = settings.complete("filter", cfg)
    candidates_dir, out_dir = Path(candidates_dir), Path(out_dir)
    if not layout.is_done(candidates_dir):
        raise missing_captions(candidates_dir)
    if scorer is None:
        check_clip_checkpoint(cfg)
    records = list(engine.read_records(candidates_dir))
    fallback, nonpositive = cfg["fallback"], cfg["nonpositive"]
    if fallback not in FALLBACKS:
        raise ValueError(f"filter.fallback must be one of {FALLBACKS}, got {fallback!r}")
    if nonpositive not in NONPOSITIVE:
        raise ValueError(f"filter.nonpositive must be one of {NONPOSITIVE}, got {nonpositive!r}")
    scorer = scorer or make_scorer(cfg)
    extractor = head_noun_extractor(cfg)
    images_dir = images_dir_of(cfg)
    items = [{"image_id": r["image_id"], "file_name": r.get("file_name"), "path": str(_image_path(r, images_dir)),
              "record": r} for r in records]

    def fn(item):
        rec = item["record"]
        if rec.get("status", "ok") != "ok":
            raise ValueError(f"captions step failed for this image: {rec.get('error')}")
        image = load_image_rgb(item["path"])
        return filter_record(rec, image, scorer, extractor, fallback, nonpositive, item["seed"])

    conf = {k: cfg.get(k) for k in ("clip", "fallback", "nonpositive", "noun_prompt", "fill", "logit_scale",
                                    "head_noun", "precision", "box")}
    conf["candidates"] = str(candidates_dir)
    keep = getattr(scorer, "keeping_image_features", contextlib.nullcontext)  # another mode / seed: same crops
    with torch_threads(cfg["threads"]), keep():
        summary = engine.run("filter", items, fn, out_dir, seed=int(cfg["seed"]), config=conf,
                             progress=progress, rank=rank, world_size=world_size, merge_output=merge_output)
    if merge_output and engine.dist_info()[0] == 0:
        save_config(cfg, out_dir)  # the resolved settings beside the records
    return summary


# --------------------------------------------------------------------------- analysis (notebook 03)


def sampling_kind(setting) -> str:
    """``"beam"``, ``"top_k"`` or ``"top_p"`` of a candidate's ``setting`` (``"top_k=5"`` -> ``"top_k"``)."""
    s = str(setting)
    return s.split("=", 1)[0] if "=" in s else s


def _subset(records: list[dict], which: str) -> list[dict]:
    out = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        masks = []
        for m in r.get("masks") or []:
            cands = m.get("candidates") or []
            if which == "keep":
                cands = [c for c in cands if c.get("keep")]
            elif which == "survivors":
                cands = [cands[i] for i in m.get("survivors") or []]
            masks.append({**m, "candidates": cands})
        out.append({**r, "masks": masks})
    return out


def distinct_rates(records: list[dict], scenes, min_iou: float = 0.5) -> dict:
    """Shapes-world distinct rates of filter records, before and after the filter.

    Uses the captions step's :func:`ris_utils.captioning.step.distinct_rate` (GT object by IoU >= 0.5, the
    symbolic referee), each mask and sentence judged once (``scenes``: ``shapes.load_scenes(data_root)`` or
    a :class:`ris_utils.data.shapes.DistinctJudge` over them, which keeps its verdicts for later calls). Returns ``{"before": rate over all candidates, "after": rate over candidates with
    keep (DoC > 1 / single-mask rule), "exported": rate over the survivors incl. fallbacks,
    "masks_with_survivor": share of masks with >= 1 kept candidate, "n_before", "n_after", "n_masks"}``.
    """
    recs = [r for r in records if r.get("status", "ok") == "ok"]
    judge = DistinctJudge.of(scenes, min_iou)
    before = distinct_rate(_subset(recs, "all"), judge, min_iou)
    after = distinct_rate(_subset(recs, "keep"), judge, min_iou)
    exported = distinct_rate(_subset(recs, "survivors"), judge, min_iou)
    masks = [m for r in recs for m in r.get("masks") or [] if m.get("candidates")]
    with_surv = sum(any(c.get("keep") for c in m["candidates"]) for m in masks)
    return {"before": before["rate"], "after": after["rate"], "exported": exported["rate"],
            "masks_with_survivor": with_surv / len(masks) if masks else float("nan"),
            "n_before": before["n_candidates"], "n_after": after["n_candidates"], "n_masks": len(masks)}


def candidate_frame(records: list[dict]):
    """One row per candidate of filter records (pandas DataFrame): ``image_id, mask, mask_index, text, view,
    setting, sampling, mode, noun, noun_score, caption_score, doc, keep, survivor, n_masks``."""
    import pandas as pd

    rows = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        for t, m in enumerate(r.get("masks") or []):
            surv = set(m.get("survivors") or [])
            for i, c in enumerate(m.get("candidates") or []):
                rows.append({"image_id": r["image_id"], "mask": t, "mask_index": m.get("mask_index"),
                             "text": c["text"], "view": c.get("view"), "setting": c.get("setting"),
                             "sampling": sampling_kind(c.get("setting")), "mode": c.get("mode"),
                             "noun": c.get("noun"), "noun_score": c["noun_scores"][t],
                             "caption_score": c["caption_scores"][t], "doc": c["doc"], "keep": c["keep"],
                             "survivor": i in surv, "n_masks": r.get("n_masks", len(r["masks"]))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- CLI


def cli_filter(argv: list[str] | None = None) -> int:
    """``python -m ris_utils filter --candidates DIR --out DIR --profile NAME [--param k=v ...]``."""
    ap = argparse.ArgumentParser(prog="python -m ris_utils filter", description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", required=True, help="captions step output folder (holds records.jsonl)")
    ap.add_argument("--out", required=True, help="output folder (records.jsonl, summary.json)")
    ap.add_argument("--profile", default="shapes", help="profile name or YAML path (default: shapes)")
    ap.add_argument("--images", default=None, help="image folder (default: <data_root>/images/train2014)")
    ap.add_argument("--param", action="append", default=[], help="override a filter setting, e.g. fallback=drop")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any image became an error record")
    args = ap.parse_args(argv)
    cfg = step_config(args.profile, "filter", images=args.images, **parse_params(args.param))
    if not layout.is_done(args.candidates):
        ap.error(f"--candidates {args.candidates}: no records.jsonl there (run the captions step first: notebook "
                 f"02_distinctive_captions.ipynb or `python -m ris_utils captions`)")
    summary = run_filter(args.candidates, args.out, cfg)
    print(f"filter: {summary.get('ok')} ok, {summary.get('failed')} failed -> {os.path.join(args.out, 'records.jsonl')}")
    if engine.strict_exit(args.strict, [summary]):
        return 1
    return 0 if summary.get("ok", 0) or not summary.get("n_items") else 1


cli = cli_filter

__all__ = ["degree_of_distinctiveness", "select_survivors", "apply_fallback", "ClipScorer", "build_clip",
           "make_scorer", "filter_record", "run_filter", "run_filter_jobs", "step_dirs",
           "distinct_rates", "candidate_frame", "sampling_kind", "cli_filter"]
