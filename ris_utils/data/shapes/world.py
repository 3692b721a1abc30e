"""The shapes world's vocabulary: shapes, colours, sizes, patterns, their surface forms, splits and datasets,
and the symbolic scene (:class:`Scene` of :class:`ShapeObject`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ... import layout

WORLD_VERSION = 2  # 2: images under images/train2014 + the REFER toolkit view
DATASETS = ("shapes", "shapes+", "shapes-unseen")
SPLIT_BY = "shapes"
#: where the images are, relative to the data root (the REFER toolkit's image folder for RefCOCO-family names)
IMAGE_SUBDIR = layout.IMAGE_SUBDIR
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
