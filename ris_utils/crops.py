"""The views of a mask shown to the captioner (step 2) and to CLIP (step 3).

Paper (step 2): every mask is shown to the captioner as 4 crops, each padded to a square and resized to
the model's input size:

- view 0, ``"masked"``: the image with every pixel outside the mask replaced by the fill value, cropped to
  the mask's box;
- views 1-3, ``1.0``, ``1.1``, ``1.2``: the original image cropped to the mask's box enlarged by that
  factor (centred on the box, clipped to the image).

Step 3 uses ``"masked"`` (noun scores) and ``1.2`` (caption scores) through the same functions.

Geometry (documented behaviour, tested in ``tests/test_crops.py``):

- the box of a mask is its tight pixel box ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive;
- an enlarged box keeps the centre ``c`` and scales the side ``w`` by ``s``; its edges are
  ``floor(c -/+ s*w/2 + 0.5)`` and it is then clipped to the image, so ``s=1.0`` gives the tight box back
  exactly and a box touching the border is clipped on that side only;
- a crop is padded to a square with the fill value, centred (the extra row/column goes to the
  bottom/right), then resized (bilinear, antialiased) to ``size x size``;
- degenerate masks: an EMPTY mask (no pixel set) gives views made of the fill value only
  (:func:`mask_box_xyxy` returns ``None`` for it); a 1-pixel mask gives a 1x1 box for every factor up to
  1.2 (each edge moves by ``s*w/2`` rounded to whole pixels), upscaled to ``size``; a mask touching the
  border is clipped on that side, never shifted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The paper's four views, in the order of the candidates' ``view`` index (0-3).
PAPER_VIEWS = ("masked", 1.0, 1.1, 1.2)
#: open_clip's default (OpenAI) normalisation.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def mask_box_xyxy(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of an HxW boolean mask; ``None`` when empty."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def enlarge_box_xyxy(box: Sequence[float], scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Enlarge ``box`` (x0, y0, x1, y1) by ``scale`` around its centre and clip it to a WxH image.

    Edges are ``floor(c -/+ scale*side/2 + 0.5)``; the result is never empty (at least 1x1 inside the
    image).
    """
    if scale <= 0:
        raise ValueError(f"enlargement scale must be > 0, got {scale}")
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = scale * (x1 - x0) / 2, scale * (y1 - y0) / 2
    nx0 = min(max(math.floor(cx - hw + 0.5), 0), width - 1)
    ny0 = min(max(math.floor(cy - hh + 0.5), 0), height - 1)
    nx1 = max(min(math.floor(cx + hw + 0.5), width), nx0 + 1)
    ny1 = max(min(math.floor(cy + hh + 0.5), height), ny0 + 1)
    return nx0, ny0, nx1, ny1


def _fill_array(fill, channels: int = 3) -> np.ndarray:
    arr = np.asarray(fill, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels or np.any(arr < 0) or np.any(arr > 255):
        raise ValueError(f"fill must be one value or {channels} values in 0..255, got {fill!r}")
    return np.round(arr).astype(np.uint8)


def pad_to_square(crop: np.ndarray, fill) -> np.ndarray:
    """Pad an HxWx3 uint8 crop to a square with ``fill``, centred (extra row/column bottom/right)."""
    h, w = crop.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, crop.shape[2]), dtype=crop.dtype)
    out[...] = _fill_array(fill, crop.shape[2])
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = crop
    return out


def view_crop(image: np.ndarray, mask: np.ndarray, view, fill=0, mean: Sequence[float] = DEFAULT_MEAN) -> np.ndarray:
    """One view of one mask as a square HxWx3 uint8 crop at the image's resolution (before resizing).

    Arguments:
      image: HxWx3 uint8 RGB image.
      mask: HxW bool mask.
      view: ``"masked"`` (the mask's box, pixels outside the mask set to ``fill``) or an enlargement
        factor (float) of the mask's box on the original image.
      fill: one grey value or an RGB triple in 0..255, or ``"mean"`` (``mean`` x 255).
      mean: the model's normalisation mean (only for ``fill="mean"``).
    Returns:
      SxSx3 uint8, S = the longer side of the (clipped) box; a 1x1 fill pixel for an empty mask.
    """
    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    fill = resolve_fill(fill, mean)
    box = mask_box_xyxy(mask)
    if box is None:
        return _blank(fill)
    h, w = mask.shape
    if isinstance(view, str):
        if view != "masked":
            raise ValueError(f"unknown view {view!r}: use 'masked' or an enlargement factor such as 1.2")
        x0, y0, x1, y1 = box
        crop = image[y0:y1, x0:x1].copy()
        crop[~mask[y0:y1, x0:x1]] = _fill_array(fill)
    else:
        x0, y0, x1, y1 = enlarge_box_xyxy(box, float(view), w, h)
        crop = image[y0:y1, x0:x1]
    return pad_to_square(crop, fill)


def _blank(fill) -> np.ndarray:
    out = np.empty((1, 1, 3), np.uint8)
    out[...] = _fill_array(fill)
    return out


def resolve_fill(fill, mean: Sequence[float]) -> np.ndarray:
    """``fill`` as an RGB uint8 triple; ``"mean"`` = the model's normalisation mean x 255."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"fill must be 'mean', a grey value or an RGB triple, got {fill!r}")
        return _fill_array([255 * float(m) for m in mean])
    return _fill_array(fill)


def make_views(
    image: np.ndarray,
    masks,
    views: Sequence = PAPER_VIEWS,
    size: int = 224,
    fill=0,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
):
    """All views of all masks of one image, batched and normalised for the model.

    Arguments:
      image: HxWx3 uint8 RGB.
      masks: NxHxW bool array (or a list of HxW masks).
      views: view kinds, e.g. the paper's ``("masked", 1.0, 1.1, 1.2)`` or ``("masked",)`` / ``(1.2,)``.
      size: the model's input side S (``open_clip.get_model_preprocess_cfg(model)["size"]``).
      fill: the pixel value (before normalisation) of the pixels outside the mask (view 0) and of the
        square padding: a grey value, an RGB triple (0..255), or ``"mean"`` = the model's normalisation
        mean x 255, i.e. 0 after normalisation (what the authors' code feeds the captioner). ``0`` is
        black, NOT 0 after normalisation.
      mean, std: the model's normalisation (``preprocess_cfg["mean"/"std"]``).
    Returns:
      float32 tensor (N, V, 3, S, S) = ``(resize(crop) / 255 - mean) / std``.
    """
    import torch
    import torch.nn.functional as F

    masks = [np.asarray(m) for m in masks]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    fill_rgb = resolve_fill(fill, mean)
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(3, 1, 1)
    out = torch.empty((len(masks), len(views), 3, size, size), dtype=torch.float32)
    for i, m in enumerate(masks):
        for v, view in enumerate(views):
            crop = view_crop(image, m, view, fill_rgb)
            t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float()  # (1, 3, s, s)
            if t.shape[-1] != size:
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=t.shape[-1] > size)
            out[i, v] = (t[0].clamp(0, 255) / 255.0 - mean_t) / std_t
    return out


def model_view_settings(model) -> dict:
    """``{"size", "mean", "std"}`` of an open_clip model (its preprocess config)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"size": int(size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


__all__ = [
    "PAPER_VIEWS",
    "mask_box_xyxy",
    "enlarge_box_xyxy",
    "pad_to_square",
    "view_crop",
    "resolve_fill",
    "make_views",
    "model_view_settings",
]
