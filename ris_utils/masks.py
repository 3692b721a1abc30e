"""Step 1 (notebook 01): mask proposals for every image -- SAM or a classical segmenter, then a selector.

Paper (step 1): SAM ViT-H, ``SamAutomaticMaskGenerator(sam, pred_iou_thresh=0.5)`` with every other
setting at segment-anything's default, then CutLER detections pick, for each detected instance, the SAM
mask with the largest pixel overlap. Here:

* backends -- ``sam``: segment-anything's own automatic mask generator (``output_mode="coco_rle"``) on a
  model from :data:`SAM_BUILDERS` (``vit_h`` / ``vit_l`` / ``vit_b`` as in segment-anything's
  ``sam_model_registry``, plus ``tiny`` for CPU tests), weights loaded on CPU first, then moved to the
  device; the image goes in as RGB (the authors' code passes BGR; we do not copy that).
  ``components``: a classical pixel segmenter (colour quantisation + connected components) for the
  shapes world; it sees only pixels.
* selectors -- ``external``: the authors' rule with user-supplied instance masks (e.g. CutLER detections
  as a COCO results json); ``sam_only``: containment, NMS, minimum area, top-M by
  predicted_iou x stability_score (our choice, because CutLER needs detectron2); ``none``.

Every image becomes one engine record ``{"height", "width", "proposals": [Proposal.to_dict()]}`` with
``segmentation`` a COCO RLE (``{"size": [h, w], "counts": str}``), ``bbox`` xywh, ``area``,
``predicted_iou`` and ``stability_score``. All settings come from the profile's ``masks:`` section.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from . import engine
from .images import MAX_PIXELS, display_path, load_image_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------------------
# proposals and RLE helpers


@dataclass
class Proposal:
    """One mask proposal.

    Attributes:
      segmentation (dict): COCO RLE ``{"size": [h, w], "counts": str}``.
      bbox (list[float]): ``[x, y, w, h]`` (XYWH) of the mask.
      area (int): pixels in the mask.
      predicted_iou (float): SAM's own quality estimate (1.0 for the components backend).
      stability_score (float): SAM's stability score (1.0 for the components backend).
    """

    segmentation: dict
    bbox: list
    area: int
    predicted_iou: float
    stability_score: float

    @property
    def score(self) -> float:
        """predicted_iou x stability_score (the ranking of the SAM-only selector)."""
        return float(self.predicted_iou) * float(self.stability_score)

    def to_dict(self) -> dict:
        return asdict(self)

    def mask(self) -> np.ndarray:
        """HxW uint8 {0, 1}."""
        return rle_to_mask(self.segmentation)


def mask_to_rle(mask: np.ndarray) -> dict:
    """HxW bool/uint8 mask -> COCO RLE with ``str`` counts."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (str or bytes counts) -> HxW uint8 {0, 1}."""
    return np.ascontiguousarray(mask_utils.decode(_rle_bytes(rle)))


def _rle_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _str_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
        counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}


def proposal_from_ann(ann: dict) -> Proposal:
    """A :class:`Proposal` from one record of ``SamAutomaticMaskGenerator.generate`` (any output_mode)."""
    seg = ann["segmentation"]
    rle = mask_to_rle(seg) if isinstance(seg, np.ndarray) else _str_rle(seg)
    area = int(mask_utils.area(_rle_bytes(rle)))
    bbox = [float(v) for v in mask_utils.toBbox(_rle_bytes(rle))]
    return Proposal(segmentation=rle, bbox=bbox, area=area,
                    predicted_iou=float(ann.get("predicted_iou", 1.0)),
                    stability_score=float(ann.get("stability_score", 1.0)))


def _iou_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """NxM mask IoU of two lists of RLEs."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([_rle_bytes(r) for r in a], [_rle_bytes(r) for r in b], [0] * len(b)))


def _inside_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """NxM: fraction of mask a_i that lies inside mask b_j, |a_i & b_j| / |a_i|."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([_rle_bytes(r) for r in a], [_rle_bytes(r) for r in b], [1] * len(b)))


