"""The referee's language: parsing the world's phrases, deciding which objects an expression fits, and
writing phrases (generic captions, distinctive referring sentences)."""

from __future__ import annotations

import itertools

import numpy as np

from .. import refer
from .world import (
    ATTRIBUTES,
    COLOR_WORDS,
    DIRECTION_WORDS,
    FUNCTION_WORDS,
    LOCATION_FORMS,
    LOCATION_MARGIN,
    ORDINAL_WORDS,
    PATTERN_LOOKUP,
    PATTERN_WORDS,
    SHAPE_WORDS,
    SIZE_LOOKUP,
    SIZE_WORDS,
    Scene,
    ShapeObject,
)


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
