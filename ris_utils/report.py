"""``<out>/report.html``: one self-contained, offline page to look at the pseudo-supervision before training.

:func:`write_report` reads the filter step's records (every mask of every image, with all its caption
candidates, their DoC and whether they survived) and writes

* ``<out>/report.html`` -- inline CSS and JS, no CDN, no network: the dataset card's counts at the top;
  per image its masks drawn in colour and, per mask, the expressions that survived (DoC shown) and the
  dropped ones struck through; a filter (noun / expression text, minimum DoC, kept only), a sort (file,
  highest DoC, most kept expressions, noun) and pages (50 images a page: fine for thousands of images);
  failed images listed with their reason;
* ``<out>/report_files/<n>.jpg`` -- each image with its masks drawn (longest side ``max_side``), referenced
  by relative path so the folder can be moved or zipped as a whole.

Colours follow the mask order of the record; a mask's expressions are deduplicated (``×k`` = how many of its
candidates gave that text; DoC = the highest). Opened by a test in headless Chromium (tests/test_report.py).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from ris_utils import engine
from ris_utils.data.refer import decode_segmentation
from ris_utils.images import load_image_rgb

FILES_DIR = "report_files"
PAGE_SIZE = 50
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075"]


def _doc(x):
    """DoC for the page's JSON: a finite number, "inf" / "-inf", or None."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    return round(x, 4) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def render_overlay(image: np.ndarray, masks: list[np.ndarray], max_side: int = 320) -> np.ndarray:
    """The image (longest side ``max_side``) with every mask filled translucent and outlined in its colour."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
    for k, m in enumerate(masks):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
        if not m.any():
            continue
        c = _rgb(PALETTE[k % len(PALETTE)])
        img[m] = 0.55 * img[m] + 0.45 * c
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        img[m & ~inner] = c
    return img.clip(0, 255).astype(np.uint8)


def _mask_entry(k: int, m: dict) -> dict:
    cands = m.get("candidates") or []
    surv = set(m.get("survivors") or [])
    by_text: dict[str, dict] = {}
    for i, c in enumerate(cands):
        e = by_text.setdefault(c["text"], {"t": c["text"], "doc": None, "surv": False, "n": 0})
        d = c.get("doc")
        if d is not None and (e["doc"] is None or float(d) > float(e["doc"])):
            e["doc"] = float(d)
        e["surv"] |= (i in surv) and not m.get("dropped")
        e["n"] += 1
    exprs = sorted(by_text.values(), key=lambda e: (not e["surv"], -(e["doc"] if e["doc"] is not None else -1e300)))
    for e in exprs:
        e["doc"] = _doc(e["doc"])
    nouns = [c.get("noun") for i, c in enumerate(cands) if i in surv and c.get("noun")] or \
            [c.get("noun") for c in cands if c.get("noun")]
    noun = max(sorted(set(nouns)), key=nouns.count) if nouns else ""
    return {"k": k, "color": PALETTE[k % len(PALETTE)], "noun": noun, "dropped": m.get("dropped"),
            "fallback": m.get("fallback"), "exprs": exprs}


def _card_table(card: dict | None) -> str:
    if not card:
        return ""
    rows = []
    for key, value in (card.get("counts") or {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"{a}: {b}" for a, b in value.items()) or "–"
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    return ("<table id='card'><caption>dataset card (" + html.escape(str(card.get("name", ""))) + ")</caption>"
            + "".join(rows) + "</table>")


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}#card{border-collapse:collapse;margin:8px 0;font-size:12px}
#card th,#card td{border:1px solid #ddd;padding:2px 8px;text-align:left}#card caption{text-align:left;font-weight:600}
#controls{position:sticky;top:0;background:#fafafa;padding:8px 0;border-bottom:1px solid #ddd;z-index:2}
#controls input,#controls select,#controls button{font:inherit;margin-right:8px}
.item{display:flex;gap:12px;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px;margin:10px 0}
.item img{width:320px;max-width:40vw;height:auto;border-radius:4px;align-self:flex-start;position:sticky;top:56px}
.item h3{font-size:13px;margin:0 0 4px;word-break:break-all}.masks{flex:1;min-width:0}
.mask{margin:4px 0 8px}.sw{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:middle;
margin-right:4px;border:1px solid #0003}.mask ul{margin:2px 0 0 18px;padding:0;columns:2 300px}.mask li{margin:1px 0}
li.kept{color:#0a5a12}li.dropped{color:#888}li.match{background:#fff3b0}
.doc{font-size:11px;color:#555;margin-left:6px}.tag{font-size:11px;color:#a33;margin-left:6px}
#failures{color:#a33}#pager{margin:8px 0}
"""