def _dedup_exact(props: list[Proposal]) -> list[Proposal]:
    seen, out = set(), []
    for p in props:
        key = (tuple(p.segmentation["size"]), p.segmentation["counts"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------------------
# selectors


def select_sam_only(
    props: list[Proposal],
    image_hw: tuple[int, int],
    *,
    min_area: int = 0,
    min_area_frac: float = 0.0,
    max_area_frac: float = 1.0,
    nms_iou: float = 0.7,
    containment: float = 0.9,
    max_masks: int | None = None,
) -> list[Proposal]:
    """The SAM-only selector (our choice; the paper uses CutLER): reduce SAM's over-segmentation.

    1. drop exact duplicates and masks with area < max(min_area, min_area_frac*H*W) or > max_area_frac*H*W;
    2. greedy mask NMS in order of score = predicted_iou x stability_score: drop a mask whose IoU with a
       kept (higher-scoring) mask is > ``nms_iou`` (this also removes near-duplicates);
    3. containment, largest first: drop a mask when >= ``containment`` of its pixels lie inside a larger
       kept mask (SAM's sub-parts of one object);
    4. keep the ``max_masks`` best by score.

    Returns the kept proposals sorted by score (ties: original order).
    """
    h, w = image_hw
    lo = max(float(min_area), float(min_area_frac) * h * w)
    hi = float(max_area_frac) * h * w
    cand = [p for p in _dedup_exact(props) if lo <= p.area <= hi]
    order = sorted(range(len(cand)), key=lambda i: (-cand[i].score, i))
    cand = [cand[i] for i in order]
    rles = [p.segmentation for p in cand]
    iou = _iou_matrix(rles, rles)
    keep: list[int] = []
    for i in range(len(cand)):
        if all(iou[i, j] <= nms_iou for j in keep):
            keep.append(i)
    if containment is not None and containment < 1.0 + 1e-9 and keep:
        inside = _inside_matrix(rles, rles)
        by_area = sorted(keep, key=lambda i: (-cand[i].area, i))
        kept2: list[int] = []
        for i in by_area:
            if not any(cand[j].area > cand[i].area and inside[i, j] >= containment for j in kept2):
                kept2.append(i)
        keep = sorted(kept2)
    out = [cand[i] for i in keep]
    return out[:max_masks] if max_masks else out


def select_by_external(props: list[Proposal], external: list[dict] | None) -> list[Proposal]:
    """The authors' rule: for each external instance mask (e.g. a CutLER detection), keep the proposal with
    the largest raw pixel overlap |proposal & external|. Proposals chosen twice are kept once (we
    de-duplicate; the authors do not). No external mask, or no overlap -> nothing for that instance;
    an image without external masks gets no proposals (the authors skip it).

    Arguments:
      props: the SAM proposals of one image.
      external: COCO RLEs (HxW of the image) of the external instances.
    """
    if not props or not external:
        return []
    rles = [p.segmentation for p in props]
    areas = np.array([p.area for p in props], dtype=np.float64)
    inter = np.rint(_inside_matrix(rles, [_str_rle(e) for e in external]) * areas[:, None])  # N x G pixels
    chosen: list[int] = []
    for g in range(inter.shape[1]):
        j = int(np.argmax(inter[:, g]))  # first maximum: deterministic
        if inter[j, g] > 0 and j not in chosen:
            chosen.append(j)
    return _dedup_exact([props[j] for j in chosen])


SELECTORS = ("none", "sam_only", "external", "auto")


def make_selector(cfg: dict | None) -> Callable[[list[Proposal], tuple[int, int], list | None], list[Proposal]]:
    """A selector ``(proposals, (h, w), external_rles_or_None) -> proposals`` from a ``selector:`` dict.

    ``kind``: ``none`` (exact de-duplication only), ``sam_only`` (:func:`select_sam_only`, the other keys are
    its arguments), ``external`` (:func:`select_by_external`), ``auto`` (external when external masks are
    configured, else sam_only).
    """
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "auto")
    if kind not in SELECTORS:
        raise ValueError(f"masks.selector.kind must be one of {SELECTORS}, got {kind!r}")
    allowed = set(inspect.signature(select_sam_only).parameters) - {"props", "image_hw"}
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"masks.selector: unknown keys {sorted(unknown)} (allowed: kind, {sorted(allowed)})")

    def select(props, image_hw, external=None):
        if kind == "external" or (kind == "auto" and external is not None):
            return select_by_external(props, external or [])
        if kind == "none":
            return _dedup_exact(props)
        return select_sam_only(props, image_hw, **cfg)

    select.kind = kind
    return select


