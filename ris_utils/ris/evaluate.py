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

import numpy as np
import torch
from torch import nn

from ris_utils.fileio import atomic_write
from ris_utils.metrics import RisEvaluator
from ris_utils.models import resolve_device
from ris_utils.ris.build import build_tokenizer, defaults, make_model
from ris_utils.ris.checkpoint import load_model_state, load_ris_checkpoint
from ris_utils.ris.dataset import RisEvalSet, collate, open_refer, unletterbox_batch
from ris_utils.ris.diagnostics import pick_by_attribute
from ris_utils.ris.features import feature_stores

logger = logging.getLogger(__name__)

__all__ = ["evaluate_model", "load_checkpoint", "evaluate_checkpoint", "cli"]


@torch.no_grad()
def _forward_shared_images(model: nn.Module, batch: dict, data: RisEvalSet, device, stores=(None, None)
                           ) -> torch.Tensor:
    """Logits of an evaluation batch, encoding each distinct image of the batch once (consecutive sentences
    mostly share images: ~10 per image on the shapes world) when the model can take precomputed image
    features (:meth:`CRIS.encode_image`); the same logits as ``model(img, tokens)`` up to float noise.
    ``stores`` = :func:`ris_utils.ris.features.feature_stores` of a model with frozen towers."""
    tokens = batch["tokens"].to(device)
    img_store, txt_store = stores or (None, None)
    img = batch["img"].to(device) if img_store is None else None  # a frozen tower's features replace it
    if not hasattr(model, "encode_image"):
        return model(img, tokens)
    text = txt_store.batch(tokens) if txt_store else None
    refs = batch["ref_index"].tolist()
    keys = data.image_keys(refs) if img_store is not None else [data.refs[i]["image_id"] for i in refs]
    first: dict = {}
    inverse = torch.tensor([first.setdefault(k, len(first)) for k in keys], device=tokens.device)
    rows = [keys.index(k) for k in first]
    if img_store is not None:
        feats = img_store.batch(list(first), load=lambda r: data.image_tensor(refs[rows[r]]))
    elif len(first) == len(keys):
        return model(img, tokens, text=text)
    else:
        feats = model.encode_image(img[rows])
    return model(None, tokens, feats=feats, text=text, image_index=inverse)


def _at_original_size(prob: torch.Tensor, refs: list[int], data: RisEvalSet) -> list[torch.Tensor]:
    """(B, h, w) probabilities of a batch -> B (H, W) maps at their images' original sizes (:func:`unletterbox`;
    the sentences of images with one geometry, all of them on the shapes world, in one call)."""
    groups: dict = {}
    for n, i in enumerate(refs):
        groups.setdefault(data.geometry(i), []).append(n)
    out: list = [None] * len(refs)
    for lb, rows in groups.items():
        for n, full in zip(rows, unletterbox_batch(prob[rows], lb)):
            out[n] = full
    return out


def evaluate_model(model: nn.Module, data: RisEvalSet, cfg: dict, device, convention: str | None = None,
                   keep_predictions: int = 0, stores=None) -> dict:
    """mIoU / oIoU / Pr@X of ``model`` on every (ref, sentence) of ``data``, scored at the ORIGINAL image
    size: sigmoid -> :func:`unletterbox` -> ``> threshold`` (CRIS). ``keep_predictions`` > 0 also returns
    the first that many ``(ref_index, sent_index, HxW bool prediction)`` under ``"predictions"``.

    (ours, a diagnostic) ``pick_acc``: over sentences whose image has >= 2 annotated objects (``pick_n``), the
    share where the referred object gets the highest mean probability among the image's objects -- whether the
    model picks the right object at all, independent of the threshold and of mask quality (chance = 1 / the
    number of objects). A model that segments objects but cannot yet ground the words scores low mIoU AND a
    pick accuracy near chance; one that grounds but draws coarse masks scores high pick accuracy."""
    convention = convention or cfg["convention"]
    was_training = model.training
    model.eval()
    ev = RisEvaluator(convention=convention)
    kept, ious = [], []
    loader = torch.utils.data.DataLoader(data, batch_size=cfg["eval_batch_size"], shuffle=False,
                                         collate_fn=collate, num_workers=0)
    thr = float(cfg["threshold"])
    picks, chance, pick_records = [], [], []
    had_images = data.with_images
    data.with_images = not (stores and stores[0] is not None)  # cached image features: no image per sentence
    for batch in loader:
        prob = torch.sigmoid(_forward_shared_images(model, batch, data, device, stores))[:, 0].float().cpu()
        refs, sents = batch["ref_index"].tolist(), batch["sent_index"].tolist()
        for full, i, j in zip(_at_original_size(prob, refs, data), refs, sents):  # (H, W) probabilities
            gt = data.gt_mask(i)
            pred = (full > thr).numpy()
            iou = ev.update(full.numpy() if convention == "cris" else pred, gt)
            ious.append(float(iou[0]))
            objs = data.object_pixels(i)
            if len(objs) >= 2:
                fnp = full.numpy().ravel()
                best = max(objs, key=lambda o: float(fnp[o[1]].mean()) if o[1].size else -1.0)[0]
                picks.append(best == data.refs[i]["ann_id"])
                chance.append(1.0 / len(objs))
                sent = data.refs[i]["sentences"][j]
                pick_records.append((sent.get("sent") or sent.get("raw") or "", picks[-1]))
            if len(kept) < keep_predictions:
                kept.append((i, j, pred))
    model.train(was_training)
    data.with_images = had_images
    out = ev.compute()
    out["pick_acc"] = float(np.mean(picks)) if picks else None
    out["pick_chance"] = float(np.mean(chance)) if chance else None
    out["pick_n"] = len(picks)
    out.update(pick_by_attribute(pick_records))  # pick_acc_<color|shape|size|pattern|location>
    if keep_predictions:
        out["predictions"] = kept
        out["ious"] = ious
    return out


def load_checkpoint(path, device="cpu"):
    """``(model in eval mode, tokenizer, config)`` from a training checkpoint (``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (train writes <out>/last.pt)")
    ckpt = load_ris_checkpoint(path)  # weights_only=True: a crafted file cannot run code
    cfg = {**defaults(), **ckpt["config"]}
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
    dev = resolve_device(device)
    model, tok, cfg = loaded or load_checkpoint(checkpoint, dev)
    cfg = {**cfg, **{k: v for k, v in overrides.items() if v is not None}}
    refer = open_refer(data, dataset, split_by)
    fallback = [cfg["data_root"]] if cfg.get("data_root") else []
    ds = RisEvalSet(refer, split, tok, cfg["input_size"], cfg["word_len"], cache=cfg["cache"],
                    image_fallback_roots=fallback)
    if max_refs is not None:
        ds.refs = ds.refs[:int(max_refs)]
        ds.pairs = [p for p in ds.pairs if p[0] < len(ds.refs)]
    convention = convention or cfg["convention"]
    if stores is None:  # frozen towers: features once per image, in memory (the training run's disk cache
        # folder may be another machine's path: a caller that wants it passes ``stores``)
        stores = feature_stores(model, {**cfg, "feature_cache": overrides.get("feature_cache")}, dev)
    scores = evaluate_model(model, ds, cfg, dev, convention=convention, keep_predictions=keep_predictions,
                            stores=stores)
    scores.update({"checkpoint": str(checkpoint), "data": str(refer.data_root), "dataset": refer.dataset,
                   "split_by": refer.split_by, "split": split, "convention": convention,
                   "threshold": float(cfg["threshold"]), "n_refs": len(ds.refs)})
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
