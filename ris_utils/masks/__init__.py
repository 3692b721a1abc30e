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

The package follows the step's seams: :mod:`.proposals` (the record format, RLE helpers), :mod:`.selectors`,
:mod:`.sam` (one builder per SAM variant), :mod:`.components` (the shapes world's segmenter), :mod:`.step`
(items, the step function, the CLI) and :mod:`.quality` (proposals vs ground truth).
"""

from __future__ import annotations

from .components import ComponentsSegmenter
from .proposals import (
                  Proposal,
                  dedup_exact,
                  inside_matrix,
                  iou_matrix,
                  mask_to_rle,
                  proposal_from_ann,
                  rle_bytes,
                  rle_to_mask,
                  str_rle,
)
from .quality import gt_masks, proposal_quality
from .sam import (
                  SAM_BUILDERS,
                  SAM_CHECKPOINT_NAMES,
                  CheckpointError,
                  build_sam,
                  build_sam_generator,
                  build_sam_tiny,
                  build_sam_vit_b,
                  build_sam_vit_h,
                  build_sam_vit_l,
                  load_sam_state_dict,
)
from .selectors import SELECTORS, load_external_masks, make_selector, select_by_external, select_sam_only
from .step import (
                  IMAGE_EXTENSIONS,
                  OUTPUT_KEYS,
                  build_backend,
                  check_max_pixels,
                  cli,
                  image_items_from,
                  make_step_fn,
                  output_dir_for,
                  propose_masks,
                  run_masks,
                  split_items,
)

__all__ = [
    "CheckpointError", "ComponentsSegmenter", "IMAGE_EXTENSIONS", "OUTPUT_KEYS", "Proposal", "SAM_BUILDERS",
    "SAM_CHECKPOINT_NAMES", "SELECTORS", "build_backend", "build_sam", "build_sam_generator", "build_sam_tiny",
    "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l", "check_max_pixels", "cli", "dedup_exact",
    "gt_masks", "image_items_from", "inside_matrix", "iou_matrix", "load_external_masks", "load_sam_state_dict",
    "make_selector", "make_step_fn", "mask_to_rle", "output_dir_for", "proposal_from_ann", "proposal_quality",
    "propose_masks", "rle_bytes", "rle_to_mask", "run_masks", "select_by_external", "select_sam_only",
    "split_items", "str_rle",
]