def load_external_masks(path: str | os.PathLike, *, min_score: float = 0.5, max_per_image: int = 100) -> dict:
    """External instance masks from a COCO results json (``[{"image_id", "segmentation", "score"}, ...]``,
    e.g. CutLER's detections): ``{image_id: [rle, ...]}`` keeping score >= ``min_score`` and at most
    ``max_per_image`` best per image (the paper: score >= 0.5, <= 100 detections)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks.external_masks: {path} does not exist (a COCO results json of "
                                "instance masks, e.g. CutLER detections)")
    try:
        dets = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"masks.external_masks: {path} is not valid JSON ({e})") from e
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list) or any("image_id" not in d or "segmentation" not in d for d in dets):
        raise ValueError(f"masks.external_masks: {path} must be a list of {{'image_id', 'segmentation', "
                         "'score'}} (COCO results format)")
    per: dict = {}
    for d in dets:
        if float(d.get("score", 1.0)) >= min_score:
            per.setdefault(d["image_id"], []).append(d)
    out = {}
    for image_id, ds in per.items():
        ds = sorted(ds, key=lambda d: -float(d.get("score", 1.0)))[:max_per_image]
        out[image_id] = [_str_rle(d["segmentation"]) for d in ds]
    return out


# ----------------------------------------------------------------------------------------------------------
# SAM models


class CheckpointError(ValueError):
    """A SAM checkpoint that is missing, unreadable or does not match the chosen architecture."""


#: The checkpoint each variant expects (segment-anything's release names).
SAM_CHECKPOINT_NAMES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_b": "sam_vit_b_01ec64.pth", "tiny": "a state dict saved from build_sam_tiny()"}


def build_sam_tiny(checkpoint=None):
    """A ~0.2 M-parameter SAM built from segment-anything's own modules (CPU tests and CI; random init).

    img_size 256, patch 16 (16x16 embedding), ViT embed 64, depth 2, 2 heads, window 4, prompt dim 32,
    decoder depth 1. ``checkpoint`` is loaded by :func:`build_sam` (strictly, on CPU).
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_size, patch, prompt_dim = 256, 16, 32
    emb = image_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size, patch_size=patch, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
            out_chans=prompt_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(emb, emb),
                                     input_image_size=(image_size, image_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _registry_builder(variant: str):
    def build(checkpoint=None):
        from segment_anything import sam_model_registry

        return sam_model_registry[variant](checkpoint=None)  # weights loaded by build_sam (map_location)

    build.__name__ = f"build_sam_{variant}"
    return build


#: variant -> builder(checkpoint=None) -> Sam with random weights (segment-anything's names + ``tiny``).
SAM_BUILDERS: dict[str, Callable] = {
    "vit_h": _registry_builder("vit_h"),
    "vit_l": _registry_builder("vit_l"),
    "vit_b": _registry_builder("vit_b"),
    "tiny": build_sam_tiny,
}


def load_sam_state_dict(model, checkpoint: str | os.PathLike, variant: str) -> None:
    """Load ``checkpoint`` into ``model`` strictly, on CPU (``map_location="cpu"``), failing with a message
    that names the expected checkpoint and lists missing / unexpected keys and shape mismatches."""
    import torch

    path = Path(checkpoint)
    expected = SAM_CHECKPOINT_NAMES.get(variant, "a SAM state dict")
    if not path.is_file():
        raise CheckpointError(f"masks.checkpoint: {path} does not exist; SAM variant {variant!r} expects "
                              f"{expected} (python -m ris_utils download --profile paper fetches it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file and the cause
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"masks.checkpoint: {path} is not a readable torch checkpoint "
                              f"({type(e).__name__}: {first}); SAM variant {variant!r} expects {expected}") from e
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"model": state_dict} wrappers
    if not isinstance(state, dict):
        raise CheckpointError(f"masks.checkpoint: {path} holds a {type(state).__name__}, expected a state dict "
                              f"of SAM variant {variant!r} ({expected})")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state))
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise CheckpointError(f"masks.checkpoint: {path} does not match SAM variant {variant!r} (expected "
                              f"{expected}): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def build_sam(variant: str, checkpoint: str | os.PathLike | None = None, *, device="cpu",
              random_init: bool = False, seed: int = 0):
    """Build a SAM of ``variant`` (:data:`SAM_BUILDERS`), load ``checkpoint`` on CPU, move to ``device``.

    ``random_init=True`` (tests, benchmarks, the paper-tiny profile) gives random weights seeded with
    ``seed`` and ignores ``checkpoint``; otherwise ``checkpoint`` is required.
    """
    import torch

    if variant not in SAM_BUILDERS:
        raise ValueError(f"masks.sam_variant must be one of {sorted(SAM_BUILDERS)}, got {variant!r}")
    if random_init and checkpoint is not None:
        logger.warning("masks: random_init is true: ignoring checkpoint %s (random weights, tests only)", checkpoint)
        checkpoint = None
    if checkpoint is None and not random_init:
        raise CheckpointError(f"masks.checkpoint is not set: SAM variant {variant!r} expects "
                              f"{SAM_CHECKPOINT_NAMES[variant]} (or set masks.random_init: true for a "
                              "random-weight model, for tests only)")
    if checkpoint is not None and not Path(checkpoint).is_file():  # fail before building a 2.5 GB model
        raise CheckpointError(f"masks.checkpoint: {checkpoint} does not exist; SAM variant {variant!r} expects "
                              f"{SAM_CHECKPOINT_NAMES[variant]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SAM_BUILDERS[variant]()
    if checkpoint is not None:
        load_sam_state_dict(model, checkpoint, variant)
    return model.to(device).eval()


def build_sam_generator(cfg: dict):
    """``SamAutomaticMaskGenerator(sam, **cfg["amg"], output_mode="coco_rle")`` from a ``masks`` config.

    ``amg`` holds only the settings that differ from segment-anything's defaults (the paper:
    ``pred_iou_thresh: 0.5``); unknown keys fail with the list of allowed ones.
    """
    from segment_anything import SamAutomaticMaskGenerator

    from .models import resolve_device

    amg = dict(cfg.get("amg") or {})
    allowed = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters) - {"self", "model"}
    unknown = set(amg) - allowed
    if unknown:
        raise ValueError(f"masks.amg: unknown SamAutomaticMaskGenerator settings {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")
    if amg.pop("output_mode", "coco_rle") != "coco_rle":
        raise ValueError("masks.amg.output_mode must be coco_rle (records store COCO RLE)")
    device = resolve_device(cfg.get("device", "auto"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        import torch

        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    sam = build_sam(cfg.get("sam_variant", "vit_h"), cfg.get("checkpoint"), device=device,
                    random_init=bool(cfg.get("random_init", False)), seed=int(cfg.get("seed", 0)))
    return SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **amg)


# ----------------------------------------------------------------------------------------------------------
# the classical backend


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
        iou = _iou_matrix(rles, rles)
        keep: list[int] = []
        for i in range(len(rles)):
            if all(iou[i, j] < self.dedup_iou for j in keep):
                keep.append(i)
        return [{"segmentation": rles[i], "predicted_iou": 1.0, "stability_score": 1.0} for i in keep]


# ----------------------------------------------------------------------------------------------------------
# the step


def propose_masks(image: np.ndarray, backend, selector=None, external: list[dict] | None = None) -> list[Proposal]:
    """Mask proposals of one image.

    Arguments:
      image (np.ndarray): HxWx3 uint8, RGB.
      backend: anything with ``generate(image) -> [ann]`` in segment-anything's record format, e.g. a
        ``SamAutomaticMaskGenerator`` (any output_mode) or a :class:`ComponentsSegmenter`.
      selector: ``None`` (exact de-duplication only), a ``selector:`` config dict (:func:`make_selector`) or
        a callable ``(proposals, (h, w), external) -> proposals``.
      external (list[dict] | None): external instance masks of this image (COCO RLEs) for the
        ``external`` selector.

    Returns:
      list[Proposal]: segmentation (COCO RLE, str counts), bbox xywh, area, predicted_iou, stability_score.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"propose_masks expects an HxWx3 uint8 RGB array, got "
                         f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
    props = [proposal_from_ann(a) for a in backend.generate(image)]
    if selector is None:
        return _dedup_exact(props)
    if isinstance(selector, dict):
        selector = make_selector(selector)
    return selector(props, image.shape[:2], external)


def build_backend(cfg: dict):
    """The backend of a ``masks`` config (builds SAM here, so checkpoint problems fail before any image)."""
    backend = cfg.get("backend", "sam")
    if backend == "sam":
        return build_sam_generator(cfg)
    if backend == "components":
        return ComponentsSegmenter(**(cfg.get("components") or {}))
    raise ValueError(f"masks.backend must be 'sam' or 'components', got {backend!r}")


#: masks-config keys whose values change the records (fingerprinted, so a resume with others refuses).
OUTPUT_KEYS = ("backend", "sam_variant", "checkpoint", "random_init", "amg", "selector", "components",
               "external_masks", "external_min_score", "external_max_per_image", "min_side")


def make_step_fn(cfg: dict) -> Callable[[dict], dict]:
    """``fn(item) -> {"path", "height", "width", "proposals"}`` for :func:`ris_utils.engine.run`; builds the backend,
    the selector and the external masks NOW (fail fast)."""
    backend = build_backend(cfg)
    selector = make_selector(cfg.get("selector"))
    external = None
    if cfg.get("external_masks"):
        external = load_external_masks(cfg["external_masks"], min_score=float(cfg.get("external_min_score", 0.5)),
                                       max_per_image=int(cfg.get("external_max_per_image", 100)))
    min_side = int(cfg.get("min_side", 8))
    max_pixels = check_max_pixels(cfg.get("max_pixels", MAX_PIXELS))

    def fn(item: dict) -> dict:
        image = load_image_rgb(item["path"], min_side=min_side, max_pixels=max_pixels)
        ext = None if external is None else external.get(item["image_id"], [])
        props = propose_masks(image, backend, selector, ext)
        # the image's path travels with the record, so step 2 reads the very file step 1 segmented
        return {"path": str(item["path"]), "height": int(image.shape[0]), "width": int(image.shape[1]),
                "proposals": [p.to_dict() for p in props]}

    return fn


def run_masks(cfg: dict, items: list[dict], out_dir: str | os.PathLike, *, fn: Callable | None = None,
              progress: bool = True) -> dict:
    """Run step 1 over ``items`` through the engine into ``out_dir``; returns the engine summary.

    ``fn``: a step function from :func:`make_step_fn` (same ``cfg``) to reuse a built model across splits;
    by default it is built here, before any image is read.
    """
    fn = fn or make_step_fn(cfg)
    conf = {k: cfg.get(k) for k in OUTPUT_KEYS}
    return engine.run("masks", items, fn, out_dir, seed=int(cfg.get("seed", 0)), config=conf,
                      desc="masks", progress=progress)


def check_max_pixels(value) -> int:
    """``masks.max_pixels`` as a positive int (refused with the setting named otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1 or int(value) != value:
        raise ValueError(f"masks.max_pixels must be a positive number of pixels (default {MAX_PIXELS:,}), got {value!r}")
    return int(value)


def image_items_from(images: str | os.PathLike) -> list[dict]:
    """Engine items from a folder (image files, sorted, recursive), a text file (one path per line,
    relative to the list's folder) or a JSON list of ``{"image_id", "path"}``. ``image_id`` = the path
    relative to the folder / as listed. A listed file that is missing becomes an error record later, and so
    does (in a folder) a dangling symlink, a symlink loop, an unreadable file, a name that is not valid UTF-8
    (its ``image_id`` / ``file_name`` show the bad bytes as ``\\xNN``), and (in a JSON list) an item without
    ``path``."""
    p = Path(images)
    if p.is_dir():
        # not f.is_dir(): regular files, and also dangling links / loops, which become error records
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and not f.is_dir())
        if not files:
            raise ValueError(f"--images {p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return [{"image_id": display_path(f.relative_to(p)), "path": str(f), "file_name": display_path(f.name)}
                for f in files]
    if not p.is_file():
        raise FileNotFoundError(f"--images {p}: no such folder or list file")
    if p.suffix == ".json":
        try:
            items = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--images {p}: not valid JSON ({e}); a JSON list of {{'image_id', 'path'}} "
                             f"expected") from None
        if not isinstance(items, list):
            raise ValueError(f"--images {p}: a JSON list of {{'image_id', 'path'}} expected")
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise ValueError(f"--images {p}: item {i} is {type(it).__name__}, not an object "
                                 f"{{'image_id', 'path'}}")
            if it.get("path") and not Path(it["path"]).is_absolute():
                it["path"] = str(p.parent / it["path"])
            if "image_id" not in it:  # keyed by its path, or by its position when it has none
                it["image_id"] = it.get("path") or f"{p.name}[{i}]"
            if not it.get("path"):  # the engine makes it an error record naming the list and the item
                it["file_name"] = f"{p.name}[{i}]"
        return items
    items = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            f = Path(line) if Path(line).is_absolute() else p.parent / line
            items.append({"image_id": line, "path": str(f), "file_name": f.name})
    return items


