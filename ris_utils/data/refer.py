"""REFER-format datasets (RefCOCO / RefCOCO+ / RefCOCOg and ours): read, write, decode masks.

Layout (the one the REFER toolkit, LAVT, CRIS and ReLA read)::

    <data_root>/<dataset>/refs(<split_by>).p    pickle: list of refs
    <data_root>/<dataset>/instances.json        {"images", "annotations", "categories"}
    <data_root>/images/mscoco/images/train2014  images (or <data_root>/images/train2014)

A ref is ``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"tokens", "raw", "sent", "sent_id"}],
"sent_ids", "category_id", "file_name"}``. An annotation is ``{"id", "image_id", "category_id",
"bbox": [x, y, w, h], "area", "iscrowd", "segmentation"}``; we always WRITE the segmentation as a list
holding one COCO RLE dict with ``str`` counts (``[{"size": [h, w], "counts": "..."}]``), which the REFER
toolkit's ``getMask`` (``segmentation[0]`` of type list -> polygons, else RLE) decodes unchanged.

Split rules (as the REFER toolkit's ``getRefIds``): ``testA`` / ``testB`` / ``testC`` select refs whose
split contains that letter (so ``testAB`` is in both testA and testB), ``testAB`` / ``testBC`` / ``testAC``
match exactly, ``test`` selects every split containing ``"test"``, ``train`` / ``val`` match exactly.

Pickles can execute code when loaded: :func:`load_refer` only opens the ``refs(<split_by>).p`` file under
the ``data_root`` the caller names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from ris_utils.fileio import atomic_write
from ris_utils.layout import IMAGE_DIRS, image_dir, instances_path, refs_path

__all__ = [
    "ReferData",
    "decode_segmentation",
    "encode_mask",
    "image_dir",
    "load_refer",
    "make_annotation",
    "make_ref",
    "make_sentence",
    "refs_path",
    "instances_path",
    "select_split",
    "tokenize",
    "write_refer",
]

REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id", "file_name")
SENT_FIELDS = ("tokens", "raw", "sent", "sent_id")
IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANN_FIELDS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation")
CATEGORY_FIELDS = ("id", "name")

# IMAGE_DIRS (where :meth:`ReferData.image_path` looks when no ``image_root`` is given), image_dir, refs_path,
# instances_path: ris_utils.layout, re-exported here.

_LAYOUT_HINT = (
    "expected the REFER layout <data_root>/<dataset>/refs(<split_by>).p + <data_root>/<dataset>/instances.json "
    "(e.g. data/refcoco/refs(unc).p, data/refcocog/refs(umd).p)"
)


# --------------------------------------------------------------------------- masks


def encode_mask(mask: np.ndarray) -> dict:
    """Encode a binary mask as a COCO RLE dict with ``str`` counts (JSON-ready).

    Arguments:
      mask: HxW bool / uint8 / int array; nonzero = foreground.
    Returns:
      ``{"size": [h, w], "counts": str}`` (pycocotools compressed RLE, column-major as COCO).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask: mask must be HxW, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _to_rles(segmentation, height: int, width: int) -> list[dict]:
    """Any COCO segmentation -> list of compressed RLE dicts."""
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if not isinstance(segmentation, (list, tuple)) or len(segmentation) == 0:
        raise ValueError(
            f"segmentation must be polygons (list of lists), an RLE dict or a list of RLE dicts, got {segmentation!r:.80}")
    if isinstance(segmentation[0], (list, tuple)):  # polygons [[x1, y1, x2, y2, ...], ...]
        return mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
    rles = []
    for rle in segmentation:
        if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
            raise ValueError(f"segmentation entry must be an RLE dict with 'size' and 'counts', got {rle!r:.80}")
        if tuple(rle["size"]) != (height, width):
            raise ValueError(f"RLE size {list(rle['size'])} does not match the image size [{height}, {width}]")
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, height, width)
        rles.append(rle)
    return rles


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation to an HxW uint8 mask in {0, 1}.

    Accepts polygons (list of flat ``[x1, y1, x2, y2, ...]`` lists), a list of RLE dicts (our files and
    RefCOCO), a bare RLE dict, or an uncompressed RLE (``counts`` a list of ints). Like the REFER toolkit's
    ``getMask`` the parts are decoded and combined over the last axis; unlike it, overlapping parts give 1,
    not 2 (``getMask`` returns the sum).
    """
    rles = _to_rles(segmentation, int(height), int(width))
    m = mask_utils.decode(rles)  # HxWxN uint8
    if m.ndim == 3:
        m = m.max(axis=2)
    return np.ascontiguousarray(m, dtype=np.uint8)


def mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    """Tight ``[x, y, w, h]`` box of a binary HxW mask (pixel units, COCO convention); zeros if empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# --------------------------------------------------------------------------- builders


