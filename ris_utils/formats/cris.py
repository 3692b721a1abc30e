"""``--format cris``: the layout CRIS / ETRIS's ``tools/data_process.py`` writes from REFER data.

``python tools/data_process.py --data_root <export> --dataset refcoco+ --split pseudo --generate_mask``
(CRIS.pytorch, ETRIS) reads the REFER files with the toolkit's ``refer.py`` and writes, per split of the
dataset family (refcoco / refcoco+: train, val, testA, testB; refcocog: train, val, test; another name: the
splits present), ``<out>/anns/<dataset>/<split>.json``, a JSON list (``json.dump`` defaults) of::

    {"bbox": [x1, y1, x2, y2],        # ints: int(x), int(y), int(x) + int(w), int(y) + int(h) of the ann's box
     "cat": c,                        # the ref's category_id through the COCO 91 -> 80 index compaction
     "segment_id": ref_id, "img_name": file_name,
     "sentences": [{"idx": k, "sent_id": id, "sent": text.strip()}], "sentences_num": n}

in the order of the refs file, and ``<out>/masks/<dataset>/<segment_id>.png`` (8-bit grey, 0 / 255, the
REFER toolkit's ``getMask``). :func:`write_cris` writes the same from an export folder without OpenCV or the
toolkit (``tests/test_formats.py`` checks it against a re-implementation of that script's logic). Their
``folder2lmdb.py`` then reads ``anns/<dataset>/train.json``, the images (``<export>/images/train2014``) and
these masks. Note: ``cat`` of pseudo categories (head nouns numbered 1..K) means nothing after the COCO
compaction, exactly as it would through data_process.py; CRIS does not train on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ris_utils.data import refer as refer_io

#: the ids COCO's 91-category numbering skips (the 80 used ids are compacted to 0..79 by CRIS)
_COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
#: the splits data_process.py writes per dataset family
_FAMILY_SPLITS = {"refcoco": ("train", "val", "testA", "testB"), "refcoco+": ("train", "val", "testA", "testB"),
                  "refcocog": ("train", "val", "test")}
_REFCLEF_SKIPPED = ("19579.jpg", "17975.jpg", "19575.jpg")


def coco_cat_index(cat: int) -> int:
    """COCO category id (1..90) -> contiguous index (0..79), as data_process.py's ``cat_process``; ids outside
    the used COCO ids are returned unchanged (as there)."""
    cat = int(cat)
    if 1 <= cat <= 90 and cat not in _COCO_MISSING_IDS:
        return cat - 1 - sum(m < cat for m in _COCO_MISSING_IDS)
    return cat


def bbox_xyxy(bbox) -> list[int]:
    """REFER xywh box -> CRIS ints ``[int(x), int(y), int(x) + int(w), int(y) + int(h)]``."""
    x, y = int(bbox[0]), int(bbox[1])
    return [x, y, x + int(bbox[2]), y + int(bbox[3])]


def splits_for(dataset: str, split_by: str, refs) -> list[str]:
    if dataset == "refclef":
        return ["train", "val", "testA", "testB", "testC"] if split_by == "unc" else ["train", "val", "test"]
    if dataset in _FAMILY_SPLITS:
        return list(_FAMILY_SPLITS[dataset])
    return sorted({r["split"] for r in refs})


def write_cris(export_dir, out_dir, dataset: str | None = None, split_by: str | None = None,
               progress: bool = False) -> dict:
    """Write ``<out_dir>/anns/<dataset>/<split>.json`` + ``<out_dir>/masks/<dataset>/<segment_id>.png`` from the
    REFER export ``export_dir`` (dataset / split_by from its dataset card unless given). Returns counts."""
    from PIL import Image
    from tqdm import tqdm


    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if dataset is None or split_by is None:
        card = json.loads((export_dir / "dataset_card.json").read_text())
        dataset, split_by = dataset or card["dataset"], split_by or card["split_by"]
    data = refer_io.load_refer(export_dir, dataset, split_by)
    ann_dir, mask_dir = out_dir / "anns" / dataset, out_dir / "masks" / dataset
    ann_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits_for(dataset, split_by, data.refs):
        rows = []
        sel = refer_io.select_split(data.refs, split)
        for ref in tqdm(sel, desc=f"cris {split}", unit="ref", disable=not (progress and sel)):
            img = data.imgs[ref["image_id"]]
            if dataset == "refclef" and img["file_name"] in _REFCLEF_SKIPPED:
                continue
            ann = data.anns[ref["ann_id"]]
            mask = (data.get_mask(ref).astype(np.uint8) * 255).astype(np.uint8)
            Image.fromarray(mask).save(mask_dir / f"{ref['ref_id']}.png")
            sents = [{"idx": k, "sent_id": s["sent_id"], "sent": s["sent"].strip()}
                     for k, s in enumerate(ref["sentences"])]
            rows.append({"bbox": bbox_xyxy(ann["bbox"]), "cat": coco_cat_index(ref["category_id"]),
                         "segment_id": ref["ref_id"], "img_name": img["file_name"], "sentences": sents,
                         "sentences_num": len(sents)})
        with open(ann_dir / f"{split}.json", "w") as f:
            json.dump(rows, f)
        counts[split] = len(rows)
    return {"dir": str(out_dir), "dataset": dataset, "refs_per_split": counts,
            "anns": str(ann_dir), "masks": str(mask_dir)}


__all__ = ["write_cris", "coco_cat_index", "bbox_xyxy", "splits_for"]
