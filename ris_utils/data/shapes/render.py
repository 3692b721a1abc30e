"""Rendering and sampling the shapes world's scenes: masks, the textured background, fill patterns."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from skimage import draw

from .world import (
    ANGULAR_SHAPES,
    COLORS,
    PATTERNS,
    ROUND_SHAPES,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Scene,
    ShapeObject,
)


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