def split_items(cfg: dict, split: str) -> list[dict]:
    """The unique images of a REFER split of the profile's dataset (``masks.dataset``/``masks.split_by``)."""
    from .data.refer import load_refer

    dataset, split_by = cfg.get("dataset"), cfg.get("split_by")
    if not dataset or not split_by:
        raise ValueError("masks.dataset and masks.split_by must name the REFER dataset whose split images "
                         f"are processed (profile {cfg.get('profile')!r})")
    return load_refer(cfg["data_root"], dataset, split_by).image_items(split)


def output_dir_for(cfg: dict, split: str) -> Path:
    """``<work_dir>/masks/<split>``."""
    return Path(cfg["work_dir"]) / "masks" / split


# ----------------------------------------------------------------------------------------------------------
# measuring proposals against ground-truth objects


def gt_masks(cfg: dict, split: str) -> dict:
    """Ground-truth object masks of the images of ``split``: ``{image_id: [rle, ...]}``.

    The shapes world (``<data_root>/scenes.json`` present): every object of every image
    (:func:`ris_utils.data.shapes.object_masks`). Other worlds (no per-object ground truth): the masks of
    the REFER refs of that split (one per referred annotation).
    """
    from .data.refer import encode_mask, load_refer

    data_root = Path(cfg["data_root"])
    ref = load_refer(data_root, cfg["dataset"], cfg["split_by"])
    ids = [it["image_id"] for it in ref.image_items(split)]
    out: dict = {}
    if (data_root / "scenes.json").is_file():
        from .data import shapes

        for i in ids:
            out[i] = [_str_rle(encode_mask(m)) for m in shapes.object_masks(data_root, i).values()]
        return out
    for r in ref.refs:
        if r["image_id"] in set(ids) and r["split"] == split:
            rles = out.setdefault(r["image_id"], [])
            rle = _str_rle(encode_mask(ref.get_mask(r)))
            if rle not in rles:
                rles.append(rle)
    return out


