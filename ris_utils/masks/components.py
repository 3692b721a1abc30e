"""The classical backend of the shapes world: a pixel segmenter with SAM's generator interface."""

from __future__ import annotations

import numpy as np

from .proposals import iou_matrix, mask_to_rle


class ComponentsSegmenter:
    """A classical pixel segmenter (not a model; it sees only the pixels, never any ground truth): a
    background colour model + colour quantisation + connected components. Same interface as
    ``SamAutomaticMaskGenerator``: ``generate(HxWx3 uint8) -> [{"segmentation", "predicted_iou",
    "stability_score"}]`` (both scores 1.0: there is no model score).

    1. background: a smooth colour field (a plane per channel, least squares) fitted to the ``border``
       pixels of the image, refitted ``refits`` times on the pixels that lie within ``fg_threshold / 2``
       of it; foreground = pixels whose RGB distance to the field is > ``fg_threshold``;
    2. colour quantisation of the image (PIL median cut to ``n_colors``, no dithering);
    3. for every quantised colour present in the foreground: its foreground pixels, closed with a disk of
       ``close_radius`` (bridges the light stripes / dots of a patterned object), holes of at most
       ``max_hole`` pixels filled, 8-connected components; plus the components of the whole foreground
       (holes <= ``max_hole`` filled) for objects that the quantisation splits;
    4. components smaller than ``min_area`` dropped; a component whose IoU with an earlier one is
       >= ``dedup_iou`` dropped (de-duplication).
    """

    def __init__(self, fg_threshold: float = 40.0, n_colors: int = 12, close_radius: int = 2,
                 max_hole: int = 12, min_area: int = 20, dedup_iou: float = 0.9, border: int = 2,
                 refits: int = 2):
        for key, value, kind in (("fg_threshold", fg_threshold, float), ("n_colors", n_colors, int),
                                 ("close_radius", close_radius, int), ("max_hole", max_hole, int),
                                 ("min_area", min_area, int), ("dedup_iou", dedup_iou, float),
                                 ("border", border, int), ("refits", refits, int)):
            ok = not isinstance(value, bool) and isinstance(value, int | float) and (kind is float or value == int(value))
            if not ok:
                raise ValueError(f"masks.components.{key} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {value!r}; fix it in the profile or --param")
        if not 2 <= int(n_colors) <= 256:
            raise ValueError(f"masks.components.n_colors must be in [2, 256], got {n_colors}")
        if fg_threshold <= 0 or close_radius < 0 or border < 1 or min_area < 1:
            raise ValueError("masks.components: fg_threshold > 0, close_radius >= 0, border >= 1 and "
                             f"min_area >= 1 required (got {fg_threshold}, {close_radius}, {border}, {min_area})")
        self.fg_threshold, self.n_colors, self.close_radius = float(fg_threshold), int(n_colors), int(close_radius)
        self.max_hole, self.min_area, self.dedup_iou = int(max_hole), int(min_area), float(dedup_iou)
        self.border, self.refits = int(border), int(refits)

    def background_distance(self, image: np.ndarray) -> np.ndarray:
        """HxW float: RGB distance of every pixel to the fitted background field."""
        h, w = image.shape[:2]
        f = image.reshape(-1, 3).astype(np.float64)
        yy, xx = np.mgrid[0:h, 0:w]
        design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], 1)  # (HW, 3)
        b = self.border
        fit = np.zeros((h, w), bool)
        fit[:b], fit[-b:], fit[:, :b], fit[:, -b:] = True, True, True, True
        fit = fit.ravel()
        for _ in range(self.refits + 1):
            coef, *_ = np.linalg.lstsq(design[fit], f[fit], rcond=None)
            dist = np.linalg.norm(f - design @ coef, axis=1)
            inliers = dist < self.fg_threshold / 2
            if inliers.sum() < 3:
                break
            fit = inliers
        return dist.reshape(h, w)

    def quantize(self, image: np.ndarray) -> np.ndarray:
        """HxW int palette index of each pixel (median cut, no dithering)."""
        from PIL import Image

        q = Image.fromarray(image).quantize(colors=self.n_colors, method=Image.Quantize.MEDIANCUT,
                                            dither=Image.Dither.NONE)
        return np.asarray(q, dtype=np.int32)

    def _close(self, binary: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        r = self.close_radius
        if r == 0:
            return binary
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disk = xx ** 2 + yy ** 2 <= r * r
        padded = np.pad(binary, r + 1)
        return ndimage.binary_closing(padded, structure=disk)[r + 1:-(r + 1), r + 1:-(r + 1)]

    def _fill_small_holes(self, binary: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        if self.max_hole <= 0:
            return binary
        holes, n = ndimage.label(~binary)
        if n == 0:
            return binary
        sizes = np.bincount(holes.ravel())
        edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes <= self.max_hole
        small[0] = False
        small[edge] = False
        return binary | small[holes]

    def _components(self, binary: np.ndarray) -> list[np.ndarray]:
        from scipy import ndimage

        labels, n = ndimage.label(binary, structure=np.ones((3, 3), bool))
        if n == 0:
            return []
        sizes = np.bincount(labels.ravel())
        return [labels == k for k in range(1, n + 1) if sizes[k] >= self.min_area]

    def generate(self, image: np.ndarray) -> list[dict]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"ComponentsSegmenter expects HxWx3 uint8, got {image.shape} {image.dtype}")
        fg = self.background_distance(image) > self.fg_threshold
        q = self.quantize(image)
        masks: list[np.ndarray] = []
        for c in np.unique(q[fg]):
            b = fg & (q == c)
            if b.sum() >= self.min_area:
                masks.extend(self._components(self._fill_small_holes(self._close(b))))
        masks.extend(self._components(self._fill_small_holes(fg)))
        rles = [mask_to_rle(m) for m in masks]
        iou = iou_matrix(rles, rles)
        keep: list[int] = []
        for i in range(len(rles)):
            if all(iou[i, j] < self.dedup_iou for j in keep):
                keep.append(i)
        return [{"segmentation": rles[i], "predicted_iou": 1.0, "stability_score": 1.0} for i in keep]
