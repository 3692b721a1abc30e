"""Measured effects of the differences from the authors' code on the shapes world (docs/fidelity.md).

``python -m ris_utils.fidelity --profile shapes [--out FILE]`` (after notebooks 00-03 of the profile) measures,
on the val split of the profile's work dir, and writes one JSON file (default
``<work_dir>/fidelity/fidelity.json``):

- ``box``: the crop box (``captions.box`` / ``filter.box``): the distinct rates of notebook 03 (before /
  after the filter, caption seed = the profile's) with the authors' off-by-one crops (``box: authors``)
  against the project's tight box (``exclusive``), both modes. The ``authors`` run is written under
  ``<work_dir>/fidelity/box_authors`` (resumable).
- ``beam``: how often group beam search with the authors' transformers (< 4.31, ``hypotheses: shared``)
  gives another caption than with open_clip 3.3 + transformers >= 4.31 (``per_group``): on the profile's
  captioner over every val mask x view, and on a random-init tiny CoCa over random crops.
- ``precision``: an emulation on CPU of the authors' fp16 DoC: the filter records' fp32 CLIP logits rounded
  to fp16 and the ratio computed in fp16 (``degree_of_distinctiveness(..., dtype="float16")``), against the
  float64 ratio of the same logits: how many keep flags flip. (The real fp16 forward needs a GPU.)
- ``fallback``: masks that needed the no-survivor fallback and candidates it adds (the authors' ``all``)
  against ``keep_random`` / ``drop``.

Every number is deterministic given the profile (seeded).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from ris_utils import engine, layout, settings
from ris_utils.captioning import CocaDecoder, TokenIds
from ris_utils.captioning.decoding import beam_search
from ris_utils.captioning.step import image_path, run_captions, view_kinds
from ris_utils.captioning.tiny import random_coca
from ris_utils.captioning.train import load_captioner
from ris_utils.data import refer, shapes
from ris_utils.filtering import (
    degree_of_distinctiveness,
    distinct_rates,
    make_scorer,
    run_filter,
    select_survivors,
)
from ris_utils.images import load_image_rgb
from ris_utils.profiles import step_config

logger = logging.getLogger(__name__)


def _val_dirs(work_dir, mode: str, seed: int):
    return layout.step_dirs(work_dir, mode, "val", seed, seed)


def measure_box(ccfg: dict, fcfg: dict, modes=("naive", "distinctive"), progress: bool = False) -> dict:
    """Distinct rates (val, before / after the filter) with ``box: authors`` vs the profile's run."""
    work = Path(ccfg["work_dir"])
    seed = int(ccfg["seed"])
    scenes = shapes.load_scenes(fcfg["data_root"])
    fid = layout.fidelity_dir(work) / "box_authors"
    out = {}
    cap = load_captioner({**ccfg, "box": "authors"})
    scorer = make_scorer({**fcfg, "box": "authors"})
    for mode in modes:
        cdir, fdir = _val_dirs(work, mode, seed)
        if not layout.is_done(fdir):
            raise FileNotFoundError(f"{fdir / engine.RECORDS} not found: run notebooks 00-03 of the profile first")
        base = distinct_rates(list(engine.read_records(fdir)), scenes)
        acdir, afdir = layout.step_dirs(fid, mode, "val", seed, seed)
        run_captions({**ccfg, "box": "authors"}, "val", mode, cap, out_dir=acdir, masks_dir=layout.masks_dir(work, "val"),
                     progress=progress)
        run_filter(acdir, afdir, {**fcfg, "box": "authors"}, scorer=scorer, progress=progress)
        auth = distinct_rates(list(engine.read_records(afdir)), scenes)
        out[mode] = {"exclusive": {k: base[k] for k in ("before", "after", "masks_with_survivor")},
                     "authors": {k: auth[k] for k in ("before", "after", "masks_with_survivor")}}
    return out


def _beam_diff(decoder, ids, embs, nb: int, ng: int, seq_len: int, min_seq_len: int) -> tuple[int, int]:
    a = beam_search(decoder, ids, embs, num_beams=nb, num_beam_groups=ng, seq_len=seq_len, min_seq_len=min_seq_len)
    b = beam_search(decoder, ids, embs, num_beams=nb, num_beam_groups=ng, seq_len=seq_len, min_seq_len=min_seq_len,
                    hypotheses="shared")
    return sum(x != y for x, y in zip(a, b)), len(a)


