"""Mask proposals and their COCO RLE helpers (step 1's record format).

A proposal is one mask with SAM's two quality scores; the records store it as :meth:`Proposal.to_dict`
(``segmentation`` a COCO RLE with ``str`` counts, ``bbox`` xywh, ``area``, ``predicted_iou``,
``stability_score``). The IoU / containment matrices and exact de-duplication here are shared by the
selectors, the components segmenter and the quality measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class Proposal:
    """One mask proposal.

    Attributes:
      segmentation (dict): COCO RLE ``{"size": [h, w], "counts": str}``.
      bbox (list[float]): ``[x, y, w, h]`` (XYWH) of the mask.
      area (int): pixels in the mask.
      predicted_iou (float): SAM's own quality estimate (1.0 for the components backend).
      stability_score (float): SAM's stability score (1.0 for the components backend).
    """

    segmentation: dict
    bbox: list
    area: int
    predicted_iou: float
    stability_score: float

    @property
    def score(self) -> float:
        """predicted_iou x stability_score (the ranking of the SAM-only selector)."""
        return float(self.predicted_iou) * float(self.stability_score)

    def to_dict(self) -> dict:
        return asdict(self)

    def mask(self) -> np.ndarray:
        """HxW uint8 {0, 1}."""
        return rle_to_mask(self.segmentation)


def mask_to_rle(mask: np.ndarray) -> dict:
    """HxW bool/uint8 mask -> COCO RLE with ``str`` counts."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (str or bytes counts) -> HxW uint8 {0, 1}."""
    return np.ascontiguousarray(mask_utils.decode(rle_bytes(rle)))


def rle_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def str_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
        counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}


def proposal_from_ann(ann: dict) -> Proposal:
    """A :class:`Proposal` from one record of ``SamAutomaticMaskGenerator.generate`` (any output_mode)."""
    seg = ann["segmentation"]
    rle = mask_to_rle(seg) if isinstance(seg, np.ndarray) else str_rle(seg)
    area = int(mask_utils.area(rle_bytes(rle)))
    bbox = [float(v) for v in mask_utils.toBbox(rle_bytes(rle))]
    return Proposal(segmentation=rle, bbox=bbox, area=area,
                    predicted_iou=float(ann.get("predicted_iou", 1.0)),
                    stability_score=float(ann.get("stability_score", 1.0)))


def iou_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """NxM mask IoU of two lists of RLEs."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([rle_bytes(r) for r in a], [rle_bytes(r) for r in b], [0] * len(b)))


def inside_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """NxM: fraction of mask a_i that lies inside mask b_j, |a_i & b_j| / |a_i|."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([rle_bytes(r) for r in a], [rle_bytes(r) for r in b], [1] * len(b)))


def dedup_exact(props: list[Proposal]) -> list[Proposal]:
    seen, out = set(), []
    for p in props:
        key = (tuple(p.segmentation["size"]), p.segmentation["counts"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
