"""Published peers' mIoU (issue 12): transcribed with their source, laid out beside the measured row."""

from __future__ import annotations

import math

from ris_utils import peers, profiles
from ris_utils.ris import tables

#: issue 12, from "Multimodal Referring Segmentation: A Survey" (arXiv 2508.00265v2), Table 2
EXPECTED = {
    "HybridGL (CVPR'25)": [49.48, 53.37, 45.19, 43.40, 49.13, 37.17, 51.25, 51.59],
    "Global-Local CLIP (CVPR'23)": [26.20, 24.94, 26.56, 27.80, 25.64, 27.84, 33.52, 33.67],
    "SaG (ICCV'23)": [44.60, 50.10, 38.40, 35.50, 41.10, 27.60, None, None],
    "Weakly-RIS (ICCV'23)": [31.06, 32.30, 30.11, 31.28, 32.11, 30.13, 32.88, None],
    "PCNet (NeurIPS'24)": [52.20, 58.40, 42.10, 47.90, 56.50, 36.20, 46.80, 46.90],
}


def _paper():
    return tables.load_paper_numbers(profiles.profiles_dir() / "paper_numbers.yaml")


def test_peer_rows_are_transcribed_with_their_source():
    df = peers.peer_table(_paper())
    for label, values in EXPECTED.items():
        got = [df.loc[label, c] for c in peers.COLUMNS]
        assert all((v is None and math.isnan(g)) or g == v for g, v in zip(got, values)), (label, got)
        assert "2508.00265" in df.loc[label, ("source", "")]
    assert df.loc["Pseudo-RIS (published)", peers.COLUMNS].isna().all()  # stays null until a source is at hand
    assert set(df[("setting", "")]) >= {"zero-shot", "weakly-supervised"}


def test_measured_row_comes_from_the_metric_keys():
    measured = {"ris.pseudo_ris.refcoco+.val.mIoU": 12.5, "ris.pseudo_ris.refcocog.test.mIoU": 3.0}
    df = peers.peer_table(_paper(), measured)
    row = df.loc["Pseudo-RIS (measured, this profile)"]
    assert row[("refcoco+", "val")] == 12.5 and row[("refcocog", "test")] == 3.0
    assert math.isnan(row[("refcoco", "val")])
    assert list(df.index[:2]) == ["Pseudo-RIS (measured, this profile)", "Pseudo-RIS (published)"]
