"""Selectors: which of an image's proposals become step 1's masks.

``external`` is the authors' rule (for each CutLER instance, the SAM mask with the largest pixel overlap);
``sam_only`` is ours (containment, NMS, minimum area, top-M by predicted_iou x stability_score, because
CutLER needs detectron2); ``none`` keeps every proposal once.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..settings import Masks
from .proposals import Proposal, dedup_exact, inside_matrix, iou_matrix, str_rle


def select_sam_only(
    props: list[Proposal],
    image_hw: tuple[int, int],
    *,
    min_area: int = 0,
    min_area_frac: float = 0.0,
    max_area_frac: float = 1.0,
    nms_iou: float = 0.7,
    containment: float = 0.9,
    max_masks: int | None = None,
) -> list[Proposal]:
    """The SAM-only selector (our choice; the paper uses CutLER): reduce SAM's over-segmentation.

    1. drop exact duplicates and masks with area < max(min_area, min_area_frac*H*W) or > max_area_frac*H*W;
    2. greedy mask NMS in order of score = predicted_iou x stability_score: drop a mask whose IoU with a
       kept (higher-scoring) mask is > ``nms_iou`` (this also removes near-duplicates);
    3. containment, largest first: drop a mask when >= ``containment`` of its pixels lie inside a larger
       kept mask (SAM's sub-parts of one object);
    4. keep the ``max_masks`` best by score.

    Returns the kept proposals sorted by score (ties: original order).
    """
    h, w = image_hw
    lo = max(float(min_area), float(min_area_frac) * h * w)
    hi = float(max_area_frac) * h * w
    cand = [p for p in dedup_exact(props) if lo <= p.area <= hi]
    order = sorted(range(len(cand)), key=lambda i: (-cand[i].score, i))
    cand = [cand[i] for i in order]
    rles = [p.segmentation for p in cand]
    iou = iou_matrix(rles, rles)
    keep: list[int] = []
    for i in range(len(cand)):
        if all(iou[i, j] <= nms_iou for j in keep):
            keep.append(i)
    if containment is not None and containment < 1.0 + 1e-9 and keep:
        inside = inside_matrix(rles, rles)
        by_area = sorted(keep, key=lambda i: (-cand[i].area, i))
        kept2: list[int] = []
        for i in by_area:
            if not any(cand[j].area > cand[i].area and inside[i, j] >= containment for j in kept2):
                kept2.append(i)
        keep = sorted(kept2)
    out = [cand[i] for i in keep]
    return out[:max_masks] if max_masks else out


def select_by_external(props: list[Proposal], external: list[dict] | None) -> list[Proposal]:
    """The authors' rule: for each external instance mask (e.g. a CutLER detection), keep the proposal with
    the largest raw pixel overlap |proposal & external|. Proposals chosen twice are kept once (we
    de-duplicate; the authors do not). No external mask, or no overlap -> nothing for that instance;
    an image without external masks gets no proposals (the authors skip it).

    Arguments:
      props: the SAM proposals of one image.
      external: COCO RLEs (HxW of the image) of the external instances.
    """
    if not props or not external:
        return []
    rles = [p.segmentation for p in props]
    areas = np.array([p.area for p in props], dtype=np.float64)
    inter = np.rint(inside_matrix(rles, [str_rle(e) for e in external]) * areas[:, None])  # N x G pixels
    chosen: list[int] = []
    for g in range(inter.shape[1]):
        j = int(np.argmax(inter[:, g]))  # first maximum: deterministic
        if inter[j, g] > 0 and j not in chosen:
            chosen.append(j)
    return dedup_exact([props[j] for j in chosen])


SELECTORS = ("none", "sam_only", "external", "auto")


def make_selector(cfg: dict | None) -> Callable[[list[Proposal], tuple[int, int], list | None], list[Proposal]]:
    """A selector ``(proposals, (h, w), external_rles_or_None) -> proposals`` from a ``selector:`` dict.

    ``kind``: ``none`` (exact de-duplication only), ``sam_only`` (:func:`select_sam_only`, the other keys are
    its arguments), ``external`` (:func:`select_by_external`), ``auto`` (external when external masks are
    configured, else sam_only).
    """
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "auto")
    if kind not in SELECTORS:
        raise ValueError(f"masks.selector.kind must be one of {SELECTORS}, got {kind!r}")
    allowed = set(inspect.signature(select_sam_only).parameters) - {"props", "image_hw"}
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"masks.selector: unknown keys {sorted(unknown)} (allowed: kind, {sorted(allowed)})")

    def select(props, image_hw, external=None):
        if kind == "external" or (kind == "auto" and external is not None):
            return select_by_external(props, external or [])
        if kind == "none":
            return dedup_exact(props)
        return select_sam_only(props, image_hw, **cfg)

    select.kind = kind
    return select


def load_external_masks(path: str | os.PathLike, *, min_score: float = Masks.external_min_score,
                        max_per_image: int = Masks.external_max_per_image) -> dict:
    """External instance masks from a COCO results json (``[{"image_id", "segmentation", "score"}, ...]``,
    e.g. CutLER's detections): ``{image_id: [rle, ...]}`` keeping score >= ``min_score`` and at most
    ``max_per_image`` best per image (the paper: score >= 0.5, <= 100 detections)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks.external_masks: {path} does not exist (a COCO results json of "
                                "instance masks, e.g. CutLER detections)")
    try:
        dets = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"masks.external_masks: {path} is not valid JSON ({e})") from e
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list) or any("image_id" not in d or "segmentation" not in d for d in dets):
        raise ValueError(f"masks.external_masks: {path} must be a list of {{'image_id', 'segmentation', "
                         "'score'}} (COCO results format)")
    per: dict = {}
    for d in dets:
        if float(d.get("score", 1.0)) >= min_score:
            per.setdefault(d["image_id"], []).append(d)
    out = {}
    for image_id, ds in per.items():
        ds = sorted(ds, key=lambda d: -float(d.get("score", 1.0)))[:max_per_image]
        out[image_id] = [str_rle(d["segmentation"]) for d in ds]
    return out
