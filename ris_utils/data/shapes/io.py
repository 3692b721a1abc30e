"""The shapes world on disk: generating it (images, scenes.json, the REFER datasets and the toolkit view),
reading it back (scenes, object masks), notebook 00's :func:`prepare` and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ...profiles import step_config
from ...settings import Data, Shared, complete
from .. import refer
from .language import referee, referring_sentences
from .render import make_scene, shape_mask
from .world import (
    ANGULAR_SHAPES,
    DATASETS,
    DIRECTION_WORDS,
    IMAGE_SUBDIR,
    ROUND_SHAPES,
    SEEN_SHAPES,
    SHAPES,
    SPLIT_BY,
    SPLIT_FRACTIONS,
    SPLITS,
    TOOLKIT_VIEW,
    UNSEEN_SHAPES,
    WORLD_VERSION,
    Scene,
    ShapeObject,
)

logger = logging.getLogger(__name__)


def _split_counts(n_images) -> dict[str, int]:
    if isinstance(n_images, dict):
        unknown = set(n_images) - set(SPLITS)
        if unknown:
            raise ValueError(f"n_images: unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
        counts = {s: int(n_images.get(s, 0)) for s in SPLITS}
    else:
        total = int(n_images)
        counts = {s: int(total * SPLIT_FRACTIONS[s]) for s in SPLITS}
        counts["train"] += total - sum(counts.values())
    if any(v < 0 for v in counts.values()) or sum(counts.values()) == 0:
        raise ValueError(f"n_images must give a non-negative count per split and at least one image, got {n_images}")
    return counts


def _targets(split: str, dataset: str, obj: ShapeObject) -> bool:
    """Whether ``obj`` may be the target of a ref of ``dataset`` in an image of ``split``."""
    if dataset == "shapes-unseen":
        return obj.shape in (SEEN_SHAPES if split == "train" else UNSEEN_SHAPES)
    if split == "testA":
        return obj.shape in ROUND_SHAPES
    if split == "testB":
        return obj.shape in ANGULAR_SHAPES
    return True


def _ref_split(split: str, dataset: str) -> str:
    return "test" if dataset == "shapes-unseen" and split in ("testA", "testB") else split


_OWNED = ("images", "scenes.json", "manifest.json", *DATASETS, *TOOLKIT_VIEW)


def image_path(data_root, file_name: str) -> Path:
    """``<data_root>/images/train2014/<file_name>``: where the world keeps an image."""
    return Path(data_root) / IMAGE_SUBDIR / file_name


def _ours(p: Path) -> bool:
    return p.name.startswith("shapes_") and p.suffix == ".png"


def _clear(out_dir: Path) -> None:
    """Remove what a previous generation wrote (only the paths this module owns; also the flat
    ``images/shapes_*.png`` layout of world version 1)."""
    imgs = out_dir / "images"
    if imgs.is_dir():
        foreign = [str(p.relative_to(imgs)) for p in imgs.rglob("*")
                   if not (p.is_dir() and p.relative_to(imgs) == Path("train2014")) and not _ours(p)]
        if foreign:
            raise FileExistsError(f"{imgs} holds files the shapes world did not write ({foreign[:3]} ...); "
                                  f"choose another data_root / --out")
        shutil.rmtree(imgs)
    for name in _OWNED[1:]:
        p = out_dir / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def _link_or_copy(target: Path, link: Path) -> None:
    """A relative symlink ``link -> target`` (a copy where symlinks are not available)."""
    try:
        link.symlink_to(Path("..") / target.parent.name / target.name)
    except OSError:
        shutil.copyfile(target, link)


def write_toolkit_view(out_dir) -> dict:
    """Write the REFER toolkit's view of the three datasets (module docstring, :data:`TOOLKIT_VIEW`).

    Returns ``{toolkit dataset: (our dataset, toolkit split_by)}``."""
    out_dir = Path(out_dir)
    for name, (ours, split_by) in TOOLKIT_VIEW.items():
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        for target, link in ((refer.refs_path(out_dir, ours, SPLIT_BY), refer.refs_path(out_dir, name, split_by)),
                             (refer.instances_path(out_dir, ours), refer.instances_path(out_dir, name))):
            if not target.is_file():
                raise FileNotFoundError(f"{target} not found: generate the world before its toolkit view")
            if link.is_symlink() or link.exists():
                link.unlink()
            _link_or_copy(target, link)
    return dict(TOOLKIT_VIEW)


def _code_hash() -> str:
    """Hash of the generator's source (every module of this package): a changed generator never reuses a world
    written by the old one."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _file_checksum(out_dir: Path) -> tuple[str, int]:
    files = sorted(p for name in _OWNED if name != "manifest.json"
                   for p in ([out_dir / name] if (out_dir / name).is_file() else (out_dir / name).rglob("*"))
                   if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(out_dir)).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest(), len(files)


