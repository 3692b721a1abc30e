"""report.html (issue 12): the page's data, and its paging / filtering / sorting in headless Chromium
(skipped, saying why, when Chromium is not installed). Synthetic filter records: no model runs here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ris_utils import report
from ris_utils.data import refer

N = 120  # > 2 pages of 50


def _records(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    recs = []
    for i in range(N):
        name = f"im{i:03d}.png"
        Image.fromarray(np.full((24, 32, 3), (i * 2) % 255, np.uint8)).save(imgs / name)
        m = np.zeros((24, 32), np.uint8)
        m[4:12, 4:12] = 1
        m2 = np.zeros((24, 32), np.uint8)
        m2[14:20, 10:30] = 1
        noun = "zebra" if i % 10 == 0 else "cat"
        doc = float("inf") if i == 7 else float(i)
        cands = [{"text": f"a {noun} number {i}", "noun": noun, "doc": doc, "keep": True},
                 {"text": f"a {noun} number {i}", "noun": noun, "doc": doc, "keep": True},
                 {"text": f"something vague {i}", "noun": "thing", "doc": 0.5, "keep": False}]
        recs.append({"image_id": i, "file_name": name, "status": "ok", "error": None, "path": str(imgs / name),
                     "height": 24, "width": 32, "n_masks": 2,
                     "masks": [{"mask_index": 0, "segmentation": refer.encode_mask(m), "candidates": cands,
                                "survivors": [0, 1], "fallback": None, "dropped": None},
                               {"mask_index": 1, "segmentation": refer.encode_mask(m2),
                                "candidates": [{"text": "a dog", "noun": "dog", "doc": 0.2, "keep": False}],
                                "survivors": [], "fallback": None, "dropped": "no_survivor"}]})
    recs.append({"image_id": N, "file_name": "bad.jpg", "status": "error", "error": "BadImageError: unreadable"})
    fdir = tmp_path / "filter"
    fdir.mkdir()
    (fdir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return fdir


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    card = {"name": "synthetic", "counts": {"images": N, "masks": 2 * N, "expressions": 2 * N,
                                            "masks_dropped_by_reason": {"no_survivor": N}}}
    out = report.write_report(_records(tmp), tmp / "out", card=card, progress=False)
    return tmp, out


def _data(html: str) -> dict:
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


def test_report_data_is_strict_json_with_dedup_and_dropped_masks(page):
    tmp, out = page
    html = out.read_text()
    data = _data(html)  # json.loads refuses NaN / Infinity: the page's JSON.parse would too
    assert len(data["images"]) == N and data["page_size"] == 50
    im7 = data["images"][7]
    e = im7["masks"][0]["exprs"]
    assert e[0] == {"t": "a cat number 7", "doc": "inf", "surv": True, "n": 2}
    assert e[1]["surv"] is False and e[1]["doc"] == 0.5
    assert im7["masks"][1]["dropped"] == "no_survivor" and not im7["masks"][1]["exprs"][0]["surv"]
    assert all((tmp / "out" / im["src"]).is_file() for im in data["images"])  # relative files inside <out>
    assert "bad.jpg" in html and "BadImageError" in html and "no_survivor: 120" in html  # failures, card
    assert "http" not in html.replace("http-equiv", "")  # offline: nothing fetched


def test_overlay_draws_each_mask_in_its_colour():
    img = np.zeros((40, 40, 3), np.uint8)
    m = np.zeros((40, 40), bool)
    m[10:30, 10:30] = True
    ov = report.render_overlay(img, [m])
    assert tuple(ov[10, 20]) == tuple(int(report.PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))  # outline
    assert ov[20, 20].sum() > 0 and ov[0, 0].sum() == 0


def _dom(browser, tmp, url) -> str:
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom", url]
    return subprocess.run(flags, capture_output=True, text=True, timeout=120).stdout


def test_paging_filtering_and_sorting_in_headless_chromium(page):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")
    tmp, out = page
    url = out.as_uri()
    dom = _dom(browser, tmp, url)
    assert 'data-rendered="50"' in dom and "page 1 / 3" in dom and "50 of 120" not in dom
    assert '<s class="expr">something vague 0</s>' in dom and '<span class="expr">a zebra number 0 ×2</span>' in dom
    assert "DoC ∞" in dom  # image 7's infinite DoC
    dom = _dom(browser, tmp, url + "#page=3")
    assert 'data-rendered="20"' in dom and "page 3 / 3" in dom
    dom = _dom(browser, tmp, url + "#q=zebra")  # filter by noun
    assert 'data-rendered="12"' in dom and "12 of 120 images" in dom
    assert set(re.findall(r'data-file="(im\d+)\.png"', dom)) == {f"im{i:03d}" for i in range(0, N, 10)}
    dom = _dom(browser, tmp, url + "#mindoc=100&kept=1")  # by DoC: kept expressions with DoC >= 100
    assert 'data-rendered="21"' in dom  # 100..119 and the infinite one
    dom = _dom(browser, tmp, url + "#sort=doc")  # highest DoC first: inf, then 119, 118, ...
    files = re.findall(r'data-file="(im\d+)\.png"', dom)
    assert files[:3] == ["im007", "im119", "im118"]


def test_max_images_caps_the_page_and_says_so(tmp_path):
    out = report.write_report(_records(tmp_path), tmp_path / "out", progress=False, max_images=10)
    html = out.read_text()
    assert len(_data(html)["images"]) == 10 and "showing the first 10 of 120 images" in html
    assert "bad.jpg" in html  # failures are still all listed

