"""The paper-tiny world: a few real photos (scikit-image's bundled samples) + a hand-written REFER dataset.

The ``paper-tiny`` profile runs the paper profile's code path (SAM AMG + selector, 4 views x 11 candidates
with distinctive sampling, CLIP DoC filtering, export, CRIS-style training and evaluation) with tiny
random-init models. Its data must look exactly like RefCOCO to that code, so :func:`prepare` writes::

    <data_root>/images/mscoco/images/train2014/sample_<name>.jpg    the photos (longest side max_side)
    <data_root>/<dataset>/refs(<split_by>).p + instances.json      the same refs for every dataset named

The ground-truth masks are derived deterministically from each photo with hand-placed shapes (ellipses and
polygons in the photo's original pixel coordinates, ``skimage.draw``) and simple thresholding (Otsu on the
coins (components touching the border dropped), a dark threshold on the cameraman, hue ranges on the scikit-image logo), then resized with the photo
(nearest neighbour). The phrases are hand-written. Splits are by image, as in RefCOCO: ``train`` = coffee,
coins, rocket (the unlabeled images pseudo-supervision is generated for), ``val`` = chelsea, ``testA`` =
astronaut, cameraman (people, as RefCOCO's testA), ``testB`` = logo (objects, as testB).

This set proves the wiring, not the quality: with random-init models the numbers mean nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ris_utils import settings
from ris_utils.layout import IMAGE_DIRS
from ris_utils.models import init_uninitialised, quiet_random_init, register_open_clip_configs

from .refer import make_annotation, make_ref, make_sentence, refer_statistics, write_refer

logger = logging.getLogger(__name__)

IMAGE_DIR = IMAGE_DIRS[0]

#: photo -> split (the REFER split every ref of that photo gets)
SPLITS = {"coffee": "train", "coins": "train", "rocket": "train", "chelsea": "val", "astronaut": "testA",
          "camera": "testA", "logo": "testB"}

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}, {"id": 3, "name": "plate"},
              {"id": 4, "name": "spoon"}, {"id": 5, "name": "coin"}, {"id": 6, "name": "rocket"},
              {"id": 7, "name": "tower"}, {"id": 8, "name": "cat"}, {"id": 9, "name": "flag"},
              {"id": 10, "name": "helmet"}, {"id": 11, "name": "shape"}, {"id": 12, "name": "nose"},
              {"id": 13, "name": "camera"}]
_CAT = {c["name"]: c["id"] for c in CATEGORIES}


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as HxWx3 uint8 RGB (gray -> 3 channels, RGBA composited on white)."""
    import skimage.data

    if name not in SPLITS:
        raise ValueError(f"unknown sample photo {name!r}; available: {', '.join(SPLITS)}")
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = (img[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


# --------------------------------------------------------------------------- mask helpers (HxW bool)


def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    from skimage.draw import ellipse

    m = np.zeros(shape[:2], bool)
    rr, cc = ellipse(cy, cx, ry, rx, shape=shape[:2])
    m[rr, cc] = True
    return m


def _polygon(shape, xy: list[tuple[float, float]]) -> np.ndarray:
    """Filled polygon from ``[(x, y), ...]`` vertices."""
    from skimage.draw import polygon

    m = np.zeros(shape[:2], bool)
    xs, ys = zip(*xy)
    rr, cc = polygon(ys, xs, shape=shape[:2])
    m[rr, cc] = True
    return m


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, lab, index=range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def _objects(name: str, img: np.ndarray) -> list[tuple[str, np.ndarray, list[str]]]:
    """``[(category, HxW bool mask, [phrases])]`` for one photo, in original pixel coordinates."""
    s = img.shape
    gray = img.astype(np.float32).mean(axis=2)
    if name == "coffee":
        cup = _ellipse(s, 140, 290, 125, 118) | _ellipse(s, 268, 228, 34, 30)
        spoon = _ellipse(s, 285, 366, 40, 38) | _polygon(s, [(400, 68), (423, 72), (386, 250), (369, 250)])
        saucer = _ellipse(s, 235, 278, 150, 202) & ~cup & ~spoon
        return [("cup", cup, ["the white coffee cup", "a cup of espresso"]),
                ("plate", saucer, ["the red saucer under the cup"]),
                ("spoon", spoon, ["the small silver spoon"])]
    if name == "coins":
        from scipy import ndimage
        from skimage.filters import threshold_otsu

        fg = ndimage.binary_opening(gray > threshold_otsu(gray), iterations=2)
        fg = ndimage.binary_fill_holes(fg)
        lab, n = ndimage.label(fg)
        comps = [lab == i for i in range(1, n + 1)]
        comps = [c for c in comps if c.sum() >= 300 and not (c[0].any() or c[-1].any() or c[:, 0].any()
                                                             or c[:, -1].any())]  # the bright top border is not a coin
        largest = max(comps, key=lambda c: c.sum())
        top_left = min(comps, key=lambda c: (np.nonzero(c)[0].mean() + np.nonzero(c)[1].mean()))
        bottom_right = max(comps, key=lambda c: (np.nonzero(c)[0].mean() + np.nonzero(c)[1].mean()))
        return [("coin", largest, ["the largest coin"]),
                ("coin", top_left, ["the coin in the top left corner"]),
                ("coin", bottom_right, ["the coin at the bottom right"])]
    if name == "rocket":
        rocket = _polygon(s, [(305, 150), (337, 150), (337, 405), (305, 405)]) | _ellipse(s, 152, 321, 26, 16)
        right = _polygon(s, [(560, 0), (598, 0), (640, 60), (640, 427), (570, 427)])
        left = _polygon(s, [(45, 0), (90, 0), (82, 427), (0, 427), (0, 300)])
        return [("rocket", rocket, ["the white rocket on the launch pad"]),
                ("tower", right, ["the steel tower on the right"]),
                ("tower", left, ["the lattice tower on the left"])]
    if name == "chelsea":
        cat = _polygon(s, [(0, 0), (395, 0), (362, 150), (392, 300), (0, 300)])
        nose = _ellipse(s, 240, 262, 15, 25)
        return [("cat", cat & ~nose, ["the tabby cat"]), ("nose", nose, ["the cat's pink nose"])]
    if name == "astronaut":
        person = _polygon(s, [(150, 20), (300, 20), (305, 150), (360, 290), (365, 512), (20, 512), (30, 300),
                              (110, 200), (150, 150)])
        helmet = _ellipse(s, 430, 392, 88, 115)
        flag = _polygon(s, [(0, 0), (60, 0), (95, 200), (70, 260), (30, 300), (20, 512), (0, 512)]) & ~person
        return [("person", person & ~helmet, ["the woman in the orange suit", "the smiling astronaut"]),
                ("helmet", helmet, ["the black helmet"]),
                ("flag", flag, ["the american flag"])]
    if name == "camera":
        man = _largest_component((gray < 50) & _polygon(s, [(0, 60), (420, 60), (420, 512), (0, 512)]))
        cam = _polygon(s, [(250, 138), (325, 138), (325, 188), (250, 188)])
        return [("person", man, ["the man in the black coat"]), ("camera", cam & ~man, ["the camera"])]
    if name == "logo":
        import skimage.color

        hsv = skimage.color.rgb2hsv(img)
        sat = hsv[..., 1] > 0.35
        green = _largest_component(sat & (hsv[..., 0] > 0.15) & (hsv[..., 0] < 0.45))
        orange = _largest_component(sat & (hsv[..., 0] < 0.12))
        return [("shape", green, ["the green half of the circle"]), ("shape", orange, ["the orange half"])]
    raise ValueError(f"no objects defined for photo {name!r}")


def build_samples(max_side: int = 320, photos: list[str] | None = None):
    """The photos, their masks and refs, in memory.

    Returns ``(photos, refs, images, annotations)``: ``photos`` = ``{file_name: HxWx3 uint8}``; the other
    three are REFER lists (see :mod:`ris_utils.data.refer`). Deterministic: same arguments, same output.
    """
    from PIL import Image

    photos = list(photos or SPLITS)
    out_photos, refs, images, anns = {}, [], [], []
    sent_id = 0
    for image_id, name in enumerate(photos, start=1):
        img = load_photo(name)
        objs = _objects(name, img)
        h, w = img.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
        file_name = f"sample_{name}.jpg"
        out_photos[file_name] = img
        images.append({"id": image_id, "file_name": file_name, "height": nh, "width": nw})
        for k, (cat, mask, phrases) in enumerate(objs):
            if (nh, nw) != (h, w):
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 127
            if mask.sum() == 0:
                raise RuntimeError(f"sample photo {name}: object {k} ({cat}) has an empty mask")
            ann = make_annotation(image_id * 100 + k, image_id, _CAT[cat], mask)
            sents = []
            for p in phrases:
                sents.append(make_sentence(p, sent_id))
                sent_id += 1
            refs.append(make_ref(len(refs), ann, SPLITS[name], sents, file_name))
            anns.append(ann)
    return out_photos, refs, images, anns


def write_random_checkpoint(model: str, path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random-init open_clip ``model`` (one of our ``model_configs``) as a checkpoint file.

    paper-tiny loads it with ``pretrained: <this file>``, i.e. through open_clip's own ``pretrained=``
    mechanism for local checkpoints -- the path the paper profile takes for the authors' CC3M CoCa. (A CoCa
    built with ``pretrained=None`` is not usable as is: open_clip 3.3.0 leaves ``text_decoder.text_projection``
    uninitialised (``torch.empty``); it gets its intended normal init here, so the file is deterministic.)
    Writes ``{"state_dict": ...}`` and a ``<file>.json`` card (model, seed) beside it; returns the path.
    """
    import json

    import open_clip
    import torch

    register_open_clip_configs()
    path = Path(path)
    card = {"model": model, "seed": int(seed), "kind": "random init (paper-tiny)", "open_clip": open_clip.__version__}
    card_file = path.with_name(path.name + ".json")  # x.pt.json: not the x.json card of our trained models
    if path.is_file() and card_file.is_file() and json.loads(card_file.read_text()) == card:
        return path
    torch.manual_seed(int(seed))
    with quiet_random_init():  # random on purpose: the card says so
        net = open_clip.create_model(model, pretrained=None, device="cpu")
    if hasattr(net, "text_decoder"):
        init_uninitialised(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": net.state_dict()}, tmp)
    tmp.replace(path)
    card_file.write_text(json.dumps(card, indent=2))
    return path


def prepare(cfg: dict) -> dict:
    """``data.world: samples`` (the paper-tiny profile): write the photos and the REFER dataset(s).

    Keys read from ``cfg``: ``data_root``; ``datasets`` (list of ``{name, split_by}``; the same refs are
    written under each, default ``[{name: refcoco+, split_by: unc}]``); ``photos`` (names, default all of
    :data:`SPLITS`); ``max_side`` (default 320); ``pseudo_split`` (as for the paper profile);
    ``random_checkpoints`` (list of ``{model, path, seed}``, path relative to ``data_root``: see
    :func:`write_random_checkpoint`).
    Returns the same statistics as :func:`ris_utils.data.refer.refer_statistics` plus ``data.world``.
    """
    from PIL import Image

    root = Path(cfg["data_root"])
    datasets = cfg.get("datasets") or [{"name": "refcoco+", "split_by": "unc"}]
    cfg = settings.complete("data", cfg)
    photos, refs, images, anns = build_samples(int(cfg["max_side"]), cfg["photos"])
    img_dir = root / IMAGE_DIR
    img_dir.mkdir(parents=True, exist_ok=True)
    for file_name, img in photos.items():
        Image.fromarray(img).save(img_dir / file_name, quality=95)
    for d in datasets:
        write_refer(root, d["name"], d["split_by"], refs, images, anns, CATEGORIES)
    for spec in cfg.get("random_checkpoints") or []:
        write_random_checkpoint(spec["model"], root / spec["path"], int(spec.get("seed", 0)))
    logger.info("paper-tiny samples: %d photos, %d refs under %s", len(photos), len(refs), root)
    stats = refer_statistics(root, datasets, cfg.get("pseudo_split"))
    stats["data.world"] = "samples"
    return stats