def generate_world(out_dir, n_images=None, seed: int = Shared.seed, image_size: int = Data.image_size) -> dict:
    """Generate the shapes world under ``out_dir`` (layout in the module docstring); returns statistics.

    Arguments:
      out_dir: the data root (created; files this module wrote before are replaced).
      n_images: ``{split: count}`` for train / val / testA / testB, or one total split by
        :data:`SPLIT_FRACTIONS`; default ``{"train": 600, "val": 150, "testA": 100, "testB": 100}``.
      seed: same seed -> byte-identical files.
      image_size: side S of the square images (>= 64).
    Returns:
      the dict of :func:`world_statistics`.
    """
    t0 = time.perf_counter()
    if n_images is None:
        n_images = Data().n_images
    counts = _split_counts(n_images)
    image_size = int(image_size)
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 (objects need room), got {image_size}")
    seed = int(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    (out_dir / IMAGE_SUBDIR).mkdir(parents=True)

    scenes: list[Scene] = []
    masks_by_image: dict[int, dict[int, np.ndarray]] = {}
    image_id, ann_id = 1, 1
    for si, split in enumerate(SPLITS):
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, si, i])
            scene, img, masks = make_scene(rng, image_id, split, image_size, ann_id)
            Image.fromarray(img).save(image_path(out_dir, scene.file_name), format="PNG", compress_level=1)
            scenes.append(scene)
            masks_by_image[image_id] = masks
            image_id += 1
            ann_id += len(scene.objects)

    images = [{"id": s.image_id, "file_name": s.file_name, "height": s.height, "width": s.width}
              for s in scenes]
    annotations = [refer.make_annotation(o.ann_id, s.image_id, o.category_id, masks_by_image[s.image_id][o.obj_id])
                   for s in scenes for o in s.objects]
    categories = [{"id": i + 1, "name": name, "supercategory": "round" if name in ROUND_SHAPES else "angular"}
                  for i, name in enumerate(SHAPES)]
    for di, dataset in enumerate(DATASETS):
        refs, ref_id, sent_id = [], 1, 1
        use_location = dataset != "shapes+"
        for s in scenes:
            rng = np.random.default_rng([seed, 1000 + di, s.image_id])
            for o in s.objects:
                if not _targets(s.split, dataset, o):
                    continue
                sents = referring_sentences(s, o, use_location, rng)
                if not sents:
                    continue
                sentences = [refer.make_sentence(t, sent_id + k) for k, t in enumerate(sents)]
                sent_id += len(sents)
                ann = {"id": o.ann_id, "image_id": s.image_id, "category_id": o.category_id}
                fname = f"{Path(s.file_name).stem}_{o.ann_id}.png"
                refs.append(refer.make_ref(ref_id, ann, _ref_split(s.split, dataset), sentences, fname))
                ref_id += 1
        refer.write_refer(out_dir, dataset, SPLIT_BY, refs, images, annotations, categories)
    write_toolkit_view(out_dir)
    (out_dir / "scenes.json").write_text(json.dumps(
        {"world": "shapes", "version": WORLD_VERSION, "image_size": image_size,
         "scenes": [s.to_json() for s in scenes]}, sort_keys=True))
    stats = world_statistics(out_dir, scenes)
    checksum, n_files = _file_checksum(out_dir)
    settings = {"seed": seed, "n_images": counts, "image_size": image_size, "code": _code_hash()}
    manifest = {"world": "shapes", "version": WORLD_VERSION, "settings": settings, "checksum": checksum,
                "n_files": n_files, "stats": stats}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    logger.info("shapes world: %d images in %.1f s -> %s", len(scenes), time.perf_counter() - t0, out_dir)
    return stats


