"""Step 3 output: the pseudo-supervision as a REFER-format dataset, its dataset card, and the
semi-supervised mix of human and pseudo refs.

``python -m ris_utils export --candidates DIR --out DIR [--dataset refcoco+ --split-by pseudo]``
reads filter records (``<work_dir>/filter/<mode>/<split>/records.jsonl``; or captions records with
``--unfiltered``, for the naive / distinctive ablation rows) and writes::

    <out>/<dataset>/refs(<split_by>).p     one ref per exported mask, split "train", every surviving caption
                                           a sentence (with --unfiltered: every candidate); a mask without
                                           survivors gets all its candidates (filter.fallback: all, the
                                           authors' loader); export.max_sentences_per_ref / export.order
                                           keep the first k survivors in generation or DoC order
    <out>/<dataset>/instances.json         images, one annotation per exported mask (segmentation [RLE]),
                                           categories = the head nouns (a mask's category: the most
                                           frequent noun among its sentences, ties -> the first seen)
    <out>/images/train2014/<file_name>     the images (symlinks by default; ``images: copy | none``), where
                                           the REFER toolkit looks when its images/mscoco/... folder is
                                           missing (LAVT / CRIS-style loaders: data_root=<out>)
    <out>/candidates.jsonl                 every candidate: image, mask, text, view, setting, mode, noun,
                                           target noun / caption score, DoC, keep, survivor, exported
    <out>/dataset_card.json / .md          counts: images, masks, expressions, survivors per mask, masks
                                           dropped and why, fallbacks, keep rate per sampling setting / view

The defaults (``dataset: refcoco+``, ``split_by: pseudo``) give ``<out>/refcoco+/refs(pseudo).p``: the
REFER toolkit only accepts the RefCOCO-family dataset names, so LAVT / CRIS-style code reads the export by
pointing its data root at ``<out>`` and its split_by at ``pseudo``. Ids: image ids are kept (the source
records' ``image_id`` when it is an int, else 1..N in record order), annotation / ref / sentence ids are
1..N in record order.

``python -m ris_utils mix --pseudo DIR --human REFER_DIR --fraction F --seed S --out DIR`` writes one
REFER-format training set: the human refs (split ``train``) of ``round_half_up(F x N)`` of the N images
with human train refs (sampled BY IMAGE with ``numpy.random.default_rng(S).permutation`` of the sorted
image ids; ``round_half_up(x) = floor(x + 0.5)``), plus the pseudo refs of every pseudo image NOT among
the sampled ones. Every ref keeps its origin in ``"source": "human" | "pseudo"``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ris_utils import engine, layout, settings
from ris_utils.data import refer, shapes
from ris_utils.fileio import StagedDir
from ris_utils.formats import parse_formats, write_formats
from ris_utils.layout import IMAGE_SUBDIR
from ris_utils.profiles import parse_params, save_config, step_config
from ris_utils.text import rule_head_noun

logger = logging.getLogger(__name__)

DEFAULT_DATASET = settings.Export.dataset     # <out>/refcoco+/refs(pseudo).p (module docstring)
DEFAULT_SPLIT_BY = settings.Export.split_by
IMAGE_MODES = ("link", "copy", "none")
#: what marks a folder as an export (or mix): only such a folder (or an empty / new one) is replaced by a re-export
EXPORT_MARKERS = ("dataset_card.json", "candidates.jsonl", "*/refs(*).p")
#: ``export.order``: the order of a ref's sentences (and which ``export.max_sentences_per_ref`` keeps)
ORDERS = ("generation", "doc")
_rule_noun = functools.lru_cache(maxsize=1 << 16)(rule_head_noun)  # a sentence repeats across masks and images
_encode_line = json.JSONEncoder(sort_keys=True).encode  # json.dumps(line, sort_keys=True), one encoder for all


def select_sentences(cands: list[dict], survivors, max_sentences: int | None = None,
                     order: str = "generation") -> list[int]:
    """The candidate indices a ref gets as sentences, from its mask's ``survivors``.

    ``max_sentences`` (``export.max_sentences_per_ref``): ``None`` = every survivor (the authors' main loader
    draws uniformly over all of them, ``my_utils/pseudo_datasets.py`` l. 650-655 at de5d124), else the first
    ``k``. ``order`` (``export.order``): ``"generation"`` keeps the candidates' order (view, then setting),
    ``"doc"`` sorts by DoC, highest first (stable: ties keep generation order). The authors' LMDB loader of
    their RefCOCO-mask experiments reads ``pseudo_captions[:2]`` (l. 141; the LMDB's order is not in their
    repository): ``max_sentences_per_ref: 2`` with ``order: doc`` is that rule with the order made explicit.
    """
    if order not in ORDERS:
        raise ValueError(f"export.order must be one of {ORDERS}, got {order!r}")
    if max_sentences is not None and (isinstance(max_sentences, bool) or not isinstance(max_sentences, int)
                                      or max_sentences < 1):
        raise ValueError(f"export.max_sentences_per_ref must be null or an int >= 1, got {max_sentences!r}")
    idx = [int(i) for i in survivors]
    if order == "doc":
        missing = [i for i in idx if cands[i].get("doc") is None]
        if missing:
            raise ValueError("export.order 'doc' needs filter records (a DoC per candidate); these are captions "
                             "records: use order 'generation'")
        idx = sorted(idx, key=lambda i: -float(cands[i]["doc"]))
    return idx if max_sentences is None else idx[:max_sentences]


def _read_records(candidates_dir) -> list[dict]:
    return list(engine.read_records(candidates_dir))


def _place_image(src: Path, dst: Path, mode: str, previous: Path | None = None) -> None:
    """Link / copy ``src`` to ``dst``; ``previous`` = the same file in the export being replaced (a copy made
    from the same source, same size and mtime, is hard-linked instead of copied again)."""
    if mode == "none" or dst.exists() or dst.is_symlink():
        return
    if not src.is_file():
        raise FileNotFoundError(f"image {src} not found: set export images to 'none' or pass --images DIR")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(os.path.abspath(src), dst)
        return
    if previous is not None and previous.is_file() and not previous.is_symlink():
        a, b = src.stat(), previous.stat()
        if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            try:
                os.link(previous, dst)
                return
            except OSError:
                pass
    shutil.copy2(src, dst)


def _summ(values) -> dict:
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
    return {"mean": round(float(v.mean()), 3), "median": float(np.median(v)), "min": int(v.min()),
            "max": int(v.max())}


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def export_dataset(candidates_dir, out_dir, dataset: str = DEFAULT_DATASET, split_by: str = DEFAULT_SPLIT_BY,
                   unfiltered: bool = False, images_dir=None, images: str = "link", dedupe: bool = False,
                   name: str | None = None, max_sentences_per_ref: int | None = None,
                   order: str = "generation") -> dict:
    """Write the REFER-format export of ``candidates_dir`` to ``out_dir`` (layout in the module docstring).

    Arguments:
      candidates_dir: folder with ``records.jsonl`` (filter records; captions records need ``unfiltered``).
      out_dir: the export's data root.
      dataset, split_by: ``<out>/<dataset>/refs(<split_by>).p``.
      unfiltered: every candidate becomes a sentence (ignore ``survivors``; the ablation rows).
      images_dir: where the source images are (for ``images`` link / copy); records' ``path`` wins.
      images: ``"link"`` | ``"copy"`` | ``"none"``.
      dedupe: write each distinct caption of a mask once (default: every candidate, duplicates included).
      name: a label stored in the card.
      max_sentences_per_ref, order: which survivors become sentences, in which order (:func:`select_sentences`;
        filtered exports only: ``unfiltered`` exports write every candidate in generation order).
    Returns:
      the dataset card (dict), also written to ``dataset_card.json`` / ``.md``.
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"export images must be one of {IMAGE_MODES}, got {images!r}")
    select_sentences([], [], max_sentences_per_ref, order)  # validate the settings before any work
    candidates_dir, out_dir = Path(candidates_dir), Path(out_dir)
    records = _read_records(candidates_dir)
    is_filter = any("survivors" in m for r in records for m in (r.get("masks") or []))
    if not is_filter and not unfiltered:
        raise ValueError(f"{candidates_dir}/records.jsonl holds captions records (no 'survivors'): run the filter "
                         f"step first, or export them with --unfiltered")
    # written into a temp sibling and swapped in whole at the end: a reader (or a re-export killed at any
    # moment) sees the old export or the new one, never a mix (leftovers are removed by the next export)
    stage = StagedDir(out_dir, marker=EXPORT_MARKERS)
    final_dir, out_dir = out_dir, stage.path
    ex = _Export(unfiltered, dedupe, max_sentences_per_ref, order)
    img_ids_int = all(isinstance(r["image_id"], int) for r in records)
    for ri, rec in enumerate(records):
        img_refs = ex.add_record(rec, rec["image_id"] if img_ids_int else ri + 1, img_ids_int)
        if img_refs and images != "none":
            src = Path(rec["path"]) if rec.get("path") else Path(images_dir or ".") / rec["file_name"]
            _place_image(src, layout.export_images(out_dir) / rec["file_name"], images,
                         layout.export_images(final_dir) / rec["file_name"])
    categories = [{"id": i, "name": n, "supercategory": "pseudo"} for n, i in ex.cat_ids.items()]
    refer.write_refer(out_dir, dataset, split_by, ex.refs, ex.images_out, ex.anns, categories)
    with open(out_dir / "candidates.jsonl", "w", encoding="utf-8") as f:
        for line in ex.cand_lines:
            f.write(_encode_line(line) + "\n")
    card = {"name": name or final_dir.name, "source": str(candidates_dir), "filtered": not unfiltered,
            "dataset": dataset, "split_by": split_by, "split": "train",
            "refs_file": str(refer.refs_path(out_dir, dataset, split_by).relative_to(out_dir)),
            "images_dir": IMAGE_SUBDIR if images != "none" else None, "images_mode": images, "dedupe": dedupe,
            "max_sentences_per_ref": None if unfiltered else max_sentences_per_ref,
            "order": "generation" if unfiltered else order, **ex.card_counts(categories)}
    (out_dir / "dataset_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "dataset_card.md").write_text(card_markdown(card))
    stage.commit()
    return card


class _Export:
    """What :func:`export_dataset` accumulates over the records: the refs (one per kept mask), the candidate
    lines (every candidate) and the card's counts."""

    def __init__(self, unfiltered: bool, dedupe: bool, max_sentences_per_ref, order: str):
        self.unfiltered, self.dedupe, self.max_sentences, self.order = unfiltered, dedupe, max_sentences_per_ref, order
        self.images_out, self.anns, self.refs, self.cand_lines = [], [], [], []
        self.cat_ids: dict[str, int] = {}
        self.drop_reasons: Counter = Counter()
        self.n_fallback = 0
        self.survivors_per_mask, self.sentences_per_ref = [], []
        self.setting_total, self.setting_kept, self.view_total, self.view_kept = (Counter(), Counter(), Counter(),
                                                                                  Counter())
        self.n_masks = self.n_images_ok = self.n_failed = self.n_cands = self.n_kept = 0
        self.ann_id = self.ref_id = self.sent_id = 1

    def add_record(self, rec: dict, image_id, img_ids_int: bool) -> int:
        """One image's masks; returns how many refs it got."""
        if rec.get("status", "ok") != "ok":
            self.n_failed += 1
            if rec.get("masks"):
                self.drop_reasons["image_error"] += len(rec["masks"])
            return 0
        self.n_images_ok += 1
        h, w = int(rec["height"]), int(rec["width"])
        img_refs = 0
        for t, m in enumerate(rec.get("masks") or []):  # t: the mask's column in noun_scores / caption_scores
            self.n_masks += 1
            cands = m.get("candidates") or []
            surv, all_surv, dropped = self._survivors(m, cands)
            self._candidate_lines(rec, t, m, cands, all_surv, surv, dropped)
            if dropped is not None:
                self.drop_reasons[dropped] += 1
                continue
            self.survivors_per_mask.append(len(all_surv))
            self._add_ref(rec, image_id, m, cands, surv, h, w)
            img_refs += 1
        self.images_out.append({"id": image_id, "file_name": rec.get("file_name"), "height": h, "width": w,
                                **({} if img_ids_int else {"original_id": rec["image_id"]})})
        return img_refs

    def _survivors(self, m: dict, cands: list) -> tuple[list, list, str | None]:
        """``(sentences, survivors, dropped reason or None)`` of one mask."""
        if self.unfiltered:
            surv = all_surv = list(range(len(cands)))
            dropped = None if cands else "no_candidates"
        else:
            all_surv = list(m.get("survivors") or [])
            surv = select_sentences(cands, all_surv, self.max_sentences, self.order)
            dropped = m.get("dropped") or (None if surv else "no_survivor")
        if m.get("fallback"):
            self.n_fallback += int(not self.unfiltered)
        return surv, all_surv, dropped

    def _candidate_lines(self, rec: dict, t: int, m: dict, cands: list, all_surv: list, surv: list, dropped) -> None:
        all_surv, exported = set(all_surv), set(surv) if dropped is None else set()
        for ci, c in enumerate(cands):
            self.n_cands += 1
            keep = bool(c.get("keep", False))
            self.n_kept += keep
            self.setting_total[c.get("setting")] += 1
            self.setting_kept[c.get("setting")] += keep
            self.view_total[c.get("view")] += 1
            self.view_kept[c.get("view")] += keep
            ns, cs = c.get("noun_scores"), c.get("caption_scores")
            self.cand_lines.append({
                "image_id": rec["image_id"], "file_name": rec.get("file_name"), "mask_index": m.get("mask_index", t),
                "candidate_index": ci, "text": c["text"], "view": c.get("view"), "setting": c.get("setting"),
                "mode": c.get("mode"), "noun": c.get("noun"),
                "noun_score": _finite(ns[t]) if ns is not None and t < len(ns) else None,
                "caption_score": _finite(cs[t]) if cs is not None and t < len(cs) else None,
                "doc": _finite(c.get("doc")), "keep": keep, "survivor": ci in all_surv,
                "exported": ci in exported,
            })

    def _add_ref(self, rec: dict, image_id, m: dict, cands: list, surv: list, h: int, w: int) -> None:
        texts = [cands[i]["text"] for i in surv]
        if self.dedupe:
            texts = list(dict.fromkeys(texts))
        nouns = [cands[i].get("noun") for i in surv if cands[i].get("noun")] or [_rule_noun(t) for t in texts]
        noun = (Counter(nouns).most_common(1)[0][0] if nouns else "object") or "object"
        cid = self.cat_ids.setdefault(noun, len(self.cat_ids) + 1)
        ann = refer.make_annotation(self.ann_id, image_id, cid, refer.decode_segmentation(m["segmentation"], h, w))
        self.anns.append(ann)
        sents = [refer.make_sentence(t, self.sent_id + k) for k, t in enumerate(texts)]
        self.sent_id += len(sents)
        ref = refer.make_ref(self.ref_id, ann, "train", sents, rec.get("file_name") or "")
        ref["mask_index"] = m.get("mask_index")
        self.refs.append(ref)
        self.sentences_per_ref.append(len(sents))
        self.ann_id += 1
        self.ref_id += 1

    def card_counts(self, categories: list[dict]) -> dict:
        """The card's counts, survivor / sentence statistics, keep rates and top categories."""
        cat_name = {i: n for n, i in self.cat_ids.items()}
        refs = self.refs

        def rates(kept, total):
            return {str(k): round(kept[k] / v, 4) for k, v in sorted(total.items(), key=lambda kv: str(kv[0]))}

        return {
            "counts": {
                "images": self.n_images_ok, "images_failed": self.n_failed,
                "images_with_refs": len({r["image_id"] for r in refs}),
                "masks": self.n_masks, "masks_exported": len(refs), "masks_dropped": int(sum(self.drop_reasons.values())),
                "masks_dropped_by_reason": dict(sorted(self.drop_reasons.items())), "masks_fallback": self.n_fallback,
                "candidates": self.n_cands, "candidates_kept_by_doc": self.n_kept,
                "expressions": int(sum(self.sentences_per_ref)),
                "unique_expressions": len({s["sent"] for r in refs for s in r["sentences"]}),
                "categories": len(categories),
            },
            "survivors_per_mask": _summ(self.survivors_per_mask),
            "sentences_per_ref": _summ(self.sentences_per_ref),
            "keep_rate_by_setting": rates(self.setting_kept, self.setting_total),
            "keep_rate_by_view": rates(self.view_kept, self.view_total),
            "top_categories": dict(Counter(cat_name[r["category_id"]] for r in refs).most_common(20)),
        }


def training_distinct_rate(records: list[dict], scenes, max_sentences_per_ref: int | None = None,
                           order: str = "generation", unfiltered: bool = False, min_iou: float = 0.5) -> dict:
    """Shapes world: distinct rate of the sentences a training set trains on, without writing it.

    A CRIS-style loader visits every ref once per epoch and draws ONE of its sentences uniformly (the
    authors' doc_mode loader, ``my_utils/pseudo_datasets.py`` l. 650-660; ``ris_utils.ris.dataset``), so the
    expected share of distinct training samples is the mean over exported refs of the share of distinct
    sentences in the ref. A sentence is distinct when ``shapes.referee(sentence) == {the GT object}`` of the
    ref's mask (IoU >= ``min_iou``; refs of unmatched masks count as not distinct).

    Arguments:
      records: filter records (or captions records with ``unfiltered``: every candidate a sentence).
      scenes: ``shapes.load_scenes(data_root)``, or a :class:`ris_utils.data.shapes.DistinctJudge` over them
        (its verdicts are kept across calls: several export rules / training sets of one split).
      max_sentences_per_ref, order: as :func:`select_sentences`.
    Returns:
      ``{"per_sample": mean over refs of the distinct share, "per_sentence": distinct / sentences,
      "refs": n, "sentences": n, "sentences_per_ref": mean}``.
    """
    judge = shapes.DistinctJudge.of(scenes, min_iou)
    per_ref, n_sent, n_dist = [], 0, 0
    for rec in records:
        if rec.get("status", "ok") != "ok":
            continue
        judge.scene(rec["image_id"], "training_distinct_rate")
        for m in rec.get("masks") or []:
            cands = m.get("candidates") or []
            if unfiltered:
                idx = list(range(len(cands)))
            else:
                if m.get("dropped"):
                    continue
                idx = select_sentences(cands, m.get("survivors") or [], max_sentences_per_ref, order)
            if not idx:
                continue
            obj, _ = judge.mask_object(rec, m)
            d = [judge.is_distinct(rec["image_id"], cands[i]["text"], obj) for i in idx]
            per_ref.append(sum(d) / len(d))
            n_sent += len(d)
            n_dist += sum(d)
    nan = float("nan")
    return {"per_sample": float(np.mean(per_ref)) if per_ref else nan,
            "per_sentence": n_dist / n_sent if n_sent else nan, "refs": len(per_ref), "sentences": n_sent,
            "sentences_per_ref": n_sent / len(per_ref) if per_ref else nan}


def card_markdown(card: dict) -> str:
    """The dataset card as Markdown."""
    c = card["counts"]
    lines = [f"# Pseudo-RIS export: {card['name']}", "",
             f"- source: `{card['source']}` ({'filtered by DoC' if card['filtered'] else 'unfiltered candidates'})",
             f"- REFER file: `{card['refs_file']}` (dataset `{card['dataset']}`, split_by `{card['split_by']}`, "
             f"split `{card['split']}`)",
             f"- images: `{card['images_dir']}` ({card['images_mode']})", "", "| count | value |", "|---|---|"]
    for k, v in c.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items()) or "-"
        lines.append(f"| {k} | {v} |")
    lines += ["", "| per mask | mean | median | min | max |", "|---|---|---|---|---|"]
    for key in ("survivors_per_mask", "sentences_per_ref"):
        s = card[key]
        lines.append(f"| {key} | {s['mean']} | {s['median']} | {s['min']} | {s['max']} |")
    lines += ["", "Keep rate (DoC > 1) by sampling setting: "
              + ", ".join(f"{k} {v}" for k, v in card["keep_rate_by_setting"].items()),
              "", "Keep rate by view: " + ", ".join(f"{k} {v}" for k, v in card["keep_rate_by_view"].items()),
              "", "Top categories (head nouns): "
              + ", ".join(f"{k} ({v})" for k, v in (card.get("top_categories") or {}).items()), ""]
    return "\n".join(lines)


