"""RIS metrics against hand-computed cases (LAVT and CRIS conventions)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from ris_utils.metrics import RisEvaluator, ris_scores


def mask(h, w, cells):
    m = np.zeros((h, w), dtype=bool)
    for y, x in cells:
        m[y, x] = True
    return m


def pair(inter, only_pred, only_gt, size=(4, 8)):
    """Masks on a 4x8 grid with the given intersection / pred-only / gt-only pixel counts."""
    flat_p = np.zeros(size[0] * size[1], dtype=bool)
    flat_g = np.zeros_like(flat_p)
    flat_p[:inter] = flat_g[:inter] = True
    flat_p[inter:inter + only_pred] = True
    flat_g[inter + only_pred:inter + only_pred + only_gt] = True
    return flat_p.reshape(size), flat_g.reshape(size)


# Samples: (I, U) = (3, 5) -> 0.6 exactly; (0, 0) empty union; (1, 4) -> 0.25; (9, 10) -> 0.9 exactly
SAMPLES = [pair(3, 1, 1), pair(0, 0, 0), pair(1, 2, 1), pair(9, 0, 1)]


def test_lavt_hand_computed():
    preds, gts = zip(*SAMPLES)
    s = ris_scores(preds, gts)
    ious = [0.6, 0.0, 0.25, 0.9]
    assert s["n"] == 4
    assert s["mIoU"] == pytest.approx(100 * sum(ious) / 4)
    assert s["oIoU"] == pytest.approx(100 * (3 + 0 + 1 + 9) / (5 + 0 + 4 + 10))
    # >=: 0.6 counts at 0.5 and 0.6; 0.9 counts everywhere
    assert s["Pr@0.5"] == pytest.approx(50.0)
    assert s["Pr@0.6"] == pytest.approx(50.0)
    assert s["Pr@0.7"] == pytest.approx(25.0)
    assert s["Pr@0.9"] == pytest.approx(25.0)


def test_cris_hand_computed_strict_threshold_and_eps():
    preds, gts = zip(*SAMPLES)
    s = ris_scores(preds, gts, convention="cris")
    ious = [3 / (5 + 1e-6), 0.0, 1 / (4 + 1e-6), 9 / (10 + 1e-6)]
    assert s["mIoU"] == pytest.approx(100 * sum(ious) / 4, rel=1e-12)
    assert s["mIoU"] < ris_scores(preds, gts)["mIoU"]  # the eps makes every IoU slightly smaller
    # >: 0.6 -> counts at 0.5 only; 0.9 (just below) counts at 0.5 .. 0.8 but not 0.9
    assert s["Pr@0.5"] == pytest.approx(50.0)
    assert s["Pr@0.6"] == pytest.approx(25.0)
    assert s["Pr@0.8"] == pytest.approx(25.0)
    assert s["Pr@0.9"] == pytest.approx(0.0)
    assert s["oIoU"] == pytest.approx(100 * 13 / 19)


def test_threshold_exactly_at_iou_differs_between_conventions():
    p, g = pair(7, 2, 1)  # I = 7, U = 10 -> 0.7 exactly
    assert ris_scores([p], [g], thresholds=(0.7,))["Pr@0.7"] == 100.0
    assert ris_scores([p], [g], thresholds=(0.7,), convention="cris")["Pr@0.7"] == 0.0


def test_cris_binarises_probabilities_at_035():
    gt = mask(2, 2, [(0, 0), (0, 1)])
    prob = np.array([[0.36, 0.35], [0.9, 0.0]], dtype=np.float32)  # > 0.35: (0,0), (1,0)
    ev = RisEvaluator(convention="cris")
    iou = ev.update(prob, gt)
    assert iou[0] == pytest.approx(1 / (3 + 1e-6))
    with pytest.raises(ValueError, match="convention='cris'"):
        RisEvaluator(convention="lavt").update(prob, gt)
    with pytest.raises(ValueError, match="sigmoid"):
        RisEvaluator(convention="cris").update(prob * 4 - 2, gt)


def test_lavt_logits_argmax_and_torch_input():
    gt = mask(3, 3, [(0, 0), (1, 1)])
    logits = np.zeros((2, 3, 3), dtype=np.float32)
    logits[1, 0, 0] = logits[1, 2, 2] = 5.0  # foreground at (0,0) and (2,2) -> I = 1, U = 3
    s = ris_scores(torch.from_numpy(logits[None]), torch.from_numpy(gt[None]))
    assert s["mIoU"] == pytest.approx(100 / 3)
    assert s["n"] == 1


def test_float_binary_accepted_under_lavt():
    p, g = pair(3, 1, 1)
    assert ris_scores([p.astype(np.float32)], [g.astype(np.uint8)])["mIoU"] == pytest.approx(60.0)


def test_empty_union_is_zero_iou_and_all_empty_split():
    e = np.zeros((4, 4), dtype=bool)
    s = ris_scores([e, e], [e, e])
    assert s["n"] == 2 and s["mIoU"] == 0.0 and s["oIoU"] == 0.0 and s["Pr@0.5"] == 0.0
    empty = ris_scores([], [])
    assert empty["n"] == 0
    assert all(math.isnan(v) for k, v in empty.items() if k != "n")
    assert set(empty) == {"mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "n"}
    stacked = ris_scores(np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4), bool))
    assert stacked["n"] == 0 and math.isnan(stacked["mIoU"])


def test_batch_equals_one_by_one():
    rng = np.random.default_rng(0)
    preds = rng.random((12, 9, 7)) > 0.5
    gts = rng.random((12, 9, 7)) > 0.4
    gts[3] = preds[3] = False  # one empty union in the batch
    for conv in ("lavt", "cris"):
        batch = ris_scores(preds, gts, convention=conv)
        one = RisEvaluator(convention=conv)
        for p, g in zip(preds, gts):
            one.update(p, g)
        assert batch == one.compute()
        # and two half-batches merged
        a, b = RisEvaluator(convention=conv), RisEvaluator(convention=conv)
        a.update(preds[:5], gts[:5])
        b.update(preds[5:], gts[5:])
        assert a.merge(b).compute() == batch


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        ris_scores([np.zeros((4, 5), bool)], [np.zeros((4, 6), bool)])
    with pytest.raises(ValueError, match="ground truths ran out after 1 samples"):
        ris_scores([np.zeros((4, 5), bool)] * 2, [np.zeros((4, 5), bool)])


def test_ris_scores_consumes_generators_lazily(monkeypatch):
    """Generators are scored one sample at a time (memory does not grow with the split)."""
    produced = []
    seen_at_update = []

    def gen(n):
        for i in range(n):
            produced.append(i)
            m = np.zeros((8, 8), bool)
            m[: i % 8 + 1] = True
            yield m

    real_update = RisEvaluator.update

    def spy(self, pred, gt):
        seen_at_update.append(len(produced))
        return real_update(self, pred, gt)

    monkeypatch.setattr(RisEvaluator, "update", spy)
    out = ris_scores(gen(50), gen(50))
    assert out["n"] == 50 and out["mIoU"] == pytest.approx(100.0)
    # at the k-th update only k+1 samples of each generator have been produced
    assert seen_at_update == [2 * (k + 1) for k in range(50)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="convention"):
        RisEvaluator(convention="lavtt")
    with pytest.raises(ValueError, match="thresholds"):
        RisEvaluator(thresholds=(0.5, 1.5))
    with pytest.raises(ValueError, match="ground truth must be binary"):
        RisEvaluator().update(np.zeros((2, 2), bool), np.full((2, 2), 255, np.uint8))


def test_state_does_not_grow_with_samples():
    rng = np.random.default_rng(1)
    preds = rng.random((50, 8, 8)) > 0.5
    gts = rng.random((50, 8, 8)) > 0.5
    ev = RisEvaluator()
    ev.update(preds[0], gts[0])
    attrs_after_1 = {k: np.shape(v) for k, v in vars(ev).items()}
    size_after_1 = len(pickle.dumps(ev))
    for i in range(1000):
        ev.update(preds[i % 50], gts[i % 50])
    assert {k: np.shape(v) for k, v in vars(ev).items()} == attrs_after_1
    assert len(pickle.dumps(ev)) <= size_after_1 + 16  # only the sums' digits may grow
    assert ev.compute()["n"] == 1001