def world_statistics(data_root, scenes: list[Scene] | None = None) -> dict:
    """Statistics of a generated world (numbers only; nested dicts of dotted-name parts).

    Keys: ``images.<split>``, ``objects``, ``objects_per_image``, ``same_shape_share``, ``same_color_share``
    (objects with another object of the same shape / same shape and colour in their image),
    ``twin_share`` (objects identical to another in all four attributes), ``refs.<dataset>.<split>``,
    ``sentences.<dataset>``, ``expression_length.<dataset>`` (mean words per sentence),
    ``location_share`` (share of ``shapes`` sentences with a location word), ``referable_share.<dataset>``
    (share of the objects of train+val images that have a ref in ``shapes`` / ``shapes+``).
    """
    data_root = Path(data_root)
    scenes = list(load_scenes(data_root).values()) if scenes is None else scenes
    stats: dict = {"images": {s: 0 for s in SPLITS}}
    n_obj = same_shape = same_color = twins = 0
    for s in scenes:
        stats["images"][s.split] += 1
        for o in s.objects:
            others = [p for p in s.objects if p.obj_id != o.obj_id]
            n_obj += 1
            same_shape += any(p.shape == o.shape for p in others)
            same_color += any(p.shape == o.shape and p.color == o.color for p in others)
            twins += any(p.attributes() == o.attributes() for p in others)
    stats["objects"] = n_obj
    stats["objects_per_image"] = round(n_obj / max(1, len(scenes)), 3)
    stats["same_shape_share"] = round(same_shape / max(1, n_obj), 4)
    stats["same_color_share"] = round(same_color / max(1, n_obj), 4)
    stats["twin_share"] = round(twins / max(1, n_obj), 4)
    stats["refs"], stats["sentences"], stats["expression_length"], stats["referable_share"] = {}, {}, {}, {}
    trainval = sum(len(s.objects) for s in scenes if s.split in ("train", "val"))
    for dataset in DATASETS:
        data = refer.load_refer(data_root, dataset, SPLIT_BY)
        splits = ("train", "val", "test") if dataset == "shapes-unseen" else SPLITS
        stats["refs"][dataset] = {sp: len(data.get_ref_ids(sp)) for sp in splits}
        sents = [s for r in data.refs for s in r["sentences"]]
        stats["sentences"][dataset] = len(sents)
        stats["expression_length"][dataset] = round(float(np.mean([len(s["tokens"]) for s in sents])), 3) \
            if sents else 0.0
        if dataset == "shapes":
            loc = {"left", "right", "top", "bottom", "middle", *DIRECTION_WORDS}
            stats["location_share"] = round(float(np.mean([bool(loc & set(s["tokens"])) for s in sents])), 4) \
                if sents else 0.0
        if dataset != "shapes-unseen":
            n = sum(1 for r in data.refs if r["split"] in ("train", "val"))
            stats["referable_share"][dataset] = round(n / max(1, trainval), 4)
    return stats


# --------------------------------------------------------------------------- reading


@lru_cache(maxsize=4)
def _load_scenes_cached(path: str, mtime: float) -> dict:
    d = json.loads(Path(path).read_text())
    return {s["image_id"]: Scene.from_json(s) for s in d["scenes"]}


def load_scenes(data_root) -> dict[int, Scene]:
    """``{image_id: Scene}`` from ``<data_root>/scenes.json`` (written by :func:`generate_world`)."""
    p = Path(data_root) / "scenes.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: generate the shapes world first "
                                f"(python -m ris_utils.data.shapes --out {data_root} or notebook 00)")
    return dict(_load_scenes_cached(str(p), p.stat().st_mtime))


@lru_cache(maxsize=2)
def _instances_by_image(path: str, mtime: float) -> dict[int, list[dict]]:
    inst = json.loads(Path(path).read_text())
    by_img: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    return by_img


def object_masks(source, image_id: int | None = None) -> dict[int, np.ndarray]:
    """``{obj_id: HxW uint8 {0,1} mask}`` of one scene's objects.

    ``source`` is a :class:`Scene` (masks re-rasterised from its geometry, identical to the written ones)
    or a data root together with ``image_id`` (masks decoded from ``<root>/shapes/instances.json`` with
    :func:`ris_utils.data.refer.decode_segmentation`).
    """
    if isinstance(source, Scene):
        return {o.obj_id: shape_mask(o.shape, o.center, o.radius, source.height, source.width).astype(np.uint8)
                for o in source.objects}
    if image_id is None:
        raise ValueError("object_masks(data_root, image_id): image_id is required with a data root")
    root = Path(source)
    scene = load_scenes(root).get(int(image_id))
    if scene is None:
        raise KeyError(f"image_id {image_id} is not in {root / 'scenes.json'}")
    ip = refer.instances_path(root, "shapes")
    if not ip.is_file():
        raise FileNotFoundError(f"{ip} not found: regenerate the shapes world under {root}")
    anns = {a["id"]: a for a in _instances_by_image(str(ip), ip.stat().st_mtime).get(int(image_id), [])}
    out = {}
    for o in scene.objects:
        if o.ann_id not in anns:
            raise ValueError(f"{ip}: no annotation {o.ann_id} for object {o.obj_id} of image {image_id}")
        out[o.obj_id] = refer.decode_segmentation(anns[o.ann_id]["segmentation"], scene.height, scene.width)
    return out


