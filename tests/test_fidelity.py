"""ris_utils.fidelity: the measurements of docs/fidelity.md on hand-made filter records."""

import json

import numpy as np

from ris_utils import fidelity


def _write(tmp_path, mode, masks):
    d = tmp_path / "work" / "filter" / mode / "val"
    d.mkdir(parents=True)
    rec = {"image_id": 1, "file_name": "a.png", "status": "ok", "error": None, "height": 4, "width": 4,
           "masks": masks, "n_masks": len(masks)}
    (d / "records.jsonl").write_text(json.dumps(rec) + "\n")


def test_fallback_and_fp16_measurements(tmp_path):
    # candidate 0 of mask 0: DoC = (21.3 * 25.5) / (21.3 * 25.5 + tiny) -- just below 1 in float64, a tie in fp16
    n0, c0 = [21.3, 21.3], [25.5, 25.5009]
    cands = [{"text": "x", "noun_scores": n0, "caption_scores": c0, "doc": 0.99996, "keep": False},
             {"text": "y", "noun_scores": [30.0, 10.0], "caption_scores": [30.0, 10.0], "doc": 9.0, "keep": True}]
    other = [{"text": "z", "noun_scores": [30.0, 10.0], "caption_scores": [30.0, 10.0], "doc": 1 / 9, "keep": False}]
    masks = [{"candidates": cands, "survivors": [1], "fallback": None},
             {"candidates": other, "survivors": [0], "fallback": "all"}]
    for mode in ("naive", "distinctive"):
        _write(tmp_path, mode, masks)
    cfg = {"work_dir": str(tmp_path / "work"), "seed": 0}
    fb = fidelity.measure_fallback(cfg)
    assert fb["distinctive"] == {"masks": 2, "masks_fallback": 1, "share": 0.5, "sentences_all": 1,
                                 "sentences_keep_random": 1, "sentences_drop": 0}
    pr = fidelity.measure_precision(cfg)["naive"]
    assert pr["candidates"] == 3 and 0 <= pr["flips"] <= 3
    # the emulation is the fp16 ratio of fp16-rounded logits: same answer computed by hand
    h = np.float16
    prod = np.array(n0, np.float32).astype(h) * np.array(c0, np.float32).astype(h)
    assert pr["flips"] == int(bool(prod[0] / prod[1] > 1) != (0.99996 > 1))