def load_export(out_dir, card: dict | None = None) -> refer.ReferData:
    """Load an export with :func:`ris_utils.data.refer.load_refer` (dataset / split_by from its card)."""
    out_dir = Path(out_dir)
    card = card or json.loads((out_dir / "dataset_card.json").read_text())
    return refer.load_refer(out_dir, card["dataset"], card["split_by"])


def trainset_sources(export_cfg: dict, split: str = "train", seed: int | None = None,
                     base_seed: int | None = None) -> dict:
    """``{name: (source folder, filtered)}`` of ``export.trainsets``: ``<work_dir>/filter/<mode>/<split>`` for a
    filtered set, ``<work_dir>/captions/<mode>/<split>`` for the others."""
    sets = export_cfg.get("trainsets") or {}
    if not sets:
        raise ValueError("export.trainsets is empty: name at least one {name: {mode, filtered}}")
    out = {}
    for name, spec in sets.items():
        cdir, fdir = layout.step_dirs(export_cfg, spec.get("mode"), split, 0, 0)
        out[name] = (fdir if spec.get("filtered") else cdir, bool(spec.get("filtered")))
    return out


def write_trainsets(export_cfg: dict, images_dir=None, split: str = "train", workers: int | None = 1) -> dict:
    """Write the training sets of ``export.trainsets`` to ``<work_dir>/export/<name>`` (REFER, split train) from
    their finished filter / captions folders (:func:`trainset_sources`; a missing one fails naming the step to
    run first; :func:`ris_utils.pipeline.build_trainsets` runs them). Returns ``{name: dataset card}``.
    ``workers`` > 1: that many spawned processes write the sets at once (the same files as one by one)."""
    cfg = settings.complete("export", export_cfg)
    sources = trainset_sources(cfg, split)
    for name, (src, filtered) in sources.items():
        if not layout.is_done(src):
            step = "filter (notebook 03_distinctiveness_filtering.ipynb or `python -m ris_utils filter`)" if filtered \
                else "captions (notebook 02_distinctive_captions.ipynb or `python -m ris_utils captions`)"
            raise FileNotFoundError(f"export.trainsets.{name}: {src / engine.RECORDS} not found: run the {step} "
                                    f"first, or ris_utils.pipeline.build_trainsets")
    n = min(engine.check_workers(workers, "export workers"), len(sources))
    if n <= 1:
        return {name: _write_trainset(cfg, name, src, filtered, images_dir)
                for name, (src, filtered) in sources.items()}
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=engine.watch_parent,
                             initargs=(os.getpid(),)) as pool:
        biggest_first = sorted(sources, key=lambda k: -(sources[k][0] / engine.RECORDS).stat().st_size)
        futures = {name: pool.submit(_write_trainset, cfg, name, *sources[name], images_dir) for name in biggest_first}
        return {name: futures[name].result() for name in sources}