def match_object(mask: np.ndarray, masks: dict[int, np.ndarray] | Scene, min_iou: float = 0.5
                 ) -> tuple[int | None, float]:
    """The ground-truth object a predicted / proposed mask stands for (DESIGN.md, distinct rate).

    Arguments:
      mask: HxW binary mask.
      masks: ``{obj_id: HxW mask}`` (from :func:`object_masks`) or a :class:`Scene`.
      min_iou: below this best IoU the mask is "unmatched".
    Returns:
      ``(obj_id, iou)`` of the object with the highest IoU, or ``(None, best_iou)`` when it is < min_iou.
    """
    if isinstance(masks, Scene):
        masks = object_masks(masks)
    m = np.asarray(mask) != 0
    best, best_iou = None, 0.0
    for obj_id, gt in masks.items():
        g = np.asarray(gt) != 0
        if g.shape != m.shape:
            raise ValueError(f"match_object: mask shape {m.shape} != object {obj_id} mask shape {g.shape}")
        union = int(np.logical_or(m, g).sum())
        iou = int(np.logical_and(m, g).sum()) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = obj_id, iou
    return (best, best_iou) if best_iou >= min_iou else (None, best_iou)


class DistinctJudge:
    """The distinct-rate verdicts of candidates over one set of scenes, each computed once (DESIGN.md).

    ``mask_object(rec, m)`` = :func:`match_object` of a record's mask (memoised by image and segmentation),
    ``fits(image_id, text)`` = :func:`referee` of a sentence in the image's scene (memoised by image and
    text), ``is_distinct(image_id, text, obj)`` = ``obj is not None and fits(...) == {obj}``: the values of
    calling them every time, shared across the subsets, export rules and record sets of one split (the
    same masks and many of the same sentences). ``scenes``: :func:`load_scenes`.
    """

    def __init__(self, scenes: dict, min_iou: float = 0.5):
        self.scenes, self.min_iou = scenes, float(min_iou)
        self._matches: dict = {}
        self._fits: dict = {}
        self._gt: tuple = (None, None)  # (image_id, object masks) of the last image matched

    def scene(self, image_id, where: str) -> Scene:
        scene = self.scenes.get(image_id)
        if scene is None:
            raise KeyError(f"{where}: image {image_id} has no scene (wrong data_root?)")
        return scene

    def mask_object(self, rec: dict, m: dict) -> tuple[int | None, float]:
        """``(obj_id or None, iou)`` of mask ``m`` (a dict with ``segmentation``) of record ``rec``."""
        key = (rec["image_id"], int(rec["height"]), int(rec["width"]), json.dumps(m["segmentation"], sort_keys=True))
        hit = self._matches.get(key)
        if hit is None:
            if self._gt[0] != rec["image_id"]:
                self._gt = (rec["image_id"], object_masks(self.scene(rec["image_id"], "match")))
            mask = refer.decode_segmentation(m["segmentation"], rec["height"], rec["width"])
            hit = self._matches[key] = match_object(mask, self._gt[1], self.min_iou)
        return hit

    def fits(self, image_id, text: str) -> set[int]:
        """:func:`referee` of ``text`` in the scene of ``image_id`` (the memoised set: do not change it)."""
        key = (image_id, text)
        hit = self._fits.get(key)
        if hit is None:
            hit = self._fits[key] = referee(text, self.scene(image_id, "referee"))
        return hit

    def is_distinct(self, image_id, text: str, obj: int | None) -> bool:
        return obj is not None and self.fits(image_id, text) == {obj}

    @classmethod
    def of(cls, scenes, min_iou: float = 0.5) -> DistinctJudge:
        """``scenes`` itself when it is a judge (with the same ``min_iou``), else a new judge over them."""
        if isinstance(scenes, cls):
            if scenes.min_iou != float(min_iou):
                raise ValueError(f"DistinctJudge made with min_iou {scenes.min_iou}, asked for {min_iou}")
            return scenes
        return cls(scenes, min_iou)


