"""Referring image segmentation metrics: mIoU, oIoU and Pr@X, streaming, in two codebases' conventions.

For sample (sentence) ``i`` with binary prediction ``P_i`` and ground truth ``G_i``:

    I_i = |P_i ∩ G_i|,   U_i = |P_i ∪ G_i|
    LAVT (default):  IoU_i = I_i / U_i, and IoU_i = 0 when U_i = 0;   Pr@X = 100 · #{i : IoU_i >= X} / n
    CRIS:            IoU_i = I_i / (U_i + 1e-6);                       Pr@X = 100 · #{i : IoU_i >  X} / n
    mIoU = 100 · Σ_i IoU_i / n          oIoU = 100 · Σ_i I_i / Σ_i U_i  (0 when Σ_i U_i = 0 and n > 0)

Binarisation: LAVT takes the argmax of 2-channel logits (``[..., 2, H, W]``) or a binary mask; CRIS
thresholds probabilities at ``> 0.35``. CRIS does not compute oIoU; we report ``Σ I / Σ U`` for it too,
so both conventions give the same keys. Resolution (LAVT: 480×480 with nearest-resized GT; CRIS: original
size) is the caller's business: pass prediction and GT at the size the convention evaluates at.

Empty split: with ``n = 0`` every value except ``n`` is ``NaN`` (there is nothing to average; a NaN
cannot be mistaken for a real 0). Memory does not grow with ``n``: :class:`RisEvaluator` keeps only
``n``, ``Σ I``, ``Σ U``, ``Σ IoU`` and one count per threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import zip_longest

import numpy as np

from ris_utils.settings import MASK_THRESHOLD

__all__ = ["CONVENTIONS", "DEFAULT_THRESHOLDS", "RisEvaluator", "ris_scores", "to_numpy"]

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

#: convention -> (probability threshold for float predictions or None, Pr@X uses ">=" or ">", IoU eps)
CONVENTIONS = {
    "lavt": {"prob_threshold": None, "pr_op": ">=", "eps": 0.0},
    "cris": {"prob_threshold": MASK_THRESHOLD, "pr_op": ">", "eps": 1e-6},
}


def to_numpy(x) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (moved to CPU, detached)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _is_binary(a: np.ndarray) -> bool:
    return a.dtype == bool or bool(np.all((a == 0) | (a == 1)))


class RisEvaluator:
    """Streaming RIS evaluator (formulas in the module docstring).

    Arguments:
      thresholds: IoU thresholds X of Pr@X, each in [0, 1].
      convention: ``"lavt"`` (default) or ``"cris"``.

    ``update(pred, gt)`` takes one sample (gt HxW) or a batch (gt BxHxW). ``pred`` has gt's shape, or
    gt's shape with a channel axis of 2 inserted before H (logits -> argmax over it). Under ``"lavt"`` a
    non-logit ``pred`` must be binary (bool, or values in {0, 1}); under ``"cris"`` it may be
    probabilities in [0, 1] (foreground = ``pred > 0.35``). ``gt`` must be binary.
    """

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, convention: str = "lavt"):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        thresholds = tuple(float(t) for t in thresholds)
        if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be a non-empty list of IoU values in [0, 1], got {thresholds}")
        self.thresholds = thresholds
        self.convention = convention
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum_i = 0
        self.sum_u = 0
        self.sum_iou = 0.0
        self.correct = np.zeros(len(self.thresholds), dtype=np.int64)

    # -- binarisation ---------------------------------------------------------------------------
    def _binarise(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        if pred.shape == gt.shape[:-2] + (2,) + gt.shape[-2:]:  # 2-channel logits
            return pred.argmax(axis=-3).astype(bool)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape} "
                             f"(expected {gt.shape}, or {gt.shape[:-2] + (2,) + gt.shape[-2:]} for 2-channel logits)")
        if pred.dtype == bool:
            return pred
        if not np.issubdtype(pred.dtype, np.number):
            raise ValueError(f"prediction must be a numeric or bool array, got dtype {pred.dtype}")
        threshold = CONVENTIONS[self.convention]["prob_threshold"]
        if threshold is None:
            if not _is_binary(pred):
                raise ValueError(
                    f"convention='lavt' needs binary predictions (bool or values 0/1) or 2-channel logits; got "
                    f"{pred.dtype} values in [{pred.min()}, {pred.max()}]. Use convention='cris' for probabilities.")
            return pred != 0
        if np.issubdtype(pred.dtype, np.floating) and (np.isnan(pred).any() or pred.min() < 0 or pred.max() > 1):
            raise ValueError(f"convention='cris' needs probabilities in [0, 1] (apply a sigmoid to logits); got "
                             f"values in [{np.nanmin(pred)}, {np.nanmax(pred)}]")
        if not np.issubdtype(pred.dtype, np.floating) and not _is_binary(pred):
            raise ValueError(f"integer predictions must be 0/1 masks, got values in [{pred.min()}, {pred.max()}]")
        return pred > threshold

    # -- accumulation ---------------------------------------------------------------------------
    def update(self, pred, gt) -> np.ndarray:
        """Add one sample (gt HxW) or a batch (gt BxHxW); returns the per-sample IoUs of this call (B,)."""
        pred, gt = to_numpy(pred), to_numpy(gt)
        if gt.ndim not in (2, 3):
            raise ValueError(f"ground truth must be HxW or BxHxW, got shape {gt.shape}")
        if not _is_binary(gt):
            raise ValueError(f"ground truth must be binary (bool or 0/1), got values in [{gt.min()}, {gt.max()}]")
        p = self._binarise(pred, gt)
        g = gt.astype(bool)
        if g.ndim == 2:
            p, g = p[None], g[None]
        p, g = p.reshape(len(p), -1), g.reshape(len(g), -1)
        inter = np.count_nonzero(p & g, axis=1).astype(np.int64)
        union = np.count_nonzero(p | g, axis=1).astype(np.int64)
        eps = CONVENTIONS[self.convention]["eps"]
        if eps:
            iou = inter / (union + eps)
        else:
            iou = np.divide(inter, union, out=np.zeros(len(inter), dtype=np.float64), where=union > 0)
        thr = np.asarray(self.thresholds, dtype=np.float64)
        if CONVENTIONS[self.convention]["pr_op"] == ">=":
            hits = iou[:, None] >= thr[None, :]
        else:
            hits = iou[:, None] > thr[None, :]
        self.correct += hits.sum(axis=0)
        self.n += len(iou)
        self.sum_i += int(inter.sum())
        self.sum_u += int(union.sum())
        self.sum_iou += float(iou.sum())
        return iou

    def merge(self, other: RisEvaluator) -> RisEvaluator:
        """Add another evaluator's sums (same thresholds and convention), e.g. from another shard."""
        if (other.thresholds, other.convention) != (self.thresholds, self.convention):
            raise ValueError("merge: evaluators differ in thresholds or convention")
        self.n += other.n
        self.sum_i += other.sum_i
        self.sum_u += other.sum_u
        self.sum_iou += other.sum_iou
        self.correct += other.correct
        return self

    def state(self) -> dict:
        """The running sums (everything this evaluator keeps)."""
        return {"n": self.n, "sum_i": self.sum_i, "sum_u": self.sum_u, "sum_iou": self.sum_iou,
                "correct": self.correct.tolist()}

    def compute(self) -> dict:
        """``{"mIoU", "oIoU", "Pr@0.5", ..., "n"}``: percentages (NaN when n = 0), and the sample count."""
        nan = math.nan
        out = {"mIoU": 100.0 * self.sum_iou / self.n if self.n else nan}
        if self.n == 0:
            out["oIoU"] = nan
        else:
            out["oIoU"] = 100.0 * self.sum_i / self.sum_u if self.sum_u else 0.0
        for t, c in zip(self.thresholds, self.correct):
            out[f"Pr@{t:g}"] = 100.0 * int(c) / self.n if self.n else nan
        out["n"] = self.n
        return out


