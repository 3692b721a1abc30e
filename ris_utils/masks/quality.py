"""Measuring step 1's proposals against ground-truth objects (notebook 01's recall and best IoU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import shapes
from ..data.refer import encode_mask, load_refer
from .proposals import iou_matrix, str_rle


def gt_masks(cfg: dict, split: str) -> dict:
    """Ground-truth object masks of the images of ``split``: ``{image_id: [rle, ...]}``.

    The shapes world (``<data_root>/scenes.json`` present): every object of every image
    (:func:`ris_utils.data.shapes.object_masks`). Other worlds (no per-object ground truth): the masks of
    the REFER refs of that split (one per referred annotation).
    """
    data_root = Path(cfg["data_root"])
    ref = load_refer(data_root, cfg["dataset"], cfg["split_by"])
    ids = [it["image_id"] for it in ref.image_items(split)]
    out: dict = {}
    if (data_root / "scenes.json").is_file():
        for i in ids:
            out[i] = [str_rle(encode_mask(m)) for m in shapes.object_masks(data_root, i).values()]
        return out
    for r in ref.refs:
        if r["image_id"] in set(ids) and r["split"] == split:
            rles = out.setdefault(r["image_id"], [])
            rle = str_rle(encode_mask(ref.get_mask(r)))
            if rle not in rles:
                rles.append(rle)
    return out


def proposal_quality(records, gt: dict, *, iou_threshold: float = 0.5) -> dict:
    """How well the proposals cover the ground-truth objects.

    For every ground-truth mask g of an image: best IoU = max over the image's proposals p of
    |p & g| / |p | g| (0 without proposals or when the image failed).

    Arguments:
      records: engine records of the masks step (``{"image_id", "status", "proposals"}``).
      gt: ``{image_id: [rle, ...]}`` (:func:`gt_masks`).

    Returns:
      dict: ``recall_at_0.5`` (share of ground-truth masks with best IoU >= ``iou_threshold``),
      ``mean_best_iou``, ``n_gt``, ``n_images``, ``proposals_per_image`` (over ok records),
      ``best_ious`` (list, for plots).
    """
    by_id = {r["image_id"]: r for r in records}
    best, counts = [], []
    for image_id, gts in gt.items():
        rec = by_id.get(image_id)
        props = [p["segmentation"] for p in rec["proposals"]] if rec and rec.get("status") == "ok" else []
        if rec and rec.get("status") == "ok":
            counts.append(len(props))
        if not gts:
            continue
        best.extend(iou_matrix(gts, props).max(1).tolist() if props else [0.0] * len(gts))
    b = np.asarray(best, dtype=np.float64)
    return {"recall_at_0.5" if iou_threshold == 0.5 else f"recall_at_{iou_threshold}":
            float((b >= iou_threshold).mean()) if b.size else 0.0,
            "mean_best_iou": float(b.mean()) if b.size else 0.0, "n_gt": int(b.size), "n_images": len(gt),
            "proposals_per_image": float(np.mean(counts)) if counts else 0.0, "best_ious": b.tolist()}
