"""SAM models: one builder per variant (segment-anything's ``build_sam_vit_h`` style), strict checkpoint
loading on CPU, and the automatic mask generator of a ``masks`` config.

segment-anything and torch are imported inside the functions: the shapes world's components backend and
``python -m ris_utils masks --help`` never pay their import time.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..models import resolve_device
from ..settings import complete

logger = logging.getLogger(__name__)



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


def build_sam_vit_h(checkpoint=None):
    """segment-anything's ViT-H (the paper's SAM; ``sam_vit_h_4b8939.pth``), random weights: the checkpoint is
    loaded by :func:`build_sam` (strictly, on CPU first)."""
    from segment_anything import build_sam_vit_h as build

    return build(checkpoint=None)


def build_sam_vit_l(checkpoint=None):
    """segment-anything's ViT-L (``sam_vit_l_0b3195.pth``), random weights (see :func:`build_sam_vit_h`)."""
    from segment_anything import build_sam_vit_l as build

    return build(checkpoint=None)


def build_sam_vit_b(checkpoint=None):
    """segment-anything's ViT-B (``sam_vit_b_01ec64.pth``), random weights (see :func:`build_sam_vit_h`)."""
    from segment_anything import build_sam_vit_b as build

    return build(checkpoint=None)


#: variant -> builder(checkpoint=None) -> Sam with random weights (segment-anything's names + ``tiny``).
SAM_BUILDERS: dict[str, Callable] = {
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
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

    cfg = complete("masks", cfg)
    amg = dict(cfg.get("amg") or {})
    allowed = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters) - {"self", "model"}
    unknown = set(amg) - allowed
    if unknown:
        raise ValueError(f"masks.amg: unknown SamAutomaticMaskGenerator settings {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")
    if amg.pop("output_mode", "coco_rle") != "coco_rle":
        raise ValueError("masks.amg.output_mode must be coco_rle (records store COCO RLE)")
    device = resolve_device(cfg["device"])
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        import torch

        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    sam = build_sam(cfg["sam_variant"], cfg["checkpoint"], device=device, random_init=bool(cfg["random_init"]),
                    seed=int(cfg["seed"]))
    return SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **amg)