_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """REFER-style tokens: lowercase words (letters/digits, apostrophe suffixes kept), punctuation dropped."""
    return _TOKEN_RE.findall(str(text).lower())


def make_sentence(raw: str, sent_id: int) -> dict:
    """One REFER sentence: ``{"tokens", "raw", "sent", "sent_id"}``; ``sent`` = the tokens joined by spaces."""
    tokens = tokenize(raw)
    return {"tokens": tokens, "raw": str(raw), "sent": " ".join(tokens), "sent_id": int(sent_id)}


def make_annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, iscrowd: int = 0) -> dict:
    """A COCO/REFER annotation for a binary HxW mask: bbox (xywh) and area computed from the mask,
    segmentation written as ``[rle]`` (one COCO RLE dict with str counts)."""
    mask = np.asarray(mask) != 0
    return {
        "id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id),
        "bbox": mask_bbox_xywh(mask), "area": float(mask.sum()), "iscrowd": int(iscrowd),
        "segmentation": [encode_mask(mask)],
    }


def make_ref(ref_id: int, ann: dict, split: str, sentences: list[dict], file_name: str) -> dict:
    """A REFER ref for annotation ``ann`` with the given sentences (from :func:`make_sentence`)."""
    return {
        "ref_id": int(ref_id), "ann_id": int(ann["id"]), "image_id": int(ann["image_id"]), "split": str(split),
        "sentences": list(sentences), "sent_ids": [int(s["sent_id"]) for s in sentences],
        "category_id": int(ann["category_id"]), "file_name": str(file_name),
    }


# --------------------------------------------------------------------------- validation


def _check_fields(where: str, kind: str, items, fields: tuple[str, ...], key: str) -> None:
    if not isinstance(items, list):
        raise ValueError(f"{where}: {kind}s must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {kind} #{i} must be a dict, got {type(item).__name__}")
        for f in fields:
            if f not in item:
                name = item.get(key, f"#{i}")
                raise ValueError(f"{where}: {kind} {name} has no {f!r}")


def _validate(where_refs: str, where_inst: str, refs, images, annotations, categories) -> None:
    _check_fields(where_refs, "ref", refs, REF_FIELDS, "ref_id")
    for ref in refs:
        if not isinstance(ref["sentences"], list):
            raise ValueError(f"{where_refs}: ref {ref['ref_id']} 'sentences' must be a list")
        _check_fields(where_refs, f"ref {ref['ref_id']} sentence", ref["sentences"], SENT_FIELDS, "sent_id")
    _check_fields(where_inst, "image", images, IMAGE_FIELDS, "id")
    _check_fields(where_inst, "annotation", annotations, ANN_FIELDS, "id")
    _check_fields(where_inst, "category", categories, CATEGORY_FIELDS, "id")


# --------------------------------------------------------------------------- write


#: values kept as they are, without a call (exact types: numpy scalars subclass float / int and are converted)
_JSON_LEAVES = frozenset({str, int, float, bool, type(None)})