# --------------------------------------------------------------------------- prepare / CLI


def prepare(cfg: dict) -> dict:
    """Notebook 00 / ``ris_utils.data.prepare`` entry: make the world exist under ``cfg["data_root"]``.

    Uses ``cfg["seed"]``, ``cfg["n_images"]``, ``cfg["image_size"]`` (``cfg["datasets"]``, if given, must
    name datasets this world writes). Skips generation when
    ``manifest.json`` records the same settings, world version and generator source hash and the files'
    checksum still matches.
    Returns the statistics of :func:`world_statistics` as flat keys (``data.images.train``,
    ``data.refs.shapes.val``, ``data.same_shape_share``, ...) plus ``data.world``, ``data.regenerated``
    (0/1) and ``data.seconds``.
    """
    if not cfg.get("data_root"):
        raise ValueError(f"data.data_root is not set (profile {cfg.get('profile')})")
    root = Path(cfg["data_root"])
    for d in cfg.get("datasets") or []:
        if d.get("name") not in DATASETS or d.get("split_by", SPLIT_BY) != SPLIT_BY:
            raise ValueError(f"data.datasets: the shapes world writes {list(DATASETS)} with split_by "
                             f"{SPLIT_BY!r}, got {d} (profile {cfg.get('profile')})")
    cfg = complete("data", cfg)
    counts = _split_counts(cfg["n_images"])
    settings = {"seed": int(cfg["seed"]), "n_images": counts, "image_size": int(cfg["image_size"]), "code": _code_hash()}
    t0 = time.perf_counter()
    mp = root / "manifest.json"
    if mp.is_file():
        try:
            manifest = json.loads(mp.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if (manifest.get("version") == WORLD_VERSION and manifest.get("settings") == settings
                and (manifest.get("checksum"), manifest.get("n_files")) == _file_checksum(root)):
            logger.info("shapes world under %s is up to date; not regenerated", root)
            return _flat_stats(manifest["stats"], regenerated=0, seconds=round(time.perf_counter() - t0, 3))
    stats = generate_world(root, counts, settings["seed"], settings["image_size"])
    return _flat_stats(stats, regenerated=1, seconds=round(time.perf_counter() - t0, 3))


def _flat_stats(stats: dict, **extra) -> dict:
    """Nested statistics -> flat ``data.<dotted>`` keys (as the other worlds' ``prepare`` return them)."""
    out = {"data.world": "shapes"}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk({**stats, **extra}, "data.")
    return out


def _parse_counts(text: str):
    if "=" not in text:
        return int(text)
    out = {}
    for part in text.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def cli(argv: list[str] | None = None) -> int:
    """``python -m ris_utils shapes --out DIR --n-images N --seed S`` (or ``--profile shapes``)."""
    ap = argparse.ArgumentParser(prog="python -m ris_utils shapes", description="Generate the shapes world "
                                 "(images, scenes.json and the REFER datasets shapes, shapes+, shapes-unseen).")
    ap.add_argument("--out", help="output data root (default: the profile's data_root)")
    ap.add_argument("--n-images", type=_parse_counts,
                    help="total images (split 64/16/10/10 over train/val/testA/testB) or "
                         "'train=600,val=150,testA=100,testB=100'")
    ap.add_argument("--seed", type=int, help="random seed (same seed -> byte-identical files; default 0)")
    ap.add_argument("--image-size", type=int, help="side of the square images in pixels (default 128)")
    ap.add_argument("--profile", help="take the defaults from papermill_runs/<profile>.yaml (data section)")
    args = ap.parse_args(argv)
    if args.profile:
        cfg = step_config(args.profile, "data", data_root=args.out, n_images=args.n_images, seed=args.seed,
                          image_size=args.image_size)
        stats = prepare(cfg)
    else:
        if not args.out:
            ap.error("--out DIR (or --profile NAME) is required")
        total = sum(Data().n_images.values())  # 950, split by SPLIT_FRACTIONS
        stats = generate_world(args.out, args.n_images or total, args.seed or Shared.seed, args.image_size or Data.image_size)
    print(json.dumps(stats, indent=1))
    return 0