def _write_trainset(cfg: dict, name: str, src: Path, filtered: bool, images_dir) -> dict:
    """One set of :func:`write_trainsets` (its export and the resolved settings beside it); returns its card."""
    out = layout.export_dir(cfg, name)
    card = export_dataset(src, out, dataset=cfg["dataset"], split_by=cfg["split_by"], unfiltered=not filtered,
                          images_dir=images_dir, images=cfg["image_mode"], dedupe=bool(cfg["dedupe"]), name=name,
                          max_sentences_per_ref=cfg["max_sentences_per_ref"], order=cfg["order"])
    save_config(cfg, out)  # the resolved settings beside the export
    return card


# --------------------------------------------------------------------------- semi-supervised mix


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the number of human images of a mix (0.5 rounds up, unlike Python's round)."""
    return int(math.floor(x + 0.5))


def sample_images(image_ids, fraction: float, seed: int) -> list:
    """``round_half_up(fraction x N)`` of the N distinct ``image_ids``, seeded; returned sorted."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"--fraction must be in [0, 1], got {fraction}")
    ids = sorted(set(image_ids))
    k = round_half_up(float(fraction) * len(ids))
    perm = np.random.default_rng(int(seed)).permutation(len(ids))
    return sorted(ids[i] for i in perm[:k])


def mix_datasets(pseudo: refer.ReferData, human: refer.ReferData, fraction: float, seed: int, out_dir,
                 dataset: str = DEFAULT_DATASET, split_by: str = "mix", images: str = "link") -> dict:
    """Write the semi-supervised training set (module docstring) to ``out_dir``; return its card."""
    stage = StagedDir(out_dir, marker=EXPORT_MARKERS)  # swapped in whole at the end (as export_dataset)
    final_dir, out_dir = Path(out_dir), stage.path
    human_train = refer.select_split(human.refs, "train")
    if not human_train:
        raise ValueError(f"the human dataset {human.data_root}/{human.dataset} has no train refs")
    chosen = set(sample_images([r["image_id"] for r in human_train], fraction, seed))
    n_human_images = len({r["image_id"] for r in human_train})
    sel = [("human", human, r) for r in human_train if r["image_id"] in chosen]
    sel += [("pseudo", pseudo, r) for r in refer.select_split(pseudo.refs, "train") if r["image_id"] not in chosen]
    cats: dict[str, int] = {}
    images_out: dict[int, dict] = {}
    anns, refs = [], []
    sent_id = 1
    img_src: dict[int, Path] = {}
    for i, (source, data, r) in enumerate(sel, start=1):
        ann = dict(data.anns[r["ann_id"]])
        name = data.cats.get(ann["category_id"], "object")
        cid = cats.setdefault(name, len(cats) + 1)
        ann.update(id=i, category_id=cid)
        anns.append(ann)
        sents = [{**s, "sent_id": sent_id + k} for k, s in enumerate(r["sentences"])]
        sent_id += len(sents)
        ref = {**r, "ref_id": i, "ann_id": i, "category_id": cid, "split": "train", "sentences": sents,
               "sent_ids": [s["sent_id"] for s in sents], "source": source}
        refs.append(ref)
        im = data.imgs[r["image_id"]]
        images_out.setdefault(r["image_id"], {k: im[k] for k in ("id", "file_name", "height", "width")})
        if images != "none" and r["image_id"] not in img_src:
            try:
                img_src[r["image_id"]] = data.image_path(r["image_id"])
            except FileNotFoundError as e:
                raise FileNotFoundError(f"mix: {e}; use images='none'") from e
    categories = [{"id": i, "name": n} for n, i in cats.items()]
    refer.write_refer(out_dir, dataset, split_by, refs, sorted(images_out.values(), key=lambda x: x["id"]), anns,
                      categories)
    for iid, src in img_src.items():
        _place_image(src, out_dir / IMAGE_SUBDIR / images_out[iid]["file_name"], images,
                     final_dir / IMAGE_SUBDIR / images_out[iid]["file_name"])
    n_h = sum(1 for s, _, _ in sel if s == "human")
    card = {"name": final_dir.name, "dataset": dataset, "split_by": split_by, "split": "train", "fraction": fraction,
            "seed": seed, "rounding": "floor(fraction * N + 0.5)",
            "human_source": f"{human.data_root}/{human.dataset} refs({human.split_by})",
            "pseudo_source": f"{pseudo.data_root}/{pseudo.dataset} refs({pseudo.split_by})",
            "counts": {"human_train_images": n_human_images, "human_images": len(chosen),
                       "human_refs": n_h, "pseudo_refs": len(refs) - n_h,
                       "pseudo_images": len({r["image_id"] for s, _, r in sel if s == "pseudo"}),
                       "images": len(images_out), "refs": len(refs),
                       "expressions": sum(len(r["sentences"]) for r in refs)},
            "human_image_ids": sorted(chosen)}
    (out_dir / "dataset_card.json").write_text(json.dumps(card, indent=2) + "\n")
    stage.commit()
    return card


# --------------------------------------------------------------------------- CLI


def cli_export(argv: list[str] | None = None) -> int:
    """``python -m ris_utils export --candidates DIR --out DIR [--dataset NAME --split-by NAME]``."""
    ap = argparse.ArgumentParser(prog="python -m ris_utils export", description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", required=True, help="filter (or captions, with --unfiltered) output folder")
    ap.add_argument("--out", required=True, help="export data root")
    ap.add_argument("--profile", default="shapes")
    ap.add_argument("--dataset", default=None, help=f"REFER dataset name (default: profile, {DEFAULT_DATASET})")
    ap.add_argument("--split-by", default=None, help=f"REFER split_by (default: profile, {DEFAULT_SPLIT_BY})")
    ap.add_argument("--unfiltered", action="store_true", help="every candidate a sentence (ablation rows)")
    ap.add_argument("--images", default=None, help="source image folder (default: <data_root>/images/train2014)")
    ap.add_argument("--image-mode", default=None, choices=IMAGE_MODES, help="link (default) | copy | none")
    ap.add_argument("--format", default="refer",
                    help="comma-separated: refer,cris,hf (cris -> <out>/cris, hf -> <out>/hf; ris_utils.formats)")
    ap.add_argument("--param", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        formats = parse_formats(args.format)
    except ValueError as e:
        ap.error(str(e))
    cfg = step_config(args.profile, "export", **parse_params(args.param))
    if not layout.is_done(args.candidates):
        ap.error(f"--candidates {args.candidates}: no records.jsonl there (run the filter step first: notebook "
                 f"03_distinctiveness_filtering.ipynb or `python -m ris_utils filter`)")
    images_dir = args.images or (layout.images_of(cfg) if cfg["images"] or cfg["data_root"] else None)
    card = export_dataset(args.candidates, args.out, dataset=args.dataset or cfg["dataset"],
                          split_by=args.split_by or cfg["split_by"], unfiltered=args.unfiltered,
                          images_dir=images_dir, images=args.image_mode or cfg["image_mode"], dedupe=bool(cfg["dedupe"]),
                          max_sentences_per_ref=None if args.unfiltered else cfg["max_sentences_per_ref"],
                          order="generation" if args.unfiltered else cfg["order"])
    save_config(cfg, args.out)  # the resolved settings beside the export
    print(json.dumps(card["counts"], indent=2))
    for fmt, info in write_formats(args.out, [f for f in formats if f != "refer"]).items():
        print(f"{fmt}: {info['dir']}")
    return 0


def cli_mix(argv: list[str] | None = None) -> int:
    """``python -m ris_utils mix --pseudo DIR --human REFER_DIR --fraction 0.1 --seed S --out DIR``.

    Defaults of ``--human-dataset`` / ``--human-split-by`` / ``--fraction`` / ``--seed`` come from the profile's
    ``export.mix`` section (shapes: ``shapes+`` / ``shapes``; paper: ``refcoco+`` / ``unc``).
    """
    ap = argparse.ArgumentParser(prog="python -m ris_utils mix", description="semi-supervised mix (human + pseudo)")
    ap.add_argument("--pseudo", required=True, help="an export folder (holds dataset_card.json)")
    ap.add_argument("--human", required=True, help="REFER data root of the human annotations")
    ap.add_argument("--profile", default="shapes", help="profile whose export.mix gives the defaults")
    ap.add_argument("--human-dataset", default=None, help="dataset under --human (default: export.mix.human_dataset)")
    ap.add_argument("--human-split-by", default=None, help="split_by of the human refs (default: export.mix)")
    ap.add_argument("--fraction", type=float, default=None, help="share of the human train images, 0..1")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dataset", default=None, help="dataset name of the output (default: export.dataset)")
    ap.add_argument("--split-by", default="mix", help="split_by of the output (default mix)")
    ap.add_argument("--image-mode", default="link", choices=IMAGE_MODES)
    args = ap.parse_args(argv)
    cfg = step_config(args.profile, "export")
    mcfg = settings.group(settings.Mix, cfg.get("mix"), "export.mix")
    fraction = args.fraction if args.fraction is not None else mcfg.get("fraction")
    if fraction is None or not 0.0 <= float(fraction) <= 1.0:
        ap.error(f"--fraction must be in [0, 1] (or set export.mix.fraction), got {fraction}")
    seed = args.seed if args.seed is not None else int(mcfg["seed"])
    card_p = Path(args.pseudo) / "dataset_card.json"
    if not card_p.is_file():
        ap.error(f"--pseudo {args.pseudo}: no dataset_card.json there (run `python -m ris_utils export` first)")
    pseudo = load_export(args.pseudo)
    human = refer.load_refer(args.human, args.human_dataset or mcfg["human_dataset"],
                             args.human_split_by or mcfg["human_split_by"])
    card = mix_datasets(pseudo, human, float(fraction), seed, args.out, args.dataset or cfg["dataset"], args.split_by,
                        args.image_mode)
    print(json.dumps(card["counts"], indent=2))
    return 0


cli = cli_export

__all__ = ["export_dataset", "select_sentences", "training_distinct_rate", "ORDERS", "write_trainsets", "trainset_sources", "load_export", "card_markdown", "round_half_up", "sample_images", "mix_datasets",
           "cli_export", "cli_mix"]
