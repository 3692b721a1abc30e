"""The benchmark tables of notebook 05 from the evaluation JSONs of notebook 04 (and the paper's numbers).

Table rows (the paper's ablation + semi-supervised rows): naive captions / + distinctive sampling /
+ filtering (Pseudo-RIS) / ground truth / 10 % ground truth / 10 % ground truth + pseudo. Columns: mIoU and
oIoU per (style, split). Every cell is the mean over seeds, with the spread (population std over seeds)
beside it; :func:`metric_keys` names them ``ris.<trainset>.<style>.<split>.<mIoU|oIoU>`` (+ ``_std``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ROW_ORDER = ("naive", "distinctive", "pseudo_ris", "gt", "gt10", "gt10+pseudo")
# the evaluation's object-pick diagnostic (ris.train.evaluate_model), overall and per attribute kind named
PICK_COLUMNS = ("pick_acc", "pick_chance", "pick_acc_color", "pick_acc_shape", "pick_acc_size", "pick_acc_pattern",
                "pick_acc_location")
ROW_LABELS = {"naive": "naive captions", "distinctive": "+ distinctive sampling",
              "pseudo_ris": "+ filtering (Pseudo-RIS)", "gt": "ground truth (fully supervised)",
              "gt10": "10% ground truth", "gt10+pseudo": "10% ground truth + Pseudo-RIS"}


def results_frame(rows: list[dict]):
    """Flat evaluation records (``experiments.collect``) -> pandas DataFrame."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["trainset", "style", "split", "seed", "mIoU", "oIoU"])
    # gt-type rows evaluate only their own style; pseudo rows every style
    return df[(df["train_style"].isna()) | (df["train_style"] == df["style"])].reset_index(drop=True)


def summary_frame(df):
    """Mean, std (over seeds, ddof=0) and seed count per (trainset, style, split) for mIoU and oIoU (and the
    pick accuracy diagnostic ``pick_acc`` / its chance level ``pick_chance`` when the records carry them)."""
    import pandas as pd

    if df.empty:
        return pd.DataFrame()
    cols = ["mIoU", "oIoU"] + [c for c in PICK_COLUMNS if c in df and df[c].notna().any()]
    g = df.groupby(["trainset", "style", "split"])[cols]
    std = g.std(ddof=0).add_suffix("_std")
    out = g.mean().join(std).join(g.size().rename("n_seeds"))
    return out.reset_index()


def metric_keys(summary) -> dict:
    """``{"ris.<trainset>.<style>.<split>.<metric>": mean, ..._std: std}`` for every cell of the table
    (metric: mIoU, oIoU, and pick_acc / pick_chance where measured)."""
    out = {}
    metrics = ["mIoU", "oIoU"] + [c for c in PICK_COLUMNS if c in getattr(summary, "columns", ())]
    for r in summary.itertuples(index=False):
        for m in metrics:
            if m in PICK_COLUMNS and math.isnan(float(getattr(r, m))):
                continue
            base = f"ris.{r.trainset}.{r.style}.{r.split}.{m}"
            out[base] = float(getattr(r, m))
            std = float(getattr(r, f"{m}_std"))
            out[base + "_std"] = 0.0 if math.isnan(std) else std
    return out


def wide_table(summary, styles_splits: list[tuple[str, str]], with_std: bool = True):
    """Rows = training sets (paper order), columns = (style, split, metric) with "mean ± std" strings."""
    import pandas as pd

    idx = [t for t in ROW_ORDER if t in set(summary["trainset"])] if not summary.empty else []
    cols = pd.MultiIndex.from_tuples([(st, sp, m) for st, sp in styles_splits for m in ("mIoU", "oIoU")])
    table = pd.DataFrame(index=[ROW_LABELS[t] for t in idx], columns=cols, dtype=object)
    for t in idx:
        for st, sp in styles_splits:
            sel = summary[(summary.trainset == t) & (summary["style"] == st) & (summary["split"] == sp)]
            for m in ("mIoU", "oIoU"):
                if sel.empty:
                    table.loc[ROW_LABELS[t], (st, sp, m)] = "—"
                else:
                    mu, sd = float(sel[m].iloc[0]), float(sel[f"{m}_std"].iloc[0])
                    table.loc[ROW_LABELS[t], (st, sp, m)] = f"{mu:.1f} ± {sd:.1f}" if with_std else f"{mu:.1f}"
    return table


