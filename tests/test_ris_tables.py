"""Notebook 05's aggregation: mean ± std over seeds per cell, the metric keys, the paper comparison."""

import math

import pytest

from ris_utils.ris import tables


def _rows():
    rows = []
    for ts, base in (("naive", 10.0), ("pseudo_ris", 20.0), ("gt", 50.0)):
        for seed, delta in ((0, -1.0), (1, 1.0)):
            for style in ("shapes", "shapes+"):
                rows.append({"trainset": ts, "style": style, "split": "val", "seed": seed, "mIoU": base + delta,
                             "oIoU": base + 2 * delta, "train_style": None if ts != "gt" else "shapes"})
    return rows


def test_summary_keys_and_check():
    df = tables.results_frame(_rows())
    # the gt run of style "shapes" is not scored on shapes+ (gt-type rows evaluate their own style only)
    assert set(df[df.trainset == "gt"]["style"]) == {"shapes"}
    s = tables.summary_frame(df)
    keys = tables.metric_keys(s)
    assert keys["ris.pseudo_ris.shapes.val.mIoU"] == pytest.approx(20.0)
    assert keys["ris.pseudo_ris.shapes.val.mIoU_std"] == pytest.approx(1.0)
    assert keys["ris.naive.shapes+.val.oIoU_std"] == pytest.approx(2.0)
    assert "ris.gt.shapes+.val.mIoU" not in keys
    chk = tables.seed_spread_check(s, "pseudo_ris", "naive", "shapes", "val")
    assert chk["holds"] and chk["diff"] == pytest.approx(10.0) and chk["spread"] == pytest.approx(1.0)
    wide = tables.wide_table(s, [("shapes", "val"), ("shapes+", "val")])
    assert wide.loc["+ filtering (Pseudo-RIS)", ("shapes", "val", "mIoU")] == "20.0 ± 1.0"
    assert wide.loc["ground truth (fully supervised)", ("shapes+", "val", "mIoU")] == "—"


def test_paper_comparison_never_invents():
    paper = tables.load_paper_numbers(tables.Path(__file__).resolve().parents[1] / "papermill_runs" /
                                      "paper_numbers.yaml")
    assert paper["rows"]["global_local_clip"]["values"]["refcoco"]["val"] == {"oIoU": 24.83, "mIoU": 26.23}
    comp = tables.paper_comparison({"ris.global_local_clip.refcoco.val.mIoU": 30.0}, paper)
    row = comp[(comp.row == "global_local_clip") & (comp.dataset == "refcoco") & (comp.split == "val")
               & (comp.metric == "mIoU")].iloc[0]
    assert row["difference"] == pytest.approx(30.0 - 26.23)
    pr = comp[comp.row == "pseudo_ris"]
    assert pr["paper"].isna().all() and pr["difference"].isna().all()
    assert all(isinstance(s, str) and s for s in comp["source"])
    assert not any(isinstance(v, float) and math.isnan(v) for v in comp[comp.row == "global_local_clip"]["paper"])


def test_pick_accuracy_is_summarised_when_measured():
    rows = _rows()
    for r in rows:  # pseudo_ris picks better than naive; gt rows carry no pick diagnostic (older files)
        r.update(pick_acc={"pseudo_ris": 0.6 + 0.1 * r["seed"], "naive": 0.3}.get(r["trainset"]), pick_chance=0.25)
    s = tables.summary_frame(tables.results_frame(rows))
    keys = tables.metric_keys(s)
    assert keys["ris.pseudo_ris.shapes.val.pick_acc"] == pytest.approx(0.65)
    assert keys["ris.naive.shapes.val.pick_acc_std"] == pytest.approx(0.0)
    assert keys["ris.gt.shapes.val.pick_chance"] == pytest.approx(0.25)
    assert "ris.gt.shapes.val.pick_acc" not in keys  # not measured: no key (not a 0 or NaN)
    assert "pick_acc" not in tables.summary_frame(tables.results_frame(_rows())).columns