def measure_beam(ccfg: dict, max_images: int = 60, n_random: int = 192) -> dict:
    """Share of beam captions that differ between ``hypotheses: shared`` and ``per_group``."""
    import torch


    beam = settings.group(settings.Beam, ccfg.get("beam"), "captions.beam")
    nb, ng = int(beam["num_beams"]), int(beam["num_beam_groups"])
    seq_len, min_seq_len = int(ccfg["seq_len"]), int(ccfg["min_seq_len"])
    cap = load_captioner(ccfg)
    dec = CocaDecoder(cap.model)
    ids = TokenIds.from_tokenizer(cap.tokenizer, cap.model)
    n_diff = n_all = 0
    recs = list(engine.read_records(layout.masks_dir(ccfg, "val"), only_ok=True))[:max_images]
    with torch.no_grad():
        for rec in recs:
            image = load_image_rgb(image_path(rec, ccfg))
            masks = [refer.decode_segmentation(p["segmentation"], rec["height"], rec["width"]).astype(bool)
                     for p in rec.get("proposals") or []]
            masks = [m for m in masks if m.any()]
            if not masks:
                continue
            views = cap.views(image, masks, view_kinds(ccfg), fill=ccfg["fill"])
            x = views.reshape(-1, *views.shape[2:])
            _, embs = dec.encode_images(x)
            d, n = _beam_diff(dec, ids, embs, nb, ng, seq_len, min_seq_len)
            n_diff, n_all = n_diff + d, n_all + n
        model, _ = random_coca("coca_fidelity_random", seed=0, vocab_size=40, width=32, layers=2, heads=4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_random, 3, 32, 32, generator=g)
        rdec = CocaDecoder(model)
        _, embs = rdec.encode_images(x)
        rd, rn = _beam_diff(rdec, TokenIds(sot=2, eot=3, pad=0, vocab_size=40), embs, nb, ng, 8, 2)
    return {"captioner": {"differ": n_diff, "captions": n_all, "share": n_diff / n_all if n_all else float("nan")},
            "random_tiny": {"differ": rd, "captions": rn, "share": rd / rn}}


def measure_precision(fcfg: dict, modes=("naive", "distinctive")) -> dict:
    """Keep flags that flip when the DoC is computed as the authors' fp16 CLIP would (emulated on CPU)."""
    seed = int(fcfg["seed"])
    out = {}
    for mode in modes:
        _, fdir = _val_dirs(fcfg["work_dir"], mode, seed)
        flips = total = 0
        for rec in engine.read_records(fdir, only_ok=True):
            K = len(rec["masks"])
            for t, m in enumerate(rec["masks"]):
                cands = m.get("candidates") or []
                if not cands or K < 2:
                    continue
                ns = np.array([c["noun_scores"] for c in cands], np.float32)
                cs = np.array([c["caption_scores"] for c in cands], np.float32)
                ref = select_survivors(degree_of_distinctiveness(ns, cs, t), K)
                half = select_survivors(degree_of_distinctiveness(ns.astype(np.float16), cs.astype(np.float16), t,
                                                                  dtype="float16"), K)
                flips += int((ref != half).sum())
                total += len(cands)
        out[mode] = {"flips": flips, "candidates": total, "share": flips / total if total else float("nan")}
    return out


def measure_fallback(fcfg: dict, modes=("naive", "distinctive")) -> dict:
    """Masks that needed the fallback and the sentences each fallback rule gives them (val, caption seed)."""
    seed = int(fcfg["seed"])
    out = {}
    for mode in modes:
        _, fdir = _val_dirs(fcfg["work_dir"], mode, seed)
        masks = [m for r in engine.read_records(fdir, only_ok=True) for m in r["masks"] if m.get("candidates")]
        fb = [m for m in masks if m.get("fallback")]
        out[mode] = {"masks": len(masks), "masks_fallback": len(fb),
                     "share": len(fb) / len(masks) if masks else float("nan"),
                     "sentences_all": sum(len(m["candidates"]) for m in fb), "sentences_keep_random": len(fb),
                     "sentences_drop": 0}
    return out


def run(profile: str = "shapes", out=None, what=("box", "beam", "precision", "fallback"), progress=False) -> dict:
    ccfg = step_config(profile, "captions")
    fcfg = step_config(profile, "filter")
    res = {"profile": profile}
    if "precision" in what:
        res["precision"] = measure_precision(fcfg)
    if "fallback" in what:
        res["fallback"] = measure_fallback(fcfg)
    if "beam" in what:
        res["beam"] = measure_beam(ccfg)
    if "box" in what:
        res["box"] = measure_box(ccfg, fcfg, progress=progress)
    out = Path(out) if out else layout.fidelity_dir(ccfg) / "fidelity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return res


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils.fidelity", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="shapes")
    ap.add_argument("--out", default=None, help="JSON file (default <work_dir>/fidelity/fidelity.json)")
    ap.add_argument("--what", default="box,beam,precision,fallback", help="comma-separated subset")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    unknown = set(what) - {"box", "beam", "precision", "fallback"}
    if unknown:
        ap.error(f"--what: unknown {sorted(unknown)}; use box, beam, precision, fallback")
    print(json.dumps(run(args.profile, args.out, what), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