def load_paper_numbers(path) -> dict:
    """``papermill_runs/paper_numbers.yaml`` as a dict (``rows`` keyed by row name, with ``source``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found (the paper's published numbers with their source)")
    return yaml.safe_load(p.read_text())


def paper_comparison(measured: dict, paper: dict):
    """Long table: (row, benchmark, split, metric) -> paper value, measured value, difference (measured - paper).

    ``measured``: metric keys as :func:`metric_keys` gives (``ris.<trainset>.<dataset>.<split>.<metric>``);
    ``paper['rows'][row]['values'][dataset][split] = {"mIoU": x | null, "oIoU": y | null}``.
    """
    import pandas as pd

    recs = []
    for row, spec in (paper.get("rows") or {}).items():
        for dataset, splits in (spec.get("values") or {}).items():
            for split, vals in (splits or {}).items():
                for m in ("mIoU", "oIoU"):
                    pv = (vals or {}).get(m)
                    mv = measured.get(f"ris.{row}.{dataset}.{split}.{m}")
                    recs.append({"row": row, "dataset": dataset, "split": split, "metric": m,
                                 "paper": pv, "measured": mv,
                                 "difference": (mv - pv) if (mv is not None and pv is not None) else None,
                                 "source": spec.get("source")})
    return pd.DataFrame(recs)


def seed_spread_check(summary, a: str = "pseudo_ris", b: str = "naive", style: str = "shapes",
                      split: str = "val") -> dict:
    """Is ``a`` above ``b`` in mIoU by more than the seed spread? Spread = the larger of the two stds."""
    def cell(t):
        sel = summary[(summary.trainset == t) & (summary["style"] == style) & (summary["split"] == split)]
        return (float(sel["mIoU"].iloc[0]), float(sel["mIoU_std"].iloc[0])) if not sel.empty else (np.nan, np.nan)

    (ma, sa), (mb, sb) = cell(a), cell(b)
    spread = max(sa, sb)
    return {"a": a, "b": b, "mean_a": ma, "mean_b": mb, "diff": ma - mb, "spread": spread,
            "holds": bool(ma - mb > spread) if not (np.isnan(ma) or np.isnan(mb)) else False}


#: the paper's claims as (name, a, b, margin in seed spreads): "a above b in mIoU by more than margin x spread"
CLAIMS = (
    ("pseudo_ris_above_naive", "pseudo_ris", "naive", 2.0),        # the ablation's end points (issue: > 2x std)
    ("distinctive_above_naive", "distinctive", "naive", 0.0),      # naive < distinctive
    ("pseudo_ris_above_distinctive", "pseudo_ris", "distinctive", 0.0),   # distinctive < Pseudo-RIS
    ("semi_above_gt10", "gt10+pseudo", "gt10", 0.0),               # semi-supervised: + pseudo helps 10 % GT
    ("semi_above_pseudo_ris", "gt10+pseudo", "pseudo_ris", 0.0),   # ... and beats pseudo supervision alone
    ("gt_above_pseudo_ris", "gt", "pseudo_ris", 0.0),              # full supervision stays above
    ("pseudo_ris_above_gt", "pseudo_ris", "gt", 0.0),              # unseen domain: pseudo above human refs
)


def claims(summary, styles_splits: list[tuple[str, str]]) -> list[dict]:
    """Every claim of :data:`CLAIMS` on every (style, split): ``{claim, style, split, a, b, mean_a, mean_b, diff,
    spread, margin, holds}``; ``holds`` = diff > margin x spread (spread = the larger seed std of the two rows;
    a margin of 0 = simply above). Cells that were not measured give ``holds = None``."""
    out = []
    for name, a, b, margin in CLAIMS:
        for style, split in styles_splits:
            r = seed_spread_check(summary, a, b, style, split)
            measured = not (np.isnan(r["mean_a"]) or np.isnan(r["mean_b"]))
            spread = 0.0 if np.isnan(r["spread"]) else r["spread"]
            out.append({"claim": name, "style": style, "split": split, **r, "spread": spread, "margin": margin,
                        "holds": bool(r["diff"] > margin * spread) if measured else None})
    return out
