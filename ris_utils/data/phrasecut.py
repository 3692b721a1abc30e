"""PhraseCut (VGPhraseCut, Wu et al. CVPR 2020) -> our REFER format, for the paper's unseen-domain benchmark.

Input: the folder the dataset's own downloader fills (``PhraseCutDataset/data/VGPhraseCut_v0``; the format
below was read from ChenyunWu/PhraseCutDataset ``README.md`` "Annotation data structure",
``utils/file_paths.py``, ``utils/refvg_loader.py``, ``utils/evaluator.py`` and ``utils/data_transfer.py``)::

    <root>/refer_<split>.json       list of tasks (split in train / val / test / miniv), each a dict with
                                    task_id, image_id, phrase, phrase_structure {name, attributes, ...},
                                    instance_boxes (xywh per instance) and Polygons: per instance a list
                                    of polygons, each a list of [x, y] points
    <root>/image_data_split.json    list of {image_id, width, height, split, ...}
    <root>/images/<image_id>.jpg    Visual Genome images

Output (read unchanged by :func:`ris_utils.data.refer.load_refer` and ``python -m ris_utils evaluate
--data OUT --dataset phrasecut --split-by phrasecut`` (or ``phrasecut_unseen``))::

    <out>/phrasecut/instances.json        one image per task image, ONE annotation per task
    <out>/phrasecut/refs(phrasecut).p      one ref per task (written unless unseen_only)
    <out>/phrasecut/refs(phrasecut_unseen).p   the tasks whose category is not a COCO category
    <out>/images -> <root>/images          symlink, so ReferData.image_path finds <image_id>.jpg

One ref per task: a PhraseCut phrase may refer to SEVERAL instances ("the cars on the left"); the ref's
annotation is the union of all the task's instance polygons as ONE binary mask, which is also what the
official evaluator compares against (it flattens every instance's polygons into one list). Each polygon is
rasterised as PhraseCut's ``polygons_to_mask`` does: points truncated to int, Pillow's ``ImageDraw.polygon``
with fill and outline, polygons with fewer than 2 points skipped, the union taken. sentences = [the phrase];
category = ``phrase_structure["name"]`` (categories table built from the names, ids 1.. in sorted order);
split = the PhraseCut split, except ``miniv`` which is written as ``val`` (the README: the val files leave
out the 100 miniv images, val + miniv is the whole validation set; and the REFER split rules in
:func:`ris_utils.data.refer.select_split` know only train/val/test). Each ref keeps ``task_id`` and
``phrasecut_split`` as extra fields.

Unseen subset (the paper: "the unseen subset excludes the 80 COCO categories"): a task is *seen* when its
category name, lowercased with runs of whitespace collapsed, equals one of :data:`COCO_CATEGORIES` either as
is or after simple plural stripping (a trailing ``"es"`` or ``"s"`` removed). No synonyms: "man", "woman",
"people" do not match "person" and so count as unseen, as in the public loaders that test
``name in COCO_CLASSES`` (we add only the plural rule).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ris_utils.data.refer import make_annotation, make_ref, make_sentence, write_refer

__all__ = ["COCO_CATEGORIES", "PHRASECUT_SPLITS", "cli", "convert", "is_coco_category", "polygons_to_mask",
           "prepare"]

#: The 80 COCO detection category names (instances_*.json "categories").
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
PHRASECUT_SPLITS = ("train", "val", "test", "miniv")
DATASET = "phrasecut"
SPLIT_BY = "phrasecut"
SPLIT_BY_UNSEEN = "phrasecut_unseen"
#: PhraseCut split -> REFER split written in the refs (select_split knows train / val / test only).
REFER_SPLIT = {"train": "train", "val": "val", "test": "test", "miniv": "val"}

_COCO_SET = frozenset(COCO_CATEGORIES)


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", str(name).strip().lower())


def is_coco_category(name: str) -> bool:
    """True when ``name`` is one of the 80 COCO categories: lowercase + whitespace collapsed, then exact, or
    after removing a trailing ``"es"`` or ``"s"`` (``"cars"`` -> car, ``"benches"`` -> bench)."""
    n = _norm(name)
    if n in _COCO_SET:
        return True
    return any(n.endswith(suf) and n[: -len(suf)] in _COCO_SET for suf in ("es", "s"))


def polygons_to_mask(instance_polygons, width: int, height: int) -> np.ndarray:
    """Union of polygons as an HxW uint8 {0, 1} mask, rasterised as PhraseCut's evaluator does.

    Arguments:
      instance_polygons: list (instances) of lists (polygons) of Px2 ``[x, y]`` point lists.
      width, height: image size in pixels.
    Points are truncated to int and each polygon drawn with Pillow ``ImageDraw.polygon(fill=1, outline=1)``
    (so boundary pixels are in); polygons with fewer than 2 points are skipped.
    """
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for polygons in instance_polygons:
        for poly in polygons:
            if len(poly) < 2:
                continue
            draw.polygon([(int(x), int(y)) for x, y in poly], fill=1, outline=1)
    return (np.asarray(canvas) > 0).astype(np.uint8)


# --------------------------------------------------------------------------- reading + validation


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}. Download PhraseCut with the dataset's own script "
                                f"(git clone https://github.com/ChenyunWu/PhraseCutDataset && python "
                                f"download_dataset.py) and pass its data/VGPhraseCut_v0 folder as --root")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _load_image_info(root: Path) -> dict[int, dict]:
    path = root / "image_data_split.json"
    data = _load_json(path, "the image list (image_id, width, height, split)")
    if not isinstance(data, list):
        raise ValueError(f"{path}: must hold a list of images, got {type(data).__name__}")
    out = {}
    for i, im in enumerate(data):
        if not isinstance(im, dict):
            raise ValueError(f"{path}: image #{i} must be a dict, got {type(im).__name__}")
        for f in ("image_id", "width", "height"):
            if f not in im:
                raise ValueError(f"{path}: image #{i} (image_id {im.get('image_id', '?')}) has no {f!r}")
        out[int(im["image_id"])] = im
    return out


def _check_polygons(path: Path, tid, polys) -> None:
    if not isinstance(polys, list) or not polys:
        raise ValueError(f"{path}: task {tid} 'Polygons' must be a non-empty list (one entry per instance), "
                         f"got {polys!r:.80}")
    for k, inst in enumerate(polys):
        if not isinstance(inst, list):
            raise ValueError(f"{path}: task {tid} 'Polygons'[{k}] must be a list of polygons")
        for j, poly in enumerate(inst):
            if not isinstance(poly, list) or any(
                    not isinstance(p, (list, tuple)) or len(p) != 2
                    or not all(isinstance(c, (int, float)) for c in p) for p in poly):
                raise ValueError(f"{path}: task {tid} 'Polygons'[{k}][{j}] must be a list of [x, y] numbers, "
                                 f"got {poly!r:.80}")


def _load_tasks(root: Path, split: str) -> tuple[Path, list[dict]]:
    path = root / f"refer_{split}.json"
    tasks = _load_json(path, f"the {split} task list")
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: must hold a list of tasks, got {type(tasks).__name__}")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise ValueError(f"{path}: task #{i} must be a dict, got {type(t).__name__}")
        tid = t.get("task_id", f"#{i}")
        for f in ("task_id", "image_id", "phrase", "phrase_structure", "Polygons"):
            if f not in t:
                raise ValueError(f"{path}: task {tid} has no {f!r} (refer_input_*.json files have no ground "
                                 f"truth: use refer_{split}.json)")
        ps = t["phrase_structure"]
        if not isinstance(ps, dict) or not isinstance(ps.get("name"), str) or not ps["name"].strip():
            raise ValueError(f"{path}: task {tid} 'phrase_structure' must be a dict with a non-empty 'name' "
                             f"(the category), got {ps!r:.80}")
        if not isinstance(t["phrase"], str) or not t["phrase"].strip():
            raise ValueError(f"{path}: task {tid} 'phrase' must be a non-empty string")
        _check_polygons(path, tid, t["Polygons"])
    return path, tasks


# --------------------------------------------------------------------------- convert


def convert(phrasecut_root, out_root, splits=("val", "test", "miniv"), unseen_only: bool = False,
            link_images: bool = True) -> dict:
    """Convert PhraseCut ``refer_<split>.json`` files into ``<out_root>/phrasecut`` (REFER format).

    Arguments:
      phrasecut_root: folder with refer_<split>.json, image_data_split.json, images/.
      out_root: REFER data root to write (``<out_root>/phrasecut/...``).
      splits: PhraseCut splits to convert (train / val / test / miniv; miniv is written as split ``val``).
      unseen_only: keep only tasks whose category is not a COCO category (:func:`is_coco_category`); then
        only ``refs(phrasecut_unseen).p`` is written (a stale ``refs(phrasecut).p`` there is removed, since
        instances.json then lacks the seen tasks' annotations). Otherwise both refs files are written.
      link_images: make ``<out_root>/images`` a symlink to ``<phrasecut_root>/images`` when absent.
    Returns:
      stats ``{"tasks", "refs", "refs_unseen", "images", "categories", "instances", "multi_instance",
      "per_split": {split: n_refs}, "out": str, "split_by": [...]}``.
    """
    root, out_root = Path(phrasecut_root), Path(out_root)
    bad = [s for s in splits if s not in PHRASECUT_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits={list(splits)!r}: choose among {list(PHRASECUT_SPLITS)}")
    info = _load_image_info(root)
    loaded = []
    for split in splits:
        path, tasks = _load_tasks(root, split)
        for t in tasks:
            if unseen_only and is_coco_category(t["phrase_structure"]["name"]):
                continue
            if int(t["image_id"]) not in info:
                raise ValueError(f"{path}: task {t['task_id']} names image_id {t['image_id']} that is not in "
                                 f"{root / 'image_data_split.json'}")
            loaded.append((split, t))

    names = sorted({_norm(t["phrase_structure"]["name"]) for _, t in loaded})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    categories = [{"id": cat_id[n], "name": n, "supercategory": "coco" if is_coco_category(n) else "unseen"}
                  for n in names]
    images, anns, refs = {}, [], []
    n_inst = multi = 0
    for k, (split, t) in enumerate(loaded, start=1):
        iid = int(t["image_id"])
        im = info[iid]
        w, h = int(im["width"]), int(im["height"])
        images.setdefault(iid, {"id": iid, "file_name": f"{iid}.jpg", "height": h, "width": w})
        mask = polygons_to_mask(t["Polygons"], w, h)
        ann = make_annotation(k, iid, cat_id[_norm(t["phrase_structure"]["name"])], mask)
        anns.append(ann)
        ref = make_ref(k, ann, REFER_SPLIT[split], [make_sentence(t["phrase"], k)], f"{iid}.jpg")
        ref.update(task_id=str(t["task_id"]), phrasecut_split=split)
        refs.append(ref)
        n_inst += len(t["Polygons"])
        multi += len(t["Polygons"]) > 1
    if not refs:
        raise ValueError(f"{root}: no task left to convert (splits={list(splits)}, unseen_only={unseen_only})")
    image_list = [images[i] for i in sorted(images)]
    unseen = [r for r in refs if not is_coco_category(names[r["category_id"] - 1])]
    written = []
    if not unseen_only:
        write_refer(out_root, DATASET, SPLIT_BY, refs, image_list, anns, categories)
        written.append(SPLIT_BY)
    else:
        (out_root / DATASET / f"refs({SPLIT_BY}).p").unlink(missing_ok=True)
    if unseen:
        write_refer(out_root, DATASET, SPLIT_BY_UNSEEN, unseen, image_list, anns, categories)
        written.append(SPLIT_BY_UNSEEN)
    link = out_root / "images"
    if link_images and not link.exists() and not link.is_symlink() and (root / "images").is_dir():
        os.symlink((root / "images").resolve(), link, target_is_directory=True)
    return {"tasks": len(refs), "refs": len(refs), "refs_unseen": len(unseen), "images": len(image_list),
            "categories": len(categories), "instances": n_inst, "multi_instance": multi,
            "per_split": dict(Counter(s for s, _ in loaded)), "out": str(out_root / DATASET),
            "split_by": written}


def prepare(cfg: dict) -> dict:
    """Profile hook: ``cfg`` with ``root`` (PhraseCut folder), ``out`` (REFER data root), optional
    ``splits`` and ``unseen_only``; returns :func:`convert`'s stats."""
    for key in ("root", "out"):
        if key not in cfg:
            raise ValueError(f"phrasecut.prepare: config has no {key!r} (PhraseCut folder / REFER data root)")
    return convert(cfg["root"], cfg["out"], tuple(cfg.get("splits") or ("val", "test", "miniv")),
                   bool(cfg.get("unseen_only")))


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils.data.phrasecut",
                                 description="Convert PhraseCut annotations into the REFER format.")
    ap.add_argument("--root", required=True, help="PhraseCut folder (data/VGPhraseCut_v0)")
    ap.add_argument("--out", required=True, help="REFER data root to write (<out>/phrasecut/...)")
    ap.add_argument("--splits", default="val,test,miniv", help="comma-separated PhraseCut splits")
    ap.add_argument("--unseen-only", action="store_true", help="keep only tasks outside the 80 COCO categories")
    args = ap.parse_args(argv)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    stats = convert(args.root, args.out, splits, unseen_only=args.unseen_only)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
