"""Robust image loading for the generation steps: every image becomes HxWx3 uint8 RGB, or a clear error.

``load_image_rgb(path)`` converts grayscale (``L``, ``1``, ``LA``), palette (``P``, ``PA``), ``RGBA``,
``CMYK``, ``YCbCr``, 16-bit (``I;16*``) and 32-bit (``I``, ``F``) images to 8-bit RGB, and raises
:class:`BadImageError` (a ``ValueError`` naming the file and the problem) for a missing file, a file
that is not an image, a truncated or corrupt file, or an image smaller than ``min_side`` pixels.

EXIF orientation is deliberately NOT applied: COCO / REFER annotations refer to the stored pixel grid.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

#: Images whose height or width is below this are rejected (a 1x1 image has no objects to segment).
MIN_SIDE = 8


class BadImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an integer / float array of any bit depth to uint8 (16-bit: value / 257, rounded)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / 65535.0 if hi <= 65535 else 255.0 / hi)
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    hi = int(a.max()) if a.size else 0
    # 16-bit data (PNG/TIFF I;16 and PIL's 32-bit "I" holding 16-bit samples): full range 0..65535.
    if hi <= 255 and np.iinfo(arr.dtype).max <= 255:
        return a.clip(0, 255).astype(np.uint8)
    if hi <= 65535:
        return ((a.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return ((a.clip(0, None) * 255) // max(hi, 1)).astype(np.uint8)


def load_image_rgb(path: str | os.PathLike, *, min_side: int = MIN_SIDE) -> np.ndarray:
    """Load ``path`` as an HxWx3 uint8 RGB array (HWC, uint8).

    Arguments:
      path: the image file.
      min_side (int): smallest accepted height / width in pixels.

    Returns:
      np.ndarray: HxWx3 uint8, C-contiguous, RGB.

    Raises:
      BadImageError: missing file, not an image, truncated / corrupt data, too small, too large.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise BadImageError(f"{path}: file does not exist")
    if not path.is_file():
        raise BadImageError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decodes everything: truncated / corrupt data raises here
                rgb = _pil_to_rgb(img)
    except UnidentifiedImageError as e:
        raise BadImageError(f"{path}: not an image file PIL can read ({e})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{path}: image too large ({e})") from e
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadImageError(f"{path}: corrupt or truncated image data ({type(e).__name__}: {e})") from e
    h, w = rgb.shape[:2]
    if h < min_side or w < min_side:
        raise BadImageError(f"{path}: image is {w}x{h} pixels, smaller than the minimum {min_side}x{min_side}")
    return rgb


def _pil_to_rgb(img) -> np.ndarray:
    """HxWx3 uint8 from an opened PIL image of any mode (alpha is composited over white)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.ascontiguousarray(np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), dtype=np.uint8))
    if mode.startswith("I") or mode == "F":  # 16-bit / 32-bit single channel
        gray = _to_uint8(np.asarray(img))
        if gray.ndim == 3:
            gray = gray[..., 0]
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    # L, 1, CMYK, YCbCr, LAB, HSV, ...
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


__all__ = ["load_image_rgb", "BadImageError", "MIN_SIDE"]
