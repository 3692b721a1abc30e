"""Robust image loading for the generation steps: every image becomes HxWx3 uint8 RGB, or a clear error.

``load_image_rgb(path)`` converts grayscale (``L``, ``1``, ``LA``), palette (``P``, ``PA``), ``RGBA``,
``CMYK``, ``YCbCr``, 16-bit (``I;16*``) and 32-bit (``I``, ``F``) images to 8-bit RGB, and raises
:class:`BadImageError` (a ``ValueError`` naming the file and the problem) for a missing file, a dangling
symlink, a symlink loop, a file that cannot be read (permissions), a file name that is not valid UTF-8, a
file that is not an image, a truncated or corrupt file, an image smaller than ``min_side`` pixels or with
more than ``max_pixels`` pixels (checked from the header, before decoding).

File names in messages and records: bytes that are not valid UTF-8 are shown as ``\\xNN``
(:func:`display_path`, Python's ``backslashreplace`` of the raw bytes).

EXIF orientation is deliberately NOT applied: COCO / REFER annotations refer to the stored pixel grid.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np

#: Images whose height or width is below this are rejected (a 1x1 image has no objects to segment).
MIN_SIDE = 8

#: Default of ``masks.max_pixels``: larger images are error records before they are decoded (40 Mpx, e.g.
#: 8000x5000; SAM works at 1024 px anyway, and full-resolution masks of a larger image take gigabytes).
MAX_PIXELS = 40_000_000


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


def display_path(path: str | os.PathLike) -> str:
    """``path`` as printable UTF-8 text: bytes of a non-UTF-8 name (surrogate-escaped by Python) as ``\\xNN``."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def utf8_name(path: str | os.PathLike) -> bool:
    """Whether the name of ``path`` is valid UTF-8 (no surrogate-escaped bytes)."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_file(path: Path, shown: str) -> None:
    """Raise :class:`BadImageError` with the real reason when ``path`` is not a readable regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadImageError(f"{shown}: dangling symlink (it points to {display_path(os.readlink(path))}, "
                                f"which does not exist)") from None
        raise BadImageError(f"{shown}: file does not exist") from None
    except PermissionError:
        raise BadImageError(f"{shown}: permission denied (cannot look up the file; check the folder's "
                            f"permissions)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImageError(f"{shown}: symlink loop (too many levels of symbolic links)") from None
        raise BadImageError(f"{shown}: cannot access the file ({e.strerror or e})") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(f"{shown}: not a regular file")
    if st.st_size == 0:
        raise BadImageError(f"{shown}: file is empty (0 bytes)")


def load_image_rgb(path: str | os.PathLike, *, min_side: int = MIN_SIDE, max_pixels: int | None = None) -> np.ndarray:
    """Load ``path`` as an HxWx3 uint8 RGB array (HWC, uint8).

    Arguments:
      path: the image file.
      min_side (int): smallest accepted height / width in pixels.
      max_pixels (int | None): largest accepted width x height (from the header, before decoding); None = no
        limit beyond PIL's decompression-bomb check.

    Returns:
      np.ndarray: HxWx3 uint8, C-contiguous, RGB.

    Raises:
      BadImageError: missing file, not an image, truncated / corrupt data, too small, too large.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    shown = display_path(path)
    if not utf8_name(path):
        raise BadImageError(f"{shown}: the file name is not valid UTF-8 (shown with \\xNN for the bad bytes); "
                            f"rename the file (records and exports name files in UTF-8)")
    _check_file(path, shown)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if max_pixels is not None and w * h > int(max_pixels):
                    raise BadImageError(
                        f"{shown}: image is {w}x{h} = {w * h:,} pixels, more than max_pixels = {int(max_pixels):,} "
                        f"(setting masks.max_pixels); downscale the image or raise the setting")
                img.load()  # decodes everything: truncated / corrupt data raises here
                rgb = _pil_to_rgb(img)
    except UnidentifiedImageError as e:
        raise BadImageError(f"{shown}: not an image file PIL can read ({e})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{shown}: image too large ({e})") from e
    except BadImageError:
        raise
    except PermissionError as e:
        raise BadImageError(f"{shown}: permission denied (cannot read the file; check its mode and owner)") from e
    except IsADirectoryError as e:
        raise BadImageError(f"{shown}: not a regular file") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadImageError(f"{shown}: symlink loop (too many levels of symbolic links)") from e
        if e.errno is not None and e.errno not in (errno.EINVAL,):
            raise BadImageError(f"{shown}: cannot read the file ({e.strerror or e})") from e
        raise BadImageError(f"{shown}: corrupt or truncated image data ({type(e).__name__}: {e})") from e
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadImageError(f"{shown}: corrupt or truncated image data ({type(e).__name__}: {e})") from e
    h, w = rgb.shape[:2]
    if h < min_side or w < min_side:
        raise BadImageError(f"{shown}: image is {w}x{h} pixels, smaller than the minimum {min_side}x{min_side}")
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


__all__ = ["load_image_rgb", "BadImageError", "MIN_SIDE", "MAX_PIXELS", "display_path", "utf8_name"]
