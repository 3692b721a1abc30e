"""The shapes world: the embedded default dataset, with exact ground truth and a symbolic referee.

Not part of the paper: a small synthetic world that lets CI and a user without a GPU run the whole
Pseudo-RIS pipeline and score it exactly. Every scene is an ``S x S`` RGB image (default 128) with 3-7
objects on a light textured background (a tinted gradient plus low- and high-frequency noise). An
object has

- a **shape** (the head noun): circle, ring, square, diamond, triangle, hexagon, star, cross;
- a **colour**: red, orange, yellow, green, blue, purple, pink, black;
- a **size**: small (radius ~0.06 S) or big (~0.12 S, four times the area);
- a **fill pattern**: solid, striped (diagonal lighter stripes) or dotted (lighter dots).

Objects never overlap (their circumscribed circles are at least one pixel apart), so every mask is the
whole object and objects may touch but stay separable.

Scenes are deliberately confusable: after the first object, each object copies the shape of an earlier
object with probability 0.55, and then its colour with probability 0.5 (and then size and pattern with
probability 0.3: a "twin" that only location can tell apart). So most objects share their shape with
another object of their image and a good share share shape and colour: "the red circle" is often
ambiguous. :func:`generate_world` returns the measured shares (``same_shape_share``,
``same_color_share``: objects that have another object of the same shape / of the same shape and colour
in their image).

Datasets (REFER format, ``split_by = "shapes"``, all on the same images, like RefCOCO / RefCOCO+ share
COCO images)::

    <root>/images/train2014/shapes_000001.png  the images (ids unique over all splits), where the REFER
                                               toolkit looks for RefCOCO-family images
    <root>/scenes.json                         the symbolic scenes (attributes, geometry, ann ids)
    <root>/manifest.json                       settings + checksum (prepare() skips regeneration)
    <root>/shapes/refs(shapes).p               RefCOCO-like: location words allowed
    <root>/shapes+/refs(shapes).p              RefCOCO+-like: no location words
    <root>/shapes-unseen/refs(shapes).p        the unseen-domain variant (below)
    <root>/<dataset>/instances.json            every object of every image (RLE masks), per dataset

The REFER toolkit's view (:data:`TOOLKIT_VIEW`): the toolkit (``refer.py``) opens only the dataset names
refcoco / refcoco+ / refcocog / refclef, so the same three datasets are also reachable under those names,
as relative symlinks to the files above (copies where the file system has no symlinks)::

    <root>/refcoco/refs(unc).p  + instances.json   = shapes         (splits train / val / testA / testB)
    <root>/refcoco+/refs(unc).p + instances.json   = shapes+        (splits train / val / testA / testB)
    <root>/refcocog/refs(umd).p + instances.json   = shapes-unseen  (splits train / val / test)

so ``REFER(<root>, "refcoco", "unc")``, LAVT's and CRIS's / ETRIS's ``tools/data_process.py --dataset
refcoco --split unc`` (and refcoco+ / unc, refcocog / umd: the same split names as RefCOCO's) read the
world unchanged, images from ``<root>/images/train2014``.

Splits: ``train``, ``val``, ``testA``, ``testB`` (disjoint image sets). Mirroring RefCOCO, where testA
images hold refs to people and testB images refs to other objects, **testA** images hold refs only to
*round* shapes (circle, ring) and **testB** images only to *angular* shapes (the other six); testA scenes
are generated with a round first object and testB scenes with an angular one. train and val refer to
every object that can be singled out.

Referring expressions single out their target: the shortest distinctive combination of attributes
(colour / size / pattern) with the head noun, with variety (random choice among equally short
combinations, sometimes one redundant attribute, synonyms such as big / large, optional article). In
``shapes`` a sentence uses a location phrase (left / right / top / bottom / middle / "second from the
left", ...) when attributes alone cannot single the target out, and for variety in 40% of sentences when
a location expression with no more attributes exists. ``shapes+`` never uses location words: objects
that cannot be singled out by attributes get no ref there. Every written sentence is checked with
:func:`referee` (``referee(sentence, scene) == {target}``); objects no expression can single out get no ref.

The **unseen** variant ``shapes-unseen`` mirrors the paper's unseen-domain (PhraseCut) experiment: the
images (the same as above) contain every shape and colour, but its ``train`` refs, the ground-truth
("human") annotations, refer only to objects of the *seen* shapes (all but :data:`UNSEEN_SHAPES`, as
RefCOCO annotates only COCO's 80 categories), while :func:`generic_caption` — what the shapes captioner
and CLIP learn from — covers every shape. Its ``val`` (val images) and ``test`` (testA + testB images)
splits refer only to objects of the held-out shapes. Expressions use the ``shapes`` style.

The **referee** (:func:`referee`) parses the world's phrases: an expression fits an object when every
attribute word it contains is true of the object (conjunctive: "red blue circle" or "circle square"
fit nothing), then location words narrow the fitting set (see :func:`referee`). Unknown words are
ignored; an expression without a shape noun fits nothing (empty set).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from skimage import draw

from . import refer

logger = logging.getLogger(__name__)

WORLD_VERSION = 2  # 2: images under images/train2014 + the REFER toolkit view
DATASETS = ("shapes", "shapes+", "shapes-unseen")
SPLIT_BY = "shapes"
#: where the images are, relative to the data root (the REFER toolkit's image folder for RefCOCO-family names)
IMAGE_SUBDIR = "images/train2014"
#: the REFER toolkit's names of the three datasets: ``{toolkit dataset: (our dataset, toolkit split_by)}``
TOOLKIT_VIEW = {"refcoco": ("shapes", "unc"), "refcoco+": ("shapes+", "unc"), "refcocog": ("shapes-unseen", "umd")}
SPLITS = ("train", "val", "testA", "testB")
#: fractions used when one total image count is given (CLI ``--n-images N``)
SPLIT_FRACTIONS = {"train": 0.64, "val": 0.16, "testA": 0.10, "testB": 0.10}

ROUND_SHAPES = ("circle", "ring")
ANGULAR_SHAPES = ("square", "diamond", "triangle", "hexagon", "star", "cross")
SHAPES = ROUND_SHAPES + ANGULAR_SHAPES
#: shapes the ``shapes-unseen`` train refs never mention; its val / test refs mention only these
UNSEEN_SHAPES = ("hexagon", "star")
SEEN_SHAPES = tuple(s for s in SHAPES if s not in UNSEEN_SHAPES)

#: name -> RGB; chosen to stay apart from each other and from the light background
COLORS = {
    "red": (215, 30, 35),
    "orange": (245, 130, 0),
    "yellow": (235, 200, 0),
    "green": (30, 150, 50),
    "blue": (30, 70, 215),
    "purple": (130, 40, 170),
    "pink": (250, 110, 190),
    "black": (25, 25, 25),
}
SIZES = ("small", "big")
PATTERNS = ("solid", "striped", "dotted")
#: radius range (fraction of the image side) per size; big objects have ~4x the area of small ones
SIZE_RADIUS = {"small": (0.055, 0.068), "big": (0.11, 0.13)}
#: location words need this gap (fraction of the image width / height) between position groups
LOCATION_MARGIN = 0.08

# ---- surface forms (generation picks among them; the referee accepts all)
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
PATTERN_WORDS = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted")}
#: direction -> (adjective forms placed before the attributes, phrase forms placed after the noun)
LOCATION_FORMS = {
    "left": (("left", "leftmost"), ("on the left",)),
    "right": (("right", "rightmost"), ("on the right",)),
    "top": (("top", "upper", "topmost"), ("at the top",)),
    "bottom": (("bottom", "lower", "bottommost"), ("at the bottom",)),
    "middle": (("middle", "central"), ("in the middle",)),
}
DIRECTION_WORDS = {w: d for d, (adj, _) in LOCATION_FORMS.items() for w in adj}
DIRECTION_WORDS.update({"lowest": "bottom", "highest": "top", "higher": "top", "uppermost": "top",
                        "center": "middle", "centre": "middle"})
ORDINAL_WORDS = {"first": 1, "second": 2, "third": 3}
FUNCTION_WORDS = ("a", "an", "the", "on", "at", "in", "from", "of", "one", "shape", "object")

SHAPE_WORDS = {s: s for s in SHAPES}
COLOR_WORDS = {c: c for c in COLORS}
SIZE_LOOKUP = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
PATTERN_LOOKUP = {w: p for p, ws in PATTERN_WORDS.items() for w in ws}

#: every word the world's expressions and generic captions use (for a word-level tokenizer)
VOCABULARY = tuple(sorted(set(SHAPE_WORDS) | set(COLOR_WORDS) | set(SIZE_LOOKUP) | set(PATTERN_LOOKUP)
                          | set(DIRECTION_WORDS) | {"left", "right", "top", "bottom", "middle"}
                          | set(ORDINAL_WORDS) | set(FUNCTION_WORDS)))

ATTRIBUTES = ("color", "size", "pattern")


# --------------------------------------------------------------------------- data structures


@dataclass
class ShapeObject:
    """One object of a scene.

    Attributes:
      obj_id: index of the object in its scene (0..n-1); ann_id: its annotation id (unique overall);
      shape / color / size / pattern: attribute values (see the module constants);
      bbox: tight box of the mask ``[x, y, w, h]`` (pixels); centroid: mask centroid ``[x, y]``;
      area: mask pixels; center: ``[x, y]`` the shape was drawn around; radius: circumscribed radius (px).
    """

    obj_id: int
    ann_id: int
    shape: str
    color: str
    size: str
    pattern: str
    bbox: list[float] = field(default_factory=list)
    centroid: list[float] = field(default_factory=list)
    area: int = 0
    center: list[float] = field(default_factory=list)
    radius: float = 0.0

    @property
    def category_id(self) -> int:
        return SHAPES.index(self.shape) + 1

    def attributes(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "pattern": self.pattern}


@dataclass
class Scene:
    """A symbolic scene: the image's id, file name (under ``<root>/images/train2014``), size, split and objects."""

    image_id: int
    file_name: str
    height: int
    width: int
    objects: list[ShapeObject]
    split: str = ""

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "file_name": self.file_name, "height": self.height,
                "width": self.width, "split": self.split, "objects": [vars(o).copy() for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        objs = [ShapeObject(**o) for o in d["objects"]]
        return cls(image_id=d["image_id"], file_name=d["file_name"], height=d["height"], width=d["width"],
                   objects=objs, split=d.get("split", ""))


# --------------------------------------------------------------------------- rendering


def _polygon_vertices(shape: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    """Kx2 (x, y) vertices of a polygonal shape inscribed in the circle (cx, cy, r); None for round ones."""
    def ring_pts(n, radius, start_deg):
        a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
        return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], 1)

    if shape == "square":
        a = 0.7 * r
        return np.array([[cx - a, cy - a], [cx + a, cy - a], [cx + a, cy + a], [cx - a, cy + a]])
    if shape == "diamond":
        return np.array([[cx, cy - r], [cx + 0.72 * r, cy], [cx, cy + r], [cx - 0.72 * r, cy]])
    if shape == "triangle":
        return ring_pts(3, r, -90)
    if shape == "hexagon":
        return ring_pts(6, r, 0)
    if shape == "star":
        outer, inner = ring_pts(5, r, -90), ring_pts(5, 0.45 * r, -54)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    if shape == "cross":
        a, w = 0.92 * r, 0.34 * r
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
               (-a, -w), (-w, -w)]
        return np.array([[cx + x, cy + y] for x, y in pts])
    return None