def proposal_quality(records, gt: dict, *, iou_threshold: float = 0.5) -> dict:
    """How well the proposals cover the ground-truth objects.

    For every ground-truth mask g of an image: best IoU = max over the image's proposals p of
    |p & g| / |p | g| (0 without proposals or when the image failed).

    Arguments:
      records: engine records of the masks step (``{"image_id", "status", "proposals"}``).
      gt: ``{image_id: [rle, ...]}`` (:func:`gt_masks`).

    Returns:
      dict: ``recall_at_0.5`` (share of ground-truth masks with best IoU >= ``iou_threshold``),
      ``mean_best_iou``, ``n_gt``, ``n_images``, ``proposals_per_image`` (over ok records),
      ``best_ious`` (list, for plots).
    """
    by_id = {r["image_id"]: r for r in records}
    best, counts = [], []
    for image_id, gts in gt.items():
        rec = by_id.get(image_id)
        props = [p["segmentation"] for p in rec["proposals"]] if rec and rec.get("status") == "ok" else []
        if rec and rec.get("status") == "ok":
            counts.append(len(props))
        if not gts:
            continue
        best.extend(_iou_matrix(gts, props).max(1).tolist() if props else [0.0] * len(gts))
    b = np.asarray(best, dtype=np.float64)
    return {"recall_at_0.5" if iou_threshold == 0.5 else f"recall_at_{iou_threshold}":
            float((b >= iou_threshold).mean()) if b.size else 0.0,
            "mean_best_iou": float(b.mean()) if b.size else 0.0, "n_gt": int(b.size), "n_images": len(gt),
            "proposals_per_image": float(np.mean(counts)) if counts else 0.0, "best_ious": b.tolist()}