def ris_scores(preds, gts, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, convention: str = "lavt") -> dict:
    """mIoU, oIoU, Pr@X (percent) and n over paired predictions and ground truths.

    Arguments:
      preds, gts: stacked arrays (BxHxW, preds also Bx2xHxW logits) or equally long iterables of per-sample
        arrays (HxW each, sizes may differ between samples).
      thresholds, convention: see :class:`RisEvaluator`.
    Returns:
      ``{"mIoU", "oIoU", "Pr@0.5", ..., "Pr@0.9", "n"}`` (formulas in the module docstring).
    """
    ev = RisEvaluator(thresholds, convention)
    if isinstance(gts, np.ndarray) or hasattr(gts, "detach"):  # stacked: one sample (HxW) or a batch
        gts_np, preds_np = to_numpy(gts), to_numpy(preds)
        if gts_np.ndim == 3 and len(preds_np) != len(gts_np):
            raise ValueError(f"{len(preds_np)} predictions for {len(gts_np)} ground truths "
                             f"(shapes {preds_np.shape} and {gts_np.shape})")
        if gts_np.size or gts_np.ndim == 2:
            ev.update(preds_np, gts_np)
        return ev.compute()
    # Iterate lazily so that generators of masks are scored in constant memory.
    missing = object()
    n_seen = 0
    for p, g in zip_longest(_as_iter(preds, "preds"), _as_iter(gts, "gts"), fillvalue=missing):
        if p is missing or g is missing:
            side = "predictions" if p is missing else "ground truths"
            raise ValueError(f"preds and gts differ in length: {side} ran out after {n_seen} samples")
        ev.update(p, g)
        n_seen += 1
    return ev.compute()


def _as_iter(x, name: str):
    if isinstance(x, Iterable):
        return iter(x)
    raise ValueError(f"{name} must be an array or an iterable of arrays, got {type(x).__name__}")