def _window(center, radius: float, height: int, width: int) -> tuple[slice, slice]:
    """Rows / columns of the image that can hold a shape of ``radius`` around ``center`` = (x, y)."""
    cx, cy = float(center[0]), float(center[1])
    y0, y1 = max(0, int(np.floor(cy - radius)) - 1), min(height, int(np.ceil(cy + radius)) + 2)
    x0, x1 = max(0, int(np.floor(cx - radius)) - 1), min(width, int(np.ceil(cx + radius)) + 2)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _local_mask(shape: str, center, radius: float, win: tuple[slice, slice]) -> np.ndarray:
    """The shape's mask inside the window ``win`` (a bool array of the window's size)."""
    ys, xs = win
    h, w = ys.stop - ys.start, xs.stop - xs.start
    cx, cy = float(center[0]) - xs.start, float(center[1]) - ys.start
    m = np.zeros((h, w), bool)
    if shape in ("circle", "ring"):
        rr, cc = draw.disk((cy, cx), radius, shape=(h, w))
        m[rr, cc] = True
        if shape == "ring":
            rr, cc = draw.disk((cy, cx), 0.5 * radius, shape=(h, w))
            m[rr, cc] = False
        return m
    v = _polygon_vertices(shape, cx, cy, radius)
    if v is None:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    rr, cc = draw.polygon(v[:, 1], v[:, 0], shape=(h, w))
    m[rr, cc] = True
    return m