_JS = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const PAGE = DATA.page_size; let page = 0; let view = [];
const num = d => d === null ? NaN : (d === 'inf' ? Infinity : (d === '-inf' ? -Infinity : d));
const fmt = d => d === null ? '–' : (d === 'inf' ? '∞' : (d === '-inf' ? '-∞' : Number(d).toPrecision(3)));
const el = (tag, attrs, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === 'text') e.textContent = v; else e.setAttribute(k, v); }
  for (const c of kids) if (c) e.appendChild(c); return e; };
function exprMatches(e, q, minDoc, keptOnly, noun) {
  if (keptOnly && !e.surv) return false;
  if (!(num(e.doc) >= minDoc) && minDoc > -Infinity) return false;
  return !q || e.t.toLowerCase().includes(q) || noun.toLowerCase().includes(q);
}
function stats(im) { let best = -Infinity, kept = 0;
  for (const m of im.masks) for (const e of m.exprs) { if (e.surv) { kept++; best = Math.max(best, num(e.doc)); } }
  return {best, kept}; }
function apply() {
  const q = document.getElementById('q').value.trim().toLowerCase();
  const md = parseFloat(document.getElementById('mindoc').value); const minDoc = isNaN(md) ? -Infinity : md;
  const keptOnly = document.getElementById('kept').checked; const sort = document.getElementById('sort').value;
  view = DATA.images.filter(im => im.masks.some(m => m.exprs.some(e => exprMatches(e, q, minDoc, keptOnly, m.noun))));
  const key = {file: im => im.file, noun: im => (im.masks.map(m => m.noun).filter(Boolean).sort()[0] || '~')};
  if (sort === 'doc') view.sort((a, b) => stats(b).best - stats(a).best || a.n - b.n);
  else if (sort === 'kept') view.sort((a, b) => stats(b).kept - stats(a).kept || a.n - b.n);
  else view.sort((a, b) => key[sort](a) < key[sort](b) ? -1 : key[sort](a) > key[sort](b) ? 1 : a.n - b.n);
  page = 0; render(q, minDoc, keptOnly);
}
function render(q, minDoc, keptOnly) {
  const g = document.getElementById('gallery'); g.textContent = '';
  const pages = Math.max(1, Math.ceil(view.length / PAGE)); page = Math.min(page, pages - 1);
  for (const im of view.slice(page * PAGE, (page + 1) * PAGE)) {
    const masks = el('div', {class: 'masks'}, el('h3', {text: im.file + '  (' + im.masks.length + ' masks)'}));
    for (const m of im.masks) {
      const head = el('div', {}, el('span', {class: 'sw', style: 'background:' + m.color}),
                      el('b', {text: 'mask ' + m.k + (m.noun ? ' · ' + m.noun : '')}));
      if (m.dropped) head.appendChild(el('span', {class: 'tag', text: 'dropped: ' + m.dropped}));
      if (m.fallback) head.appendChild(el('span', {class: 'tag', text: 'fallback: ' + m.fallback}));
      const ul = el('ul');
      for (const e of m.exprs) {
        const hit = (q || minDoc > -Infinity || keptOnly) && exprMatches(e, q, minDoc, keptOnly, m.noun);
        const txt = e.t + (e.n > 1 ? ' ×' + e.n : '');
        const li = el('li', {class: (e.surv ? 'kept' : 'dropped') + (hit ? ' match' : '')},
                      e.surv ? el('span', {class: 'expr', text: txt}) : el('s', {class: 'expr', text: txt}),
                      el('span', {class: 'doc', text: 'DoC ' + fmt(e.doc)}));
        ul.appendChild(li);
      }
      masks.appendChild(el('div', {class: 'mask'}, head, ul));
    }
    g.appendChild(el('div', {class: 'item', 'data-file': im.file},
                     el('img', {src: im.src, alt: im.file, width: im.w, height: im.h}), masks));
  }
  document.getElementById('pageinfo').textContent =
    'page ' + (page + 1) + ' / ' + pages + ' · ' + view.length + ' of ' + DATA.images.length + ' images';
  document.body.setAttribute('data-rendered', String(g.children.length));
}
function fromHash() { const h = new URLSearchParams(location.hash.slice(1));
  if (h.has('q')) document.getElementById('q').value = h.get('q');
  if (h.has('mindoc')) document.getElementById('mindoc').value = h.get('mindoc');
  if (h.has('kept')) document.getElementById('kept').checked = h.get('kept') === '1';
  if (h.has('sort')) document.getElementById('sort').value = h.get('sort');
  return Math.max(0, (parseInt(h.get('page') || '1', 10) || 1) - 1); }
for (const id of ['q', 'mindoc', 'kept', 'sort']) document.getElementById(id).addEventListener('input', apply);
document.getElementById('prev').onclick = () => { if (page > 0) { page--; render(...args()); } };
document.getElementById('next').onclick = () => { page++; render(...args()); };
function args() { const q = document.getElementById('q').value.trim().toLowerCase();
  const md = parseFloat(document.getElementById('mindoc').value);
  return [q, isNaN(md) ? -Infinity : md, document.getElementById('kept').checked]; }
