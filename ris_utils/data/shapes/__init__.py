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


from .io import (
    DistinctJudge,
    cli,
    generate_world,
    image_path,
    load_scenes,
    match_object,
    object_masks,
    prepare,
    world_statistics,
    write_toolkit_view,
)
from .language import (
    LOCATIONS,
    distinctive_options,
    generic_caption,
    is_distinctive,
    parse_expression,
    phrase,
    referee,
    referring_sentences,
)
from .render import make_scene, shape_mask
from .world import (
    ANGULAR_SHAPES,
    ATTRIBUTES,
    COLOR_WORDS,
    COLORS,
    DATASETS,
    DIRECTION_WORDS,
    FUNCTION_WORDS,
    IMAGE_SUBDIR,
    LOCATION_FORMS,
    LOCATION_MARGIN,
    ORDINAL_WORDS,
    PATTERN_LOOKUP,
    PATTERN_WORDS,
    PATTERNS,
    ROUND_SHAPES,
    SEEN_SHAPES,
    SHAPE_WORDS,
    SHAPES,
    SIZE_LOOKUP,
    SIZE_RADIUS,
    SIZE_WORDS,
    SIZES,
    SPLIT_BY,
    SPLIT_FRACTIONS,
    SPLITS,
    TOOLKIT_VIEW,
    UNSEEN_SHAPES,
    VOCABULARY,
    WORLD_VERSION,
    Scene,
    ShapeObject,
)

__all__ = [
    "ANGULAR_SHAPES",
    "ATTRIBUTES",
    "COLORS",
    "COLOR_WORDS",
    "DATASETS",
    "DIRECTION_WORDS",
    "DistinctJudge",
    "FUNCTION_WORDS",
    "IMAGE_SUBDIR",
    "LOCATIONS",
    "LOCATION_FORMS",
    "LOCATION_MARGIN",
    "ORDINAL_WORDS",
    "PATTERNS",
    "PATTERN_LOOKUP",
    "PATTERN_WORDS",
    "ROUND_SHAPES",
    "SEEN_SHAPES",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZES",
    "SIZE_LOOKUP",
    "SIZE_RADIUS",
    "SIZE_WORDS",
    "SPLITS",
    "SPLIT_BY",
    "SPLIT_FRACTIONS",
    "Scene",
    "ShapeObject",
    "TOOLKIT_VIEW",
    "UNSEEN_SHAPES",
    "VOCABULARY",
    "WORLD_VERSION",
    "cli",
    "distinctive_options",
    "generate_world",
    "generic_caption",
    "image_path",
    "is_distinctive",
    "load_scenes",
    "make_scene",
    "match_object",
    "object_masks",
    "parse_expression",
    "phrase",
    "prepare",
    "referee",
    "referring_sentences",
    "shape_mask",
    "world_statistics",
    "write_toolkit_view",
]
