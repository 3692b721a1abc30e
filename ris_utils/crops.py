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
- ``box="authors"`` (a setting, ``captions.box`` / ``filter.box``) reproduces the authors' crop geometry
  exactly (``distinctive_caption_generation.py`` l. 159 and l. 170-199 at de5d124): their box is
  torchvision's ``masks_to_boxes`` (``x_max`` / ``y_max`` INCLUSIVE) used as if exclusive, so every crop
  drops the mask's last row and column (off by one); an enlarged box is ``x_min - m`` .. ``x_max + m`` with
  ``m = (s - 1) (x_max - x_min) / 2``, clipped to ``[0, W]``, and cropped at ``int(x0)`` with width
  ``int(x1 - x0)`` (truncation). A 1-pixel-wide mask gives them an empty crop (their resize then fails);
  here it keeps at least one pixel;
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
#: Crop-box conventions: ``"exclusive"`` (ours: the tight box, documented above) | ``"authors"``.
BOX_MODES = ("exclusive", "authors")
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


def authors_box_xyxy(mask: np.ndarray, scale: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The authors' crop box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a mask enlarged by ``scale``.

    ``masks_to_boxes`` gives ``(x_min, y_min, x_max, y_max)`` with the max inclusive; the authors crop
    ``int(x0) .. int(x0) + int(x1 - x0)`` of ``x0 = max(x_min - m, 0)``, ``x1 = min(x_max + m, W)``,
    ``m = (scale - 1) * (x_max - x_min) / 2`` (same in y): the last row / column of the mask's box is not
    in the ``scale == 1`` crops. ``None`` for an empty mask; at least one pixel otherwise.
    """
    box = mask_box_xyxy(mask)
    if box is None:
        return None
    xmin, ymin, xmax, ymax = box[0], box[1], box[2] - 1, box[3] - 1  # masks_to_boxes: inclusive max
    w, h = scale * (xmax - xmin), scale * (ymax - ymin)
    mx, my = (w - (xmax - xmin)) / 2, (h - (ymax - ymin)) / 2
    fx0, fy0 = max(xmin - mx, 0.0), max(ymin - my, 0.0)
    fx1, fy1 = min(xmax + mx, float(width)), min(ymax + my, float(height))
    x0, y0 = int(fx0), int(fy0)
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    x1 = min(max(x0 + int(fx1 - fx0), x0 + 1), width)
    y1 = min(max(y0 + int(fy1 - fy0), y0 + 1), height)
    return x0, y0, x1, y1


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


def view_crop(image: np.ndarray, mask: np.ndarray, view, fill=0, mean: Sequence[float] = DEFAULT_MEAN,
              box: str = "exclusive", std: Sequence[float] = DEFAULT_STD) -> np.ndarray:
    """One view of one mask as a square HxWx3 uint8 crop at the image's resolution (before resizing).

    Arguments:
      image: HxWx3 uint8 RGB image.
      mask: HxW bool mask.
      view: ``"masked"`` (the mask's box, pixels outside the mask set to ``fill``) or an enlargement
        factor (float) of the mask's box on the original image.
      fill: one grey value or an RGB triple in 0..255, ``"mean"`` (``mean`` x 255) or ``"authors"``
        (:func:`resolve_fill`).
      mean, std: the model's normalisation (only for ``fill="mean"`` / ``"authors"``).
      box: ``"exclusive"`` (the tight box, default) or ``"authors"`` (:func:`authors_box_xyxy`).
    Returns:
      SxSx3 uint8, S = the longer side of the (clipped) box; a 1x1 fill pixel for an empty mask.
    """
    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    if box not in BOX_MODES:
        raise ValueError(f"crop box must be one of {BOX_MODES}, got {box!r}")
    fill = resolve_fill(fill, mean, std)
    tight = mask_box_xyxy(mask)
    if tight is None:
        return _blank(fill)
    h, w = mask.shape
    if isinstance(view, str):
        if view != "masked":
            raise ValueError(f"unknown view {view!r}: use 'masked' or an enlargement factor such as 1.2")
        x0, y0, x1, y1 = tight if box == "exclusive" else authors_box_xyxy(mask, 1.0, w, h)
        crop = image[y0:y1, x0:x1].copy()
        crop[~mask[y0:y1, x0:x1]] = _fill_array(fill)
    else:
        x0, y0, x1, y1 = (enlarge_box_xyxy(tight, float(view), w, h) if box == "exclusive"
                          else authors_box_xyxy(mask, float(view), w, h))
        crop = image[y0:y1, x0:x1]
    return pad_to_square(crop, fill)


def _blank(fill) -> np.ndarray:
    out = np.empty((1, 1, 3), np.uint8)
    out[...] = _fill_array(fill)
    return out


def resolve_fill(fill, mean: Sequence[float], std: Sequence[float] = DEFAULT_STD) -> np.ndarray:
    """``fill`` as an RGB uint8 triple.

    ``"mean"`` = the model's normalisation mean x 255 (0 after normalisation). ``"authors"`` = the value the
    authors' crops hold: they fill the NORMALISED image with ``mean`` (``img * mask + (1 - mask) * mean``
    and the padding likewise, ``distinctive_caption_generation.py`` l. 164 / 188 / 211 at de5d124), i.e. the
    pixel value ``255 * mean * (1 + std)`` (rounded to uint8: (156, 147, 133) for OpenAI's mean / std).
    """
    if isinstance(fill, str):
        if fill == "mean":
            return _fill_array([255 * float(m) for m in mean])
        if fill == "authors":
            return _fill_array([min(255.0, 255 * float(m) * (1 + float(s))) for m, s in zip(mean, std)])
        raise ValueError(f"fill must be 'mean', 'authors', a grey value or an RGB triple, got {fill!r}")
    return _fill_array(fill)


def make_views(
    image: np.ndarray,
    masks,
    views: Sequence = PAPER_VIEWS,
    size: int = 224,
    fill=0,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    box: str = "exclusive",
):
    """All views of all masks of one image, batched and normalised for the model.

    Arguments:
      image: HxWx3 uint8 RGB.
      masks: NxHxW bool array (or a list of HxW masks).
      views: view kinds, e.g. the paper's ``("masked", 1.0, 1.1, 1.2)`` or ``("masked",)`` / ``(1.2,)``.
      size: the model's input side S (``open_clip.get_model_preprocess_cfg(model)["size"]``).
      fill: the pixel value (before normalisation) of the pixels outside the mask (view 0) and of the
        square padding: a grey value, an RGB triple (0..255), ``"mean"`` = the model's normalisation mean
        x 255, i.e. 0 after normalisation, or ``"authors"`` = ``255 * mean * (1 + std)``, i.e. ``mean``
        after normalisation (what the authors' code feeds the captioner and CLIP, :func:`resolve_fill`).
        ``0`` is black, NOT 0 after normalisation.
      mean, std: the model's normalisation (``preprocess_cfg["mean"/"std"]``).
      box: crop-box convention (:data:`BOX_MODES`): ``"exclusive"`` or ``"authors"`` (their off-by-one).
    Returns:
      float32 tensor (N, V, 3, S, S) = ``(resize(crop) / 255 - mean) / std``.
    """
    import torch
    import torch.nn.functional as F

    masks = [np.asarray(m) for m in masks]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    fill_rgb = resolve_fill(fill, mean, std)
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(3, 1, 1)
    out = torch.empty((len(masks), len(views), 3, size, size), dtype=torch.float32)
    for i, m in enumerate(masks):
        for v, view in enumerate(views):
            crop = view_crop(image, m, view, fill_rgb, box=box)
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
    "BOX_MODES",
    "authors_box_xyxy",
    "mask_box_xyxy",
    "enlarge_box_xyxy",
    "pad_to_square",
    "view_crop",
    "resolve_fill",
    "make_views",
    "model_view_settings",
]
