"""Published numbers of zero-shot / weakly-supervised peers beside the measured Pseudo-RIS row (notebook 05).

``papermill_runs/paper_numbers.yaml`` keeps them under ``peers.rows.<name>`` (``label``, ``setting``,
``source``, ``values.<dataset>.<split>.mIoU``; null = not reported), each with its source.
:func:`peer_table` lays them out as one wide table -- RefCOCO val / testA / testB, RefCOCO+ val / testA /
testB, RefCOCOg val / test -- under the paper profile's measured Pseudo-RIS row
(``ris.pseudo_ris.<dataset>.<split>.mIoU``) and the published Pseudo-RIS row (``rows.pseudo_ris``; null
until a source is at hand).
"""

from __future__ import annotations

#: the columns of the survey's table, in its order
COLUMNS = [("refcoco", "val"), ("refcoco", "testA"), ("refcoco", "testB"), ("refcoco+", "val"),
           ("refcoco+", "testA"), ("refcoco+", "testB"), ("refcocog", "val"), ("refcocog", "test")]


def _cells(values: dict | None, metric: str) -> list:
    values = values or {}
    return [((values.get(d) or {}).get(s) or {}).get(metric) for d, s in COLUMNS]


def peer_table(paper: dict, measured: dict | None = None, metric: str = "mIoU", trainset: str = "pseudo_ris"):
    """Wide table (rows: ours measured, ours published, each peer; columns: (dataset, split) + setting, source).

    ``paper``: :func:`ris_utils.ris.tables.load_paper_numbers`; ``measured``: metric keys
    (``ris.<trainset>.<dataset>.<split>.<metric>``), e.g. notebook 05's ``tables.metric_keys(summary)``;
    None leaves out the measured row. Missing cells are NaN (never invented)."""
    import numpy as np
    import pandas as pd

    def num(x):
        return np.nan if x is None else float(x)

    index, data, setting, source = [], [], [], []
    if measured is not None:
        index.append("Pseudo-RIS (measured, this profile)")
        data.append([num(measured.get(f"ris.{trainset}.{d}.{s}.{metric}")) for d, s in COLUMNS])
        setting.append("pseudo-supervised (ours)")
        source.append("papermill_runs/output/<profile>/metrics.json")
    own = (paper.get("rows") or {}).get(trainset) or {}
    index.append("Pseudo-RIS (published)")
    data.append([num(v) for v in _cells(own.get("values"), metric)])
    setting.append("pseudo-supervised")
    source.append(own.get("source", ""))
    for name, spec in ((paper.get("peers") or {}).get("rows") or {}).items():
        index.append(spec.get("label", name))
        data.append([num(v) for v in _cells(spec.get("values"), metric)])
        setting.append(spec.get("setting", ""))
        source.append(spec.get("source", ""))
    df = pd.DataFrame(data, index=index, columns=pd.MultiIndex.from_tuples(COLUMNS, names=["dataset", "split"]))
    df[("setting", "")] = setting
    df[("source", "")] = source
    return df


__all__ = ["peer_table", "COLUMNS"]