def shape_mask(shape: str, center, radius: float, height: int, width: int) -> np.ndarray:
    """HxW bool mask of one shape drawn around ``center`` = (x, y) within circumscribed ``radius``."""
    win = _window(center, radius, height, width)
    m = np.zeros((height, width), bool)
    m[win] = _local_mask(shape, center, radius, win)
    return m


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float light background: tinted base + linear gradient + blocky and fine noise."""
    base = rng.uniform(195, 232, size=3) + rng.uniform(-6, 6)
    ang = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(10, 30)
    gx = (np.arange(w, dtype=np.float32) / w - 0.5) * np.cos(ang) * amp
    gy = (np.arange(h, dtype=np.float32) / h - 0.5) * np.sin(ang) * amp
    cells = 9
    coarse = rng.normal(0, 6, size=(cells, cells, 3)).astype(np.float32)
    my, mx = _interp_matrix(h, cells), _interp_matrix(w, cells)
    coarse = np.stack([my @ coarse[..., k] @ mx.T for k in range(3)], axis=-1)
    fine = 3 * rng.standard_normal(size=(h, w, 3), dtype=np.float32)
    return (base.astype(np.float32) + gy[:, None, None] + gx[None, :, None]) + coarse + fine


@lru_cache(maxsize=4)
def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """n x cells linear-interpolation weights (smooth upsampling of a coarse noise grid)."""
    pos = np.linspace(0, cells - 1, n)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    t = (pos - lo).astype(np.float32)
    m = np.zeros((n, cells), np.float32)
    m[np.arange(n), lo] = 1 - t
    m[np.arange(n), lo + 1] = t
    return m


@lru_cache(maxsize=4)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.mgrid[0:h, 0:w])


def _paint(img: np.ndarray, mask: np.ndarray, win: tuple[slice, slice], color: str, pattern: str,
           rng: np.random.Generator) -> None:
    """Fill the local ``mask`` (inside window ``win`` of the HxWx3 float image) with the colour and the
    fill pattern, in place. Patterns are anchored to image coordinates."""
    rgb = np.asarray(COLORS[color], np.float32)
    light = 0.45 * rgb + 0.55 * 255.0
    unit = max(2, round(img.shape[1] / 48))
    yy, xx = _grid(img.shape[0], img.shape[1])
    yy, xx = yy[win], xx[win]
    if pattern == "striped":
        alt = ((xx + yy) // (unit + 1)) % 2 == 1
    elif pattern == "dotted":
        period = 3 * unit
        alt = (xx % period < unit) & (yy % period < unit)
    else:
        alt = np.zeros_like(mask)
    sub = img[win]
    sub[mask] = rgb
    sub[mask & alt] = light
    sub[mask] += 3 * rng.standard_normal(size=(int(mask.sum()), 3), dtype=np.float32)


# --------------------------------------------------------------------------- scene sampling


def _sample_attributes(rng: np.random.Generator, n: int, first_shapes: tuple[str, ...]) -> list[dict]:
    objs: list[dict] = []
    for i in range(n):
        if i > 0 and rng.random() < 0.55:
            src = objs[int(rng.integers(len(objs)))]
            o = {"shape": src["shape"], "color": str(rng.choice(list(COLORS))),
                 "size": str(rng.choice(SIZES)), "pattern": str(rng.choice(PATTERNS))}
            if rng.random() < 0.5:
                o["color"] = src["color"]
                if rng.random() < 0.3:
                    o["size"], o["pattern"] = src["size"], src["pattern"]
        else:
            pool = first_shapes if i == 0 else SHAPES
            o = {"shape": str(rng.choice(pool)), "color": str(rng.choice(list(COLORS))),
                 "size": str(rng.choice(SIZES)), "pattern": str(rng.choice(PATTERNS))}
        objs.append(o)
    return objs


def _place(rng: np.random.Generator, radii: list[float], size: int, tries: int = 300) -> list[tuple | None]:
    """Non-overlapping centres (circumscribed circles >= 1 px apart, inside the image); None = no room."""
    order = sorted(range(len(radii)), key=lambda i: -radii[i])
    centres: list[tuple | None] = [None] * len(radii)
    placed: list[tuple[float, float, float]] = []
    for i in order:
        r = radii[i]
        for _ in range(tries):
            x, y = rng.uniform(r + 1, size - r - 1, size=2)
            if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + 1.0) ** 2 for px, py, pr in placed):
                centres[i] = (float(x), float(y))
                placed.append((x, y, r))
                break
    return centres


def make_scene(rng: np.random.Generator, image_id: int, split: str, size: int, first_ann_id: int
               ) -> tuple[Scene, np.ndarray, dict[int, np.ndarray]]:
    """Sample and render one scene. Returns (scene, HxWx3 uint8 image, {obj_id: HxW bool mask})."""
    first = ROUND_SHAPES if split == "testA" else ANGULAR_SHAPES if split == "testB" else SHAPES
    while True:
        n = int(rng.integers(3, 8))
        attrs = _sample_attributes(rng, n, first)
        radii = [float(rng.uniform(*SIZE_RADIUS[a["size"]]) * size) for a in attrs]
        centres = _place(rng, radii, size)
        keep = [i for i in range(n) if centres[i] is not None]
        if len(keep) >= 3 and 0 in keep:
            break
    img = _background(rng, size, size)
    objects, masks = [], {}
    for k, i in enumerate(keep):
        a = attrs[i]
        center, radius = [round(centres[i][0], 4), round(centres[i][1], 4)], round(radii[i], 4)
        win = _window(center, radius, size, size)
        local = _local_mask(a["shape"], center, radius, win)
        _paint(img, local, win, a["color"], a["pattern"], rng)
        ys, xs = np.nonzero(local)
        ys, xs = ys + win[0].start, xs + win[1].start
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        objects.append(ShapeObject(
            obj_id=k, ann_id=first_ann_id + k, **a, bbox=bbox,
            centroid=[round(float(xs.mean()), 3), round(float(ys.mean()), 3)], area=int(len(xs)),
            center=center, radius=radius))
        masks[k] = np.zeros((size, size), bool)
        masks[k][win] = local
    scene = Scene(image_id=image_id, file_name=f"shapes_{image_id:06d}.png", height=size, width=size,
                  objects=objects, split=split)
    return scene, np.clip(np.rint(img), 0, 255).astype(np.uint8), masks


# --------------------------------------------------------------------------- referee


def _words(expression: str) -> list[str]:
    return refer.tokenize(expression)


def _clusters(objs: list[ShapeObject], axis: int, margin: float) -> list[list[ShapeObject]]:
    """Group objects by centroid coordinate ``axis`` (0 = x, 1 = y): sorted, a new group starts where the
    gap to the previous object is >= ``margin``."""
    objs = sorted(objs, key=lambda o: (o.centroid[axis], o.obj_id))
    groups: list[list[ShapeObject]] = []
    for o in objs:
        if groups and o.centroid[axis] - groups[-1][-1].centroid[axis] < margin:
            groups[-1].append(o)
        else:
            groups.append([o])
    return groups


def _locate(objs: list[ShapeObject], direction: str, ordinal: int, scene: Scene) -> list[ShapeObject]:
    if not objs:
        return objs
    axis = 1 if direction in ("top", "bottom") else 0
    margin = LOCATION_MARGIN * (scene.height if axis else scene.width)
    groups = _clusters(objs, axis, margin)
    if direction == "middle":
        n = len(groups)
        mid = groups[n // 2] if n % 2 else groups[n // 2 - 1] + groups[n // 2]
        return list(mid)
    if direction in ("right", "bottom"):
        groups = groups[::-1]
    return list(groups[ordinal - 1]) if ordinal <= len(groups) else []


def parse_expression(expression: str) -> dict:
    """The referee's reading of an expression: ``{"shape", "color", "size", "pattern": set of values,
    "locations": [(direction, ordinal)], "unknown": [words]}``."""
    out = {"shape": set(), "color": set(), "size": set(), "pattern": set(), "locations": [], "unknown": []}
    ordinal = None
    for w in _words(expression):
        if w in SHAPE_WORDS:
            out["shape"].add(SHAPE_WORDS[w])
        elif w in COLOR_WORDS:
            out["color"].add(w)
        elif w in SIZE_LOOKUP:
            out["size"].add(SIZE_LOOKUP[w])
        elif w in PATTERN_LOOKUP:
            out["pattern"].add(PATTERN_LOOKUP[w])
        elif w in ORDINAL_WORDS:
            ordinal = ORDINAL_WORDS[w]
        elif w in DIRECTION_WORDS or w in LOCATION_FORMS:
            d = DIRECTION_WORDS.get(w, w)
            out["locations"].append((d, ordinal or 1))
            ordinal = None
        elif w not in FUNCTION_WORDS:
            out["unknown"].append(w)
    return out


def _select(scene: Scene, shape: str | None, attrs: dict, locations: list[tuple[str, int]]) -> list[ShapeObject]:
    objs = [o for o in scene.objects if o.shape == shape]
    for k, v in attrs.items():
        objs = [o for o in objs if getattr(o, k) == v]
    for direction, ordinal in locations:
        objs = _locate(objs, direction, ordinal, scene)
    return objs


def referee(expression: str, scene: Scene) -> set[int]:
    """Every object of ``scene`` the expression fits (a set of ``obj_id``).

    Reading (:func:`parse_expression`): words are lower-cased tokens; shape nouns, colours, sizes
    (small / little / tiny, big / large) and patterns (solid / plain, striped, dotted / spotted) are
    conjunctive constraints — an object fits when every one holds, so two different values of one
    attribute ("red blue circle", "circle square") fit nothing. An expression naming no shape fits
    nothing (empty set). Unknown words ("please", "thing", "near") are ignored.

    Location words then narrow the fitting objects, in the order they appear. The fitting objects are
    grouped by centroid x (left / right / middle) or y (top / bottom): sorted, a new group starts where the
    gap to the previous object is at least ``LOCATION_MARGIN`` (8%) of the image side, so objects at
    about the same position stay together and the phrase stays ambiguous. "left", "leftmost", "on the
    left" keep the first group from the left (likewise right / rightmost, top / upper / topmost /
    highest, bottom / lower / lowest / bottommost); an ordinal before the direction ("the second circle
    from the left") keeps the k-th group from that side (none if there are fewer); "middle" / "center" /
    "central" keep the central group of the x order (the two central groups when their number is even).
    A single fitting object stays fitting under any location word except an ordinal beyond 1.

    An expression is *distinctive* for object ``t`` when ``referee(expression, scene) == {t.obj_id}``.
    """
    p = parse_expression(expression)
    if len(p["shape"]) != 1 or any(len(p[k]) > 1 for k in ATTRIBUTES):
        return set()
    attrs = {k: next(iter(p[k])) for k in ATTRIBUTES if p[k]}
    return {o.obj_id for o in _select(scene, next(iter(p["shape"])), attrs, p["locations"])}


def is_distinctive(expression: str, scene: Scene, obj_id: int) -> bool:
    return referee(expression, scene) == {obj_id}


# --------------------------------------------------------------------------- phrases


def _attr_word(attr: str, value: str, rng: np.random.Generator | None) -> str:
    if attr == "size":
        forms = SIZE_WORDS[value]
    elif attr == "pattern":
        forms = PATTERN_WORDS[value]
    else:
        return value
    return forms[0] if rng is None else str(forms[int(rng.integers(len(forms)))])


def phrase(obj: ShapeObject | dict, attrs=(), location: tuple[str, int] | None = None,
           rng: np.random.Generator | None = None, article: str | None = "the") -> str:
    """Render an expression naming ``obj``'s shape, the attributes in ``attrs`` (order: size, colour,
    pattern) and an optional ``(direction, ordinal)`` location. With ``rng`` surface forms vary."""
    get = obj.get if isinstance(obj, dict) else (lambda k: getattr(obj, k))
    words = [article] if article else []
    suffix: list[str] = []
    if location is not None:
        direction, ordinal = location
        adj_forms, phrase_forms = LOCATION_FORMS[direction]
        if ordinal > 1:
            ordw = {v: k for k, v in ORDINAL_WORDS.items()}[ordinal]
            words.append(ordw)
            suffix = ["from the", direction]
        elif rng is not None and rng.random() < 0.5:
            suffix = [str(phrase_forms[int(rng.integers(len(phrase_forms)))])]
        else:
            words.append(str(adj_forms[0] if rng is None else adj_forms[int(rng.integers(len(adj_forms)))]))
    for a in ("size", "color", "pattern"):
        if a in attrs:
            words.append(_attr_word(a, get(a), rng))
    words.append(get("shape"))
    return " ".join(words + suffix)


def generic_caption(obj: ShapeObject | dict, rng: np.random.Generator) -> str:
    """A GENERIC (non-distinctive) caption of one object: a random subset of its colour / size / pattern
    (each with probability 0.5, surface forms varied) and always its shape, with article "a" (50%), "the"
    (15%) or none, e.g. "a red circle", "big striped circle", "circle". It does not look at the other
    objects: the training text of the shapes captioner and the shapes CLIP."""
    attrs = [a for a in ("size", "color", "pattern") if rng.random() < 0.5]
    u = rng.random()
    article = "a" if u < 0.5 else "the" if u < 0.65 else None
    return phrase(obj, attrs, None, rng, article=article)


LOCATIONS = ([(d, 1) for d in ("left", "right", "top", "bottom", "middle")]
             + [(d, 2) for d in ("left", "right", "top", "bottom")])
_SUBSETS = [c for k in range(4) for c in itertools.combinations(ATTRIBUTES, k)]


def distinctive_options(scene: Scene, obj: ShapeObject, use_location: bool) -> tuple[list, list]:
    """Minimal distinctive descriptions of ``obj``: ``(attr_options, loc_options)`` where
    attr_options = the smallest attribute subsets (tuples) that single it out, and loc_options = the
    ``(subset, location)`` pairs with the fewest attributes that single it out with one location phrase,
    ordinals ("second from the left") only when no plain direction works (empty unless ``use_location``)."""
    attr_opts, loc_opts = [], []
    for subset in _SUBSETS:
        if attr_opts and len(subset) > len(attr_opts[0]):
            break
        attrs = {a: getattr(obj, a) for a in subset}
        if [o.obj_id for o in _select(scene, obj.shape, attrs, [])] == [obj.obj_id]:
            attr_opts.append(subset)
    if use_location:
        for subset in _SUBSETS:
            if loc_opts and len(subset) > len(loc_opts[0][0]):
                break
            attrs = {a: getattr(obj, a) for a in subset}
            cands = _select(scene, obj.shape, attrs, [])
            if len(cands) < 2:
                continue
            for loc in LOCATIONS:
                if [o.obj_id for o in _locate(cands, loc[0], loc[1], scene)] == [obj.obj_id]:
                    loc_opts.append((subset, loc))
        simple = [opt for opt in loc_opts if opt[1][1] == 1]
        loc_opts = simple or loc_opts  # "second from the left" only when no plain direction works
    return attr_opts, loc_opts


def referring_sentences(scene: Scene, obj: ShapeObject, use_location: bool, rng: np.random.Generator,
                        n_max: int = 3) -> list[str]:
    """1..n_max distinct ground-truth expressions singling out ``obj`` (each checked with
    :func:`referee`); [] when none exists in this style."""
    attr_opts, loc_opts = distinctive_options(scene, obj, use_location)
    if not attr_opts and not loc_opts:
        return []
    n = int(rng.integers(1, n_max + 1))
    out: list[str] = []
    for _ in range(n * 3):
        if len(out) >= n:
            break
        use_loc = bool(loc_opts) and (not attr_opts or (len(loc_opts[0][0]) <= len(attr_opts[0])
                                                        and rng.random() < 0.4))
        if use_loc:
            subset, loc = loc_opts[int(rng.integers(len(loc_opts)))]
        else:
            subset, loc = attr_opts[int(rng.integers(len(attr_opts)))], None
        subset = list(subset)
        extra = [a for a in ATTRIBUTES if a not in subset]
        if extra and rng.random() < 0.25:
            subset.append(extra[int(rng.integers(len(extra)))])
        s = phrase(obj, subset, loc, rng, article="the" if rng.random() < 0.75 else None)
        # checked with the referee (a redundant attribute can regroup locations: then drop the sentence)
        if is_distinctive(s, scene, obj.obj_id) and s not in out:
            out.append(s)
    return out


# --------------------------------------------------------------------------- generation


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
    """Hash of this module's source: a changed generator never reuses a world written by the old one."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _file_checksum(out_dir: Path) -> tuple[str, int]:
    files = sorted(p for name in _OWNED if name != "manifest.json"
                   for p in ([out_dir / name] if (out_dir / name).is_file() else (out_dir / name).rglob("*"))
                   if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(out_dir)).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest(), len(files)


def generate_world(out_dir, n_images=None, seed: int = 0, image_size: int = 128) -> dict:
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
        n_images = {"train": 600, "val": 150, "testA": 100, "testB": 100}
    counts = _split_counts(n_images)
    image_size = int(image_size)
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 (objects need room), got {image_size}")
    seed = int(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    (out_dir / IMAGE_SUBDIR).mkdir(parents=True)
    from PIL import Image

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
    counts = _split_counts(cfg.get("n_images") or {"train": 600, "val": 150, "testA": 100, "testB": 100})
    settings = {"seed": int(cfg.get("seed", 0)), "n_images": counts, "image_size": int(cfg.get("image_size", 128)),
                "code": _code_hash()}
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
        from ..profiles import step_config

        cfg = step_config(args.profile, "data", data_root=args.out, n_images=args.n_images, seed=args.seed,
                          image_size=args.image_size)
        stats = prepare(cfg)
    else:
        if not args.out:
            ap.error("--out DIR (or --profile NAME) is required")
        stats = generate_world(args.out, args.n_images or 950, args.seed or 0, args.image_size or 128)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
