"""``--format hf``: the pseudo-supervision as a Hugging Face ``datasets`` dataset (parquet).

``<out>/data/train-00000-of-00001.parquet`` + ``<out>/README.md`` (a dataset card whose YAML header names
the split), one row per exported mask (= REFER ref)::

    ref_id, image_id, file_name, image (the image's path relative to <out>), height, width,
    mask_rle {"size": [h, w], "counts": str}  (COCO RLE; pycocotools.mask.decode reads it),
    bbox [x, y, w, h], noun (the mask's category: its head noun), expressions [str], doc [float]
    (each expression's degree of distinctiveness; inf where no other mask scored, NaN when unknown)

``datasets.load_dataset("<out>")`` (or ``load_dataset("parquet", data_files=...)``) reads it back offline;
the Hub takes the folder as is (``huggingface-cli upload``), images included by path, not embedded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ris_utils.data import refer as refer_io

DATA_FILE = "data/train-00000-of-00001.parquet"


def _features():
    from datasets import Features, List, Value

    return Features({
        "ref_id": Value("int64"), "image_id": Value("int64"), "file_name": Value("string"),
        "image": Value("string"), "height": Value("int32"), "width": Value("int32"),
        "mask_rle": {"size": List(Value("int32")), "counts": Value("string")},
        "bbox": List(Value("float64")), "noun": Value("string"),
        "expressions": List(Value("string")), "doc": List(Value("float64")),
    })


def _doc_value(x) -> float:
    if x is None:
        return math.nan
    if isinstance(x, str):  # the export writes "inf" / "-inf" for infinite DoC
        return float(x)
    return float(x)


def _docs_by_mask(export_dir: Path) -> dict:
    """``{(source image id as str, mask_index): {text: doc}}`` of the exported candidates."""
    out: dict = {}
    path = export_dir / "candidates.jsonl"
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            c = json.loads(line)
            if c.get("exported", c.get("survivor")):
                out.setdefault((str(c["image_id"]), c.get("mask_index")), {}).setdefault(c["text"], _doc_value(c.get("doc")))
    return out


def hf_rows(export_dir, out_dir) -> list[dict]:
    """The rows of the HF dataset of an export (see the module docstring)."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    card = json.loads((export_dir / "dataset_card.json").read_text())
    data = refer_io.load_refer(export_dir, card["dataset"], card["split_by"])
    docs = _docs_by_mask(export_dir)
    images = refer_io.image_dir(export_dir)  # the export's images/train2014 (the REFER toolkit's folder)
    rows = []
    for ref in data.refs:
        img = data.imgs[ref["image_id"]]
        ann = data.anns[ref["ann_id"]]
        seg = ann["segmentation"][0] if isinstance(ann["segmentation"], list) else ann["segmentation"]
        counts = seg["counts"].decode() if isinstance(seg["counts"], bytes) else seg["counts"]
        texts = [s["sent"] for s in ref["sentences"]]
        by_text = docs.get((str(img.get("original_id", ref["image_id"])), ref.get("mask_index")), {})
        image_path = os.path.relpath(images / img["file_name"], out_dir)
        rows.append({"ref_id": int(ref["ref_id"]), "image_id": int(ref["image_id"]), "file_name": img["file_name"],
                     "image": Path(image_path).as_posix(), "height": int(img["height"]), "width": int(img["width"]),
                     "mask_rle": {"size": [int(v) for v in seg["size"]], "counts": counts},
                     "bbox": [float(v) for v in ann["bbox"]], "noun": data.cats.get(ref["category_id"], "object"),
                     "expressions": texts, "doc": [by_text.get(t, math.nan) for t in texts]})
    return rows


def _readme(card: dict, n_rows: int) -> str:
    c = card.get("counts", {})
    return "\n".join([
        "---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
        "    path: data/train-*.parquet", "task_categories:", "- image-segmentation", "tags:",
        "- referring-image-segmentation", "- pseudo-ris", "---", "",
        f"# Pseudo-RIS pseudo-supervision: {card.get('name', '')}", "",
        "Referring expressions + masks generated without manual labels (SAM masks -> CoCa distinctive captions "
        "-> CLIP DoC filtering), by the pseudo-ris package. One row per mask: `mask_rle` (COCO RLE), "
        "`expressions`, their `doc` (degree of distinctiveness), `noun`; `image` is the image's path "
        "relative to this folder.", "",
        f"- rows (masks): {n_rows}", f"- images with refs: {c.get('images_with_refs')}",
        f"- expressions: {c.get('expressions')}", "",
        "```python", "from datasets import load_dataset", "ds = load_dataset(\"path/to/this/folder\")[\"train\"]",
        "```", ""])


def write_hf(export_dir, out_dir) -> dict:
    """Write the HF dataset of the export ``export_dir`` to ``out_dir`` (parquet + README.md); returns counts."""
    from datasets import Dataset

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    card = json.loads((export_dir / "dataset_card.json").read_text())
    rows = hf_rows(export_dir, out_dir)
    path = out_dir / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar for one small parquet write is noise
    try:
        Dataset.from_list(rows, features=_features()).to_parquet(str(tmp))
    finally:
        if bars:
            datasets.enable_progress_bars()
    os.replace(tmp, path)
    (out_dir / "README.md").write_text(_readme(card, len(rows)))
    return {"dir": str(out_dir), "rows": len(rows), "parquet": str(path)}


__all__ = ["write_hf", "hf_rows", "DATA_FILE"]
