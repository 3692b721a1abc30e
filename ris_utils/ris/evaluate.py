"""Evaluate a RIS checkpoint on a REFER split: every sentence of every ref, mIoU / oIoU / Pr@X.

    python -m ris_utils evaluate --checkpoint RUN/last.pt --data data/shapes --dataset shapes --split val
        [--split-by shapes] [--convention lavt|cris] [--out scores.json]

Predictions are warped back to the original image size (crop the letterbox padding, resize to HxW) and
binarised at ``sigmoid > threshold`` (CRIS: 0.35) before scoring with :mod:`ris_utils.metrics`; the default
convention is LAVT's (IoU of an empty union = 0, Pr@X with ``>=``), ``--convention cris`` gives CRIS's.
Several splits may be given (``--split val,testA,testB``): one JSON per split
(``<out_dir>/<dataset>.<split>.json``) or the single file ``--out`` for one split.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ris_utils.fileio import atomic_write
from ris_utils.ris.dataset import RisEvalSet, open_refer
from ris_utils.ris.features import feature_stores
from ris_utils.ris.train import (
    DEFAULTS,
    build_tokenizer,
    evaluate_model,
    load_model_state,
    load_ris_checkpoint,
    make_model,
)

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "evaluate_checkpoint", "cli"]


def load_checkpoint(path, device="cpu"):
    """``(model in eval mode, tokenizer, config)`` from a training checkpoint (``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (train writes <out>/last.pt)")
    ckpt = load_ris_checkpoint(path)  # weights_only=True: a crafted file cannot run code
    cfg = {**DEFAULTS, **ckpt["config"]}
    tok = build_tokenizer({**cfg, "tokenizer": ckpt["tokenizer"]})
    model = make_model(cfg, tok)
    load_model_state(model, ckpt, path)
    return model.to(device).eval(), tok, cfg


def evaluate_checkpoint(checkpoint, data, split: str = "val", dataset: str | None = None,
                        split_by: str | None = None, convention: str | None = None, device="auto",
                        loaded=None, keep_predictions: int = 0, max_refs: int | None = None, stores=None,
                        **overrides) -> dict:
    """Scores of one checkpoint on one split (``{"mIoU", "oIoU", "Pr@0.5", ..., "n"}`` + provenance).

    ``loaded`` = a ``load_checkpoint`` result to reuse across splits; ``max_refs`` = score only the first that
    many refs of the split (a quick look, e.g. the predictions a notebook shows; the scores then describe
    those refs only, ``n_refs`` says how many); ``overrides`` (e.g. ``threshold``, ``eval_batch_size``)
    replace the checkpoint's settings.
    """
    from ris_utils.models import resolve_device

    dev = resolve_device(device)
    model, tok, cfg = loaded or load_checkpoint(checkpoint, dev)
    cfg = {**cfg, **{k: v for k, v in overrides.items() if v is not None}}
    refer = open_refer(data, dataset, split_by)
    fallback = [cfg["data_root"]] if cfg.get("data_root") else []
    ds = RisEvalSet(refer, split, tok, cfg["input_size"], cfg["word_len"], cache=cfg.get("cache", True),
                    image_fallback_roots=fallback)
    if max_refs is not None:
        ds.refs = ds.refs[:int(max_refs)]
        ds.pairs = [p for p in ds.pairs if p[0] < len(ds.refs)]
    convention = convention or cfg.get("convention", "lavt")
    if stores is None:  # frozen towers: features once per image, in memory (the training run's disk cache
        # folder may be another machine's path: a caller that wants it passes ``stores``)
        stores = feature_stores(model, {**cfg, "feature_cache": overrides.get("feature_cache")}, dev)
    scores = evaluate_model(model, ds, cfg, dev, convention=convention, keep_predictions=keep_predictions,
                            stores=stores)
    scores.update({"checkpoint": str(checkpoint), "data": str(refer.data_root), "dataset": refer.dataset,
                   "split_by": refer.split_by, "split": split, "convention": convention,
                   "threshold": float(cfg.get("threshold", 0.35)), "n_refs": len(ds.refs)})
    return scores


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="last.pt of a training run (or its folder)")
    ap.add_argument("--data", required=True, help="REFER data root (or dataset folder)")
    ap.add_argument("--dataset", default=None, help="dataset inside --data (e.g. shapes, shapes+, refcoco)")
    ap.add_argument("--split-by", default=None, help="refs(<split_by>).p when several exist (e.g. unc, shapes)")
    ap.add_argument("--split", default="val", help="split(s), comma-separated: val,testA,testB")
    ap.add_argument("--convention", choices=["lavt", "cris"], default=None, help="metric convention (default lavt)")
    ap.add_argument("--threshold", type=float, default=None, help="sigmoid threshold (default: checkpoint's, 0.35)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="JSON file (one split) or folder (several splits)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ris_utils").setLevel(logging.INFO)  # open_clip logs its model building on the root logger
    from ris_utils.models import resolve_device

    loaded = load_checkpoint(args.checkpoint, resolve_device(args.device))
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for split in splits:
        scores = evaluate_checkpoint(args.checkpoint, args.data, split, args.dataset, args.split_by,
                                     args.convention, args.device, loaded=loaded, threshold=args.threshold)
        text = json.dumps(scores, indent=1)
        print(text)
        if args.out:
            out = Path(args.out)
            if len(splits) > 1 or out.suffix != ".json":
                out = out / f"{scores['dataset']}.{split}.json"
            atomic_write(out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