window.addEventListener('load', () => { document.body.setAttribute('data-images-loaded',
  String([...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0).length)); });
const startPage = fromHash(); apply(); if (startPage) { page = startPage; render(...args()); }
"""


def _page(title: str, card: dict | None, data: dict, failures: list[dict]) -> str:
    blob = json.dumps(data, ensure_ascii=False, sort_keys=True, allow_nan=False, separators=(",", ":"))
    blob = blob.replace("</", "<\\/")
    fails = ""
    if failures:
        items = "".join(f"<li>{html.escape(str(f.get('file_name') or f.get('image_id')))}: "
                        f"{html.escape(str(f.get('error')))}</li>" for f in failures)
        fails = f"<details id='failures'><summary>{len(failures)} failed image(s)</summary><ul>{items}</ul></details>"
    if data["n_ok"] > len(data["images"]):
        fails = (f"<p id='truncated'>showing the first {len(data['images'])} of {data['n_ok']} images "
                 "(report max_images)</p>") + fails
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body data-rendered="0">
<h1>{html.escape(title)}</h1>
{_card_table(card)}
{fails}
<div id="controls">
<input id="q" type="search" placeholder="filter: noun or expression">
<label>min DoC <input id="mindoc" type="number" step="0.1" style="width:6em"></label>
<label><input id="kept" type="checkbox"> kept only</label>
<label>sort <select id="sort"><option value="file">file</option><option value="doc">highest DoC</option>
<option value="kept">most kept expressions</option><option value="noun">noun</option></select></label>
<span id="pager"><button id="prev">&#8592;</button><span id="pageinfo"></span><button id="next">&#8594;</button></span>
</div>
<p style="font-size:12px;color:#555">Kept expressions (green, DoC &gt; 1 or the fallback) are the training
sentences; struck-through ones were dropped by the distinctiveness filter. DoC = the degree of
distinctiveness (∞: no other mask scored).</p>
<div id="gallery"></div>
<script type="application/json" id="data">{blob}</script>
<script>{_JS}</script>
</body></html>
"""


def write_report(filter_dir, out_dir, card: dict | None = None, failures: list[dict] | None = None,
                 images_dir=None, max_side: int = 320, title: str = "Pseudo-RIS pseudo-supervision",
                 progress: bool = True, max_images: int | None = None) -> Path:
    """Write ``<out_dir>/report.html`` + ``<out_dir>/report_files/`` from the filter records of ``filter_dir``.

    Arguments:
      filter_dir: the filter step's output (``records.jsonl``).
      card: the export's dataset card (its counts go at the top).
      failures: extra ``[{"image_id", "file_name", "error"}]`` (e.g. images the masks step could not read);
        the filter records' own errors are added.
      images_dir: where images are when a record's ``path`` is missing.
      max_images: put only the first N ok images in the page (its data is ~20 KB per image with 10 masks x
        30 distinct captions: 2,000 images -> ~47 MB, which Chromium opens in ~3 s of CPU); None = all.
    Returns the path of ``report.html``.
    """
    from PIL import Image
    from tqdm import tqdm

    out_dir = Path(out_dir)
    files = out_dir / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    records = list(engine.read_records(filter_dir))
    fails = list(failures or [])
    images = []
    n_ok = sum(r.get("status") == "ok" for r in records)
    for n, rec in enumerate(tqdm(records, desc="report", unit="img", disable=not progress)):
        if rec.get("status") == "ok" and max_images is not None and len(images) >= max_images:
            continue
        if rec.get("status") != "ok":
            fails.append({"image_id": rec["image_id"], "file_name": rec.get("file_name"), "error": rec.get("error")})
            continue
        path = Path(rec["path"]) if rec.get("path") else Path(images_dir or ".") / rec["file_name"]
        h, w = int(rec["height"]), int(rec["width"])
        try:
            image = load_image_rgb(path)
        except Exception as e:  # noqa: BLE001 - the report lists it instead of stopping
            fails.append({"image_id": rec["image_id"], "file_name": rec.get("file_name"),
                          "error": f"report: {type(e).__name__}: {e}"})
            continue
        ms = rec.get("masks") or []
        overlay = render_overlay(image, [decode_segmentation(m["segmentation"], h, w) for m in ms], max_side)
        name = f"{n:06d}.jpg"
        Image.fromarray(overlay).save(files / name, quality=88)
        images.append({"n": n, "id": str(rec["image_id"]), "file": str(rec.get("file_name") or rec["image_id"]),
                       "src": f"{FILES_DIR}/{name}", "w": int(overlay.shape[1]), "h": int(overlay.shape[0]),
                       "masks": [_mask_entry(k, m) for k, m in enumerate(ms)]})
    data = {"page_size": PAGE_SIZE, "images": images, "n_ok": n_ok}
    out = out_dir / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(_page(title, card, data, fails), encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["write_report", "render_overlay", "PALETTE", "FILES_DIR"]