def _jsonable(x):
    if isinstance(x, dict):
        return {k: v if type(v) in _JSON_LEAVES else _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [v if type(v) in _JSON_LEAVES else _jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x.decode("ascii")
    return x


def _written_segmentation(ann: dict, where: str):
    """Segmentation as the REFER toolkit's getMask reads it: polygons as given, RLE as ``[rle]``."""
    seg = ann["segmentation"]
    if isinstance(seg, dict):
        seg = [seg]
    if not isinstance(seg, (list, tuple)) or not seg:
        raise ValueError(f"write_refer({where}): annotation {ann['id']} segmentation must be polygons, an RLE dict "
                         f"or a list of RLE dicts (use make_annotation(..., mask)), got {type(seg).__name__}")
    if isinstance(seg[0], dict):
        if any(not isinstance(r, dict) or "size" not in r or "counts" not in r for r in seg):
            raise ValueError(f"write_refer({where}): annotation {ann['id']} has an RLE without 'size'/'counts'")
        seg = [r if not isinstance(r["counts"], list) else
               mask_utils.frPyObjects(r, int(r["size"][0]), int(r["size"][1])) for r in seg]
    return list(seg)


def write_refer(out_root: str | os.PathLike, dataset: str, split_by: str, refs: list[dict], images: list[dict],
                annotations: list[dict], categories: list[dict]) -> Path:
    """Write a REFER-format dataset; returns ``out_root/<dataset>``.

    Writes ``refs(<split_by>).p`` (pickle, protocol 4, of the list of refs) and ``instances.json``
    (``{"images", "annotations", "categories"}``), each atomically (temp file + rename). Every field the
    REFER toolkit / LAVT / CRIS read is checked first (ValueError naming the item and the field); every
    ref's ``ann_id`` / ``image_id`` must exist. A bare RLE dict is written as ``[rle]``, uncompressed and
    bytes ``counts`` as compressed str, so the REFER toolkit's ``getMask`` decodes every annotation.

    Scripts built on the REFER toolkit (LAVT, CRIS) accept only the dataset names refcoco, refcoco+,
    refcocog, refclef: to feed them, write e.g. ``dataset="refcoco+", split_by="pseudo"``.
    """
    out = Path(out_root) / dataset
    rp, ip = refs_path(out_root, dataset, split_by), instances_path(out_root, dataset)
    _validate(f"write_refer({rp.name})", f"write_refer({ip.name})", refs, images, annotations, categories)
    ann_ids = {a["id"] for a in annotations}
    img_ids = {im["id"] for im in images}
    for ref in refs:
        if ref["ann_id"] not in ann_ids:
            raise ValueError(f"write_refer({rp.name}): ref {ref['ref_id']} names ann_id {ref['ann_id']} "
                             f"that is not among the annotations")
        if ref["image_id"] not in img_ids:
            raise ValueError(f"write_refer({rp.name}): ref {ref['ref_id']} names image_id {ref['image_id']} "
                             f"that is not among the images")
    annotations = [dict(a, segmentation=_written_segmentation(a, ip.name)) for a in annotations]
    refs = _jsonable(refs)
    instances = _jsonable({"images": images, "annotations": annotations, "categories": categories})
    atomic_write(ip, json.dumps(instances).encode("utf-8"))
    atomic_write(rp, pickle.dumps(refs, protocol=4))
    return out


# --------------------------------------------------------------------------- read


def select_split(refs: Iterable[dict], split: str) -> list[dict]:
    """The refs of ``split`` under the REFER toolkit's rules (see the module docstring)."""
    if split in ("testA", "testB", "testC"):
        return [r for r in refs if split[-1] in r["split"]]
    if split in ("testAB", "testBC", "testAC", "train", "val"):
        return [r for r in refs if r["split"] == split]
    if split == "test":
        return [r for r in refs if "test" in r["split"]]
    raise ValueError(f"no such split {split!r}: use train, val, test, testA, testB, testC, testAB, testBC or testAC")


@dataclass
class ReferData:
    """A loaded REFER dataset.

    Attributes:
      refs: list of refs (file order); imgs: {image_id: image}; anns: {ann_id: annotation};
      cats: {category_id: name}; sents: {sent_id: sentence}; ref_by_id: {ref_id: ref}.
    """

    data_root: Path
    dataset: str
    split_by: str
    refs: list[dict]
    imgs: dict[int, dict]
    anns: dict[int, dict]
    cats: dict[int, str]
    image_root: Path | None = None
    sents: dict[int, dict] = field(default_factory=dict)
    ref_by_id: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.ref_by_id = {r["ref_id"]: r for r in self.refs}
        self.sents = {s["sent_id"]: s for r in self.refs for s in r["sentences"]}

    def get_ref_ids(self, split: str | None = None, image_ids=None, cat_ids=None) -> list[int]:
        """Ref ids, filtered by image ids, category ids and split (REFER rules; None = no filter)."""
        refs = self.refs
        if image_ids is not None:
            ids = {image_ids} if isinstance(image_ids, (int, np.integer)) else set(image_ids)
            refs = [r for r in refs if r["image_id"] in ids]
        if cat_ids is not None:
            ids = {cat_ids} if isinstance(cat_ids, (int, np.integer)) else set(cat_ids)
            refs = [r for r in refs if r["category_id"] in ids]
        if split:
            refs = select_split(refs, split)
        return [r["ref_id"] for r in refs]

    def get_mask(self, ref_or_ann: dict) -> np.ndarray:
        """HxW uint8 {0, 1} mask of a ref (via its ann_id) or of an annotation."""
        ann = self.anns[ref_or_ann["ann_id"]] if "ann_id" in ref_or_ann else ref_or_ann
        img = self.imgs[ann["image_id"]]
        return decode_segmentation(ann["segmentation"], img["height"], img["width"])

    def image_path(self, image_id: int) -> Path:
        """Path of an image: in ``image_root`` if given, else the first of :data:`IMAGE_DIRS` holding it."""
        name = self.imgs[image_id]["file_name"]
        if self.image_root is not None:
            return Path(self.image_root) / name
        candidates = [self.data_root / d / name for d in IMAGE_DIRS]
        for c in candidates:
            if c.exists():
                return c
        raise FileNotFoundError(f"image {name} (id {image_id}) not found in any of "
                                f"{[str(c.parent) for c in candidates]}; pass image_root=")

    def image_items(self, split: str) -> list[dict]:
        """Unique images of the refs of ``split``, sorted by image_id:
        ``[{"image_id", "file_name", "path", "height", "width"}]`` (the engine's item list)."""
        ids = sorted({r["image_id"] for r in select_split(self.refs, split)})
        return [{"image_id": i, "file_name": self.imgs[i]["file_name"], "path": str(self.image_path(i)),
                 "height": self.imgs[i]["height"], "width": self.imgs[i]["width"]} for i in ids]

    def sentences(self, split: str) -> Iterator[tuple[dict, dict]]:
        """``(ref, sentence)`` for every sentence of every ref of ``split`` (one per evaluation sample)."""
        for ref in select_split(self.refs, split):
            for sent in ref["sentences"]:
                yield ref, sent


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, tuples, str, numbers, ...): REFER refs files hold nothing else,
    and any other global (a function, a class) -- what a crafted file needs to run code -- is refused."""

    ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int",
                                          "float", "bool", "complex", "bytearray")}
    ALLOWED |= {("__builtin__", n) for _, n in ALLOWED} | {("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (a refs file holds plain data only; "
                                     f"loading it could run code)")


def load_refer(data_root: str | os.PathLike, dataset: str, split_by: str,
               image_root: str | os.PathLike | None = None) -> ReferData:
    """Read ``<data_root>/<dataset>/refs(<split_by>).p`` + ``instances.json`` (RefCOCO family or ours).

    Raises FileNotFoundError naming the expected path, ValueError naming the file and the missing field.
    """
    data_root = Path(data_root)
    rp, ip = refs_path(data_root, dataset, split_by), instances_path(data_root, dataset)
    for p in (rp, ip):
        if not p.is_file():
            found = sorted(x.name for x in p.parent.glob("refs(*).p")) if p.parent.is_dir() else []
            have = f"; {p.parent} holds {found}" if found else ""
            raise FileNotFoundError(f"{p} not found: {_LAYOUT_HINT}{have}")
    try:
        with open(rp, "rb") as f:
            try:
                refs = SafeUnpickler(f).load()  # plain data only: a crafted file cannot run code
            except UnicodeDecodeError:  # a Python 2 pickle with non-ASCII str
                f.seek(0)
                refs = SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - report which file is broken
        raise ValueError(f"{rp}: not a readable refs pickle ({type(e).__name__}: {e})") from e
    try:
        instances = json.loads(ip.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{ip}: not valid JSON ({e})") from e
    if not isinstance(instances, dict):
        raise ValueError(f"{ip}: must hold a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if key not in instances:
            raise ValueError(f"{ip.name}: has no {key!r} (path {ip})")
    _validate(rp.name, ip.name, refs, instances["images"], instances["annotations"], instances["categories"])
    imgs = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        if ref["ann_id"] not in anns:
            raise ValueError(f"{rp.name}: ref {ref['ref_id']} names ann_id {ref['ann_id']} missing from {ip.name}")
        if ref["image_id"] not in imgs:
            raise ValueError(f"{rp.name}: ref {ref['ref_id']} names image_id {ref['image_id']} "
                             f"missing from {ip.name}")
    cats = {c["id"]: c["name"] for c in instances["categories"]}
    return ReferData(data_root=data_root, dataset=dataset, split_by=split_by, refs=refs, imgs=imgs, anns=anns,
                     cats=cats, image_root=Path(image_root) if image_root is not None else None)


def refer_statistics(data_root: str | os.PathLike, datasets: list[dict], pseudo_split: dict | None = None) -> dict:
    """Counts of a REFER-layout data root: ``data.<dataset>.<split>.{refs,sentences,images}``,
    ``data.train2014_images`` (files in the REFER image folder) and ``data.pseudo_images`` (unique images of
    ``pseudo_split = {dataset, split_by, split}``, the images step 1 runs on)."""
    root = Path(data_root)
    stats: dict = {}
    img_dir = root / IMAGE_DIRS[0]
    if img_dir.is_dir():
        stats["data.train2014_images"] = sum(1 for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    for d in datasets:
        data = load_refer(root, d["name"], d["split_by"])
        for split in sorted({r["split"] for r in data.refs}):
            refs = select_split(data.refs, split)
            stats[f"data.{d['name']}.{split}.refs"] = len(refs)
            stats[f"data.{d['name']}.{split}.sentences"] = sum(len(r["sentences"]) for r in refs)
            stats[f"data.{d['name']}.{split}.images"] = len({r["image_id"] for r in refs})
    if pseudo_split:
        data = load_refer(root, pseudo_split["dataset"], pseudo_split["split_by"])
        stats["data.pseudo_images"] = len({r["image_id"] for r in select_split(data.refs, pseudo_split["split"])})
    return stats