def cli(argv: list[str] | None = None) -> int:
    """``python -m ris_utils masks (--images DIR_OR_LIST --out DIR | --split S) --profile NAME [--param k=v]``."""
    from .profiles import parse_params, step_config

    ap = argparse.ArgumentParser(prog="python -m ris_utils masks", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, a text file of paths, or a JSON list of items")
    src.add_argument("--split", action="append",
                     help="REFER split(s) of the profile's dataset (repeatable); default out: <work_dir>/masks/<split>")
    ap.add_argument("--out", help="output folder (required with --images)")
    ap.add_argument("--profile", default="shapes")
    ap.add_argument("--param", action="append", default=[], help="override a masks setting: key=value (dotted keys)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any image became an error record")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = step_config(args.profile, "masks", **parse_params(args.param))
    if args.images and not args.out:
        ap.error("--out is required with --images")
    try:
        fn = make_step_fn(cfg)  # the model first: checkpoint problems fail before any image
        if args.images:
            jobs = [(image_items_from(args.images), Path(args.out))]
        else:
            jobs = [(split_items(cfg, s), Path(args.out) / s if args.out else output_dir_for(cfg, s))
                    for s in args.split]
        summaries = []
        for items, out in jobs:
            summaries.append((out, run_masks(cfg, items, out, fn=fn, progress=not args.no_progress)))
    except (engine.ResumeMismatchError, engine.FolderBusyError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for out, summary in summaries:
        if summary.get("merged"):
            print(json.dumps({k: summary[k] for k in ("step", "n_items", "ok", "failed", "failed_reasons")}))
            print(f"records: {out / engine.RECORDS}")
    # failed images are error records counted in summary.json; they fail the command only with --strict
    return engine.strict_exit(args.strict, [s for _, s in summaries])



if __name__ == "__main__":
    sys.exit(cli())
