"""Typed profiles: one dataclass per profile section, each default written once, unknown keys refused.

A profile file (``papermill_runs/<profile>.yaml``) has the sections of :data:`SECTIONS`; each section is a
dataclass below, its fields are the section's keys and their defaults the value a step uses when the profile
does not set the key (or sets it to ``null``). Where the paper or the authors' code gives a value, the comment
says so ([paper], [authors], [CRIS], as in ``papermill_runs/paper.yaml``); ``None`` on a nested option group
(``masks.amg``, ``masks.components``, ...) means "the component's own default".

API (used by :mod:`ris_utils.profiles`, the CLI and the notebooks):

- :func:`check_profile(data, where)` -- refuse unknown sections / keys of a loaded profile file;
- :func:`check_overrides(step, overrides, where)` -- refuse unknown keys of ``--param`` / notebook overrides;
- :func:`defaults(step)` -- the section's top-level defaults (+ ``shared``'s) as a dict: what
  :func:`ris_utils.profiles.step_config` starts from, so a step reads ``cfg["key"]``, never a literal default;
- :func:`complete(step, cfg)` -- a config built in code (tests, ``generate``) with the missing defaults added;
- :func:`group(cls, given)` -- a nested option group (e.g. ``captions.train``) with its defaults filled in;
- :func:`typed(step, cfg)` -- the section as its dataclass instance (attribute access).

Every error is one line naming the key, where it came from and the closest valid key::

    unknown setting 'masks.backendd' in --param / notebook overrides of profile 'shapes'; did you mean
    'masks.backend'? (valid keys of masks: ...)

Adding a setting is one line: a field (with its default and source) in its section's dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field


def _group(cls):
    """A nested option group: its own dataclass validates its keys; not filled by :func:`defaults`."""
    return field(default=None, metadata={"group": cls})


def _items(cls):
    """A list of mappings, each checked against ``cls``."""
    return field(default=None, metadata={"items": cls})


def _free(default=None):
    """A free mapping / list (keys are data, e.g. split names or training-set names): not checked."""
    return field(default_factory=lambda: copy.deepcopy(default)) if default is not None else field(default=None)


# --------------------------------------------------------------------------------------------- shared


@dataclass
class Shared:
    profile: str | None = None      # the profile's name (set from the file name when absent)
    seed: int = 0                   # every step is seeded from it
    device: str = "auto"            # auto = cuda if available, else cpu
    data_root: str | None = None    # REFER-layout data (ris_utils.layout)
    work_dir: str | None = None     # every step's outputs (ris_utils.layout)
    note: str | None = None         # printed by every notebook (what the profile proves)


# --------------------------------------------------------------------------------------------- data


@dataclass
class PseudoSplit:
    dataset: str | None = None
    split_by: str | None = None
    split: str | None = None


@dataclass
class UnseenDomain:
    name: str | None = None
    root: str | None = None
    out: str | None = None
    splits: list | None = None
    unseen_only: bool | None = None
    exclude_categories: str | None = None


@dataclass
class DatasetSpec:
    name: str | None = None
    split_by: str | None = None


@dataclass
class RandomCheckpoint:
    model: str | None = None
    path: str | None = None
    seed: int | None = None


@dataclass
class Data:
    world: str | None = None        # shapes | refer | samples (ris_utils.data.WORLDS)
    n_images: dict = _free({"train": 600, "val": 150, "testA": 100, "testB": 100})   # shapes world per split
    image_size: int = 128           # shapes world scene side
    datasets: list | None = _items(DatasetSpec)
    download: bool = False          # refer world: download what is missing
    need: list | None = None        # refer world: ris_utils.download.SOURCES names
    pseudo_split: PseudoSplit | None = _group(PseudoSplit)
    unseen_domain: UnseenDomain | None = _group(UnseenDomain)
    max_side: int = 320             # samples world: photos resized to this longest side
    random_checkpoints: list | None = _items(RandomCheckpoint)
    photos: str | None = None       # samples world: a folder of photos instead of the built-in ones
    progress: bool = True           # download progress bars


# --------------------------------------------------------------------------------------------- masks


@dataclass
class Components:                   # ris_utils.masks.ComponentsSegmenter's arguments (None = its default)
    fg_threshold: float | None = None
    n_colors: int | None = None
    close_radius: int | None = None
    max_hole: int | None = None
    min_area: int | None = None
    dedup_iou: float | None = None


@dataclass
class Amg:                          # SamAutomaticMaskGenerator(sam, ...) (None = segment-anything's default)
    points_per_side: int | None = None           # [authors] 32
    points_per_batch: int | None = None          # 64
    pred_iou_thresh: float | None = None         # [authors] 0.5 (segment-anything: 0.88)
    stability_score_thresh: float | None = None  # 0.95
    stability_score_offset: float | None = None  # 1.0
    box_nms_thresh: float | None = None          # 0.7
    crop_n_layers: int | None = None             # 0
    crop_nms_thresh: float | None = None         # 0.7
    crop_overlap_ratio: float | None = None      # 512 / 1500
    crop_n_points_downscale_factor: int | None = None   # 1
    point_grids: list | None = None
    min_mask_region_area: int | None = None      # 0
    output_mode: str | None = None               # binary_mask


@dataclass
class Selector:                     # ris_utils.masks.make_selector (None = select_sam_only's default)
    kind: str | None = None         # none | sam_only | external | auto (default auto)
    min_area: int | None = None
    min_area_frac: float | None = None
    max_area_frac: float | None = None
    nms_iou: float | None = None
    containment: float | None = None
    max_masks: int | None = None


@dataclass
class Masks:
    backend: str = "sam"            # [paper] SAM proposals | components (shapes, pixels only)
    splits: list | None = None      # REFER splits whose images get proposals
    dataset: str | None = None      # REFER dataset naming the split images
    split_by: str | None = None
    components: Components | None = _group(Components)
    sam_variant: str = "vit_h"      # [paper] SAM ViT-H
    checkpoint: str | None = None   # [authors] sam_vit_h_4b8939.pth
    random_init: bool = False       # random SAM weights (tests / benchmarks only)
    amg: Amg | None = _group(Amg)
    selector: Selector | None = _group(Selector)
    external_masks: str | None = None      # COCO results json (e.g. CutLER) for the external selector
    external_min_score: float = 0.5        # [authors] CutLER score >= 0.5
    external_max_per_image: int = 100      # [authors] <= 100 detections
    min_side: int = 8               # smaller images are error records
    max_pixels: int = 40_000_000    # larger images (w x h) are error records, checked before decoding
    images: str | None = None       # image folder (default: the data root's, ris_utils.layout)


# --------------------------------------------------------------------------------------------- captions


@dataclass
class Beam:                         # the beam candidate of each view (only when the profile gives captions.beam)
    num_beams: int = 6                      # [authors] open_clip generate's default
    num_beam_groups: int = 3                # [authors]
    hypotheses: str | None = None           # per_group (default) | shared (transformers < 4.31, the authors')


@dataclass
class CaptionerTrain:               # python -m ris_utils.captioning.train (the shapes captioner; not in the paper)
    seed: int = 0                   # torch init + batch sampling + caption sampling
    world_seed: int = 1000          # the in-memory training world's seed (not the evaluation world's)
    n_images: int = 400             # training scenes (3-7 objects each)
    image_size: int = 128           # the shapes profile's data.image_size
    steps: int = 1400
    batch_size: int = 64
    lr: float = 2.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    caption_loss_weight: float = 2.0        # open_clip's CoCa defaults
    clip_loss_weight: float = 1.0
    threads: int = 1                # torch threads while training (1 is fastest on a shared 2-core machine)


#: [authors] distinctive sampling's contrast term only for images with 2 <= N <= 30 masks.
N_RANGE = (2, 30)


@dataclass
class Captions:
    model: str = "coca_shapes"      # open_clip model name ([paper] coca_ViT-L-14)
    pretrained: str | None = None   # open_clip tag or checkpoint path
    tokenizer: str = "shapes"       # shapes (word-level) | open_clip ([paper])
    source: str = "masks"           # masks = step-1 records | gt = the shapes world's object masks
    splits: list | None = None
    modes: list | None = None       # naive | distinctive
    views: list = _free(["masked", 1.0, 1.1, 1.2])   # [authors] masked crop, box x1.0, x1.1, x1.2
    fill: object = 0                # outside-mask fill: mean | authors | a grey 0..255
    box: str = "exclusive"          # exclusive | authors (their off-by-one crops)
    precision: str = "fp32"         # fp32 | autocast_fp16 ([authors], CUDA only)
    beam: Beam | None = _group(Beam)
    top_k: list | None = None       # [authors] 5, 7, 9, 11, 13
    top_p: list | None = None       # [authors] 0.4 ... 0.8
    seq_len: int = 30               # [authors] open_clip generate default
    min_seq_len: int = 5            # [authors] open_clip generate default
    temperature: float = 1.0        # [authors]
    n_range: list = _free(list(N_RANGE))
    max_images: object = None       # cap per split: a number, {split: number} or null
    extra_seeds: list | None = None  # notebook 02: more sampling seeds for the val distinct rate
    threads: int | None = None      # torch threads while decoding (None = torch default)
    workers: int = 1                # processes, each decoding a shard of every job
    images: str | None = None       # image folder (default: the data root's, ris_utils.layout)
    train: CaptionerTrain | None = _group(CaptionerTrain)


# --------------------------------------------------------------------------------------------- filter


@dataclass
class ClipTrain:                    # python -m ris_utils.train_clip (the shapes CLIP; not in the paper)
    steps: int = 300
    batch_size: int = 96
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    fill: object = 0                # fill of the masked training view
    world_seed: int = 2000
    n_images: int = 400
    val_images: int = 60
    image_size: int = 128
    threads: int = 1


@dataclass
class Clip:                         # the DoC scorer ([paper] RN50, openai, open_clip tokenizer)
    model: str | None = None
    checkpoint: str | None = None
    pretrained: str | None = None
    tokenizer: str = "open_clip"    # [paper] open_clip | shapes
    train_if_missing: bool | None = None   # train the shapes CLIP when the checkpoint is missing
    noun_prompt: str | None = None  # the training prompt (default: filter.noun_prompt)
    train: ClipTrain | None = _group(ClipTrain)


@dataclass
class HeadNoun:                     # ris_utils.text.HeadNounExtractor
    backend: str = "auto"           # auto (spaCy if installed, else rules) | spacy | rules
    spacy_model: str = "en_core_web_lg"   # [authors]
    rule: str = "authors"           # [authors] their noun_extraction rule
    nouns: list | None = None


@dataclass
class Filter:
    clip: Clip | None = _group(Clip)
    noun_prompt: str = "a photo of a {noun}"   # [authors] "a photo of " + noun
    fill: object = 0                # as captions.fill
    box: str = "exclusive"          # as captions.box
    precision: str = "fp32"         # fp32 | fp16 ([authors] OpenAI fp16 CLIP, CUDA only)
    logit_scale: float | None = None   # None = the model's exp(logit_scale) (OpenAI: 100)
    nonpositive: str = "clamp"      # clamp | shift
    fallback: str = "all"           # [authors] no survivor: every candidate | keep_random | drop
    head_noun: HeadNoun | None = _group(HeadNoun)
    batch_size: int = 256           # crops / texts per CLIP forward pass (memory only)
    threads: int | None = None      # torch threads for the step (None = torch default)
    workers: int = 1                # processes, each scoring a shard of every job
    modes: list | None = None
    splits: list | None = None
    seeds: list | None = None       # caption seeds over which distinct rates are reported
    images: str | None = None


# --------------------------------------------------------------------------------------------- export


@dataclass
class Mix:                          # semi-supervised mix (python -m ris_utils mix)
    fraction: float | None = None
    seed: int = 0
    human_dataset: str = "refcoco+"
    human_split_by: str = "unc"


@dataclass
class Export:
    dataset: str = "refcoco+"       # <out>/<dataset>/refs(<split_by>).p: a name the REFER toolkit accepts
    split_by: str = "pseudo"
    image_mode: str = "link"        # link | copy | none
    images: str | None = None       # source images (default: the data root's)
    dedupe: bool = False            # [paper] every surviving candidate is a sentence
    max_sentences_per_ref: int | None = None   # [authors] null = every survivor
    order: str = "generation"       # generation | doc
    trainsets: dict | None = None   # name -> {mode, filtered}
    mix: Mix | None = _group(Mix)


# --------------------------------------------------------------------------------------------- ris


@dataclass
class ModelArgs:                    # the CRIS head (ris_utils.ris.model; None = the builder's default)
    fpn_out: list | None = None     # [CRIS] [256, 512, 1024]
    num_layers: int | None = None   # [CRIS] 3
    num_heads: int | None = None    # [CRIS] 8
    dim_ffn: int | None = None      # [CRIS] 2048
    dropout: float | None = None    # [CRIS] 0.1
    prior: float | None = None
    c5_stride: int | None = None
    proj_upsample: int | None = None
    clip_prior: str | None = None   # (ours) attn | value: the pretrained CLIP's dense score as a residual logit
    prior_feature: bool | None = None
    proj_skip: bool | None = None   # (ours) the image tower's C3 into the projector (logits at stride 8)
    location: str | None = None     # (ours) relative: the relative-location head (ris.model.RelativeLocation)
    location_args: dict | None = _free()   # its pool (attention | bag), dim / hidden (attention)
    neck_kernel: int | None = None  # [CRIS] 3: the neck's convs; 1 (ours): 1x1, the tiny CPU head
    channels_last: bool | None = None   # (ours) the trained part in NHWC memory (CPU speed)


@dataclass
class Schedule:
    name: str | None = None         # multistep | cosine
    milestones: list | None = None
    gamma: float | None = None
    warmup_steps: int | None = None
    min_ratio: float | None = None


@dataclass
class PretrainEval:
    dataset: str | None = None
    split_by: str | None = None
    split: str | None = None
    max_refs: int | None = None
    data_root: str | None = None


@dataclass
class Pretrain:                     # python -m ris_utils.ris.pretrain (the shapes world's dense CLIP)
    model: str | None = None
    checkpoint: str | None = None
    c5_stride: int | None = None
    dense: str = "attn"              # value (MaskCLIP's values) | attn (CRIS's pool at every position)
    input_size: int | None = None
    world_seed: int | None = None
    n_images: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None
    seed: int | None = None
    threads: int | None = None
    eval: PretrainEval | None = _group(PretrainEval)


@dataclass
class EvalSet:
    style: str | None = None
    dataset: str | None = None
    split_by: str | None = None
    splits: list | None = None
    data_root: str | None = None
    eval_only: bool | None = None
    optional: bool | None = None


@dataclass
class ExperimentsMix:
    fraction: float | None = None
    seed: int | None = None


@dataclass
class ExperimentsVal:
    dataset: str | None = None
    split_by: str | None = None


@dataclass
class Experiments:                  # notebook 04's grid (ris_utils.ris.experiments)
    trainsets: list | None = None
    styles: list | None = None
    seeds: list | None = None
    seeds_by_trainset: dict | None = None
    workers: int | None = None
    split_by: str | None = None
    mix: ExperimentsMix | None = _group(ExperimentsMix)
    val: ExperimentsVal | None = _group(ExperimentsVal)
    eval_sets: list | None = _items(EvalSet)
    runs_dir: str | None = None


#: [CRIS] the learning-rate schedule: x0.1 at epoch 35 of 50, no warmup.
CRIS_SCHEDULE = {"name": "multistep", "milestones": [35], "gamma": 0.1, "warmup_steps": 0}

#: [CRIS] test-time mask: sigmoid > 0.35 at the original image size.
MASK_THRESHOLD = 0.35


@dataclass
class Ris:
    """The ``ris`` section. Keys that CRIS's config names as aliases (``clip_pretrained``, ``milestones`` +
    ``lr_decay``, ``max_norm``, ``num_layers``, ``num_head``, ``dim_ffn``, ``dropout``) stay ``None`` here:
    ``ris.build.resolve_config`` maps them onto the keys they name."""
    model: str = "cris_tiny"        # MODEL_REGISTRY name ([CRIS] cris_rn50)
    model_args: ModelArgs | None = _group(ModelArgs)
    pretrained: str = "default"     # default = the builder's (openai for cris_rn50/101, none for cris_tiny)
    clip_pretrained: str | None = None   # [CRIS] alias of pretrained
    freeze: str = "none"            # none ([CRIS]) | visual | text | both
    pretrain: Pretrain | None = _group(Pretrain)
    tokenizer: str = "shapes"       # shapes | open_clip ([CRIS])
    tokenizer_model: str = "RN50"
    input_size: int = 416           # [CRIS] letterbox side
    word_len: int = 17              # [CRIS] tokens per sentence
    threshold: float = MASK_THRESHOLD
    epochs: int = 50                # [CRIS]
    train_steps: int | None = None  # replaces epochs: that many optimizer steps
    batch_size: int = 64            # [CRIS]
    lr: float = 1e-4                # [CRIS] base_lr
    backbone_lr_mult: float = 0.1   # [CRIS]
    prior_lr_mult: float = 20.0     # (ours) the CLIP prior's scale / offset (model_args.clip_prior)
    location_lr_mult: float = 20.0  # (ours) the relative-location head (model_args.location)
    weight_decay: float = 0.0
    grad_clip: float = 0.0          # [CRIS] max_norm 0
    max_norm: float | None = None   # [CRIS] alias of grad_clip
    schedule: Schedule | None = _group(Schedule)   # None = CRIS_SCHEDULE
    milestones: list | None = None  # [CRIS] alias -> schedule
    lr_decay: float | None = None   # [CRIS] alias -> schedule.gamma
    num_layers: int | None = None   # [CRIS] alias -> model_args
    num_head: int | None = None     # [CRIS] alias -> model_args.num_heads
    dim_ffn: int | None = None      # [CRIS] alias -> model_args
    dropout: float | None = None    # [CRIS] alias -> model_args
    val_split: str = "val"
    val_max_refs: int | None = None
    val_every: int | None = None    # evaluate every this many steps (pick-vs-step curve); then the per-epoch
                                    # val scores are kept for the last epoch only
    eval_batch_size: int = 64
    num_workers: int = 0
    cache: bool = True
    convention: str = "lavt"        # lavt | cris
    adam_eps: float = 1e-8
    threads: int | None = None      # torch CPU threads (None = torch's default)
    dice_weight: float = 0.0        # (ours) + dice loss; [CRIS] 0
    loss_target: str = "nearest"    # nearest ([CRIS]) | area
    feature_cache: str | None = None     # folder of the frozen image tower's features (None: memory only)
    feature_cache_mb: float | None = 8192.0  # memory bound of a process's in-memory feature copy (None:
                                             # unbounded); the rest is read from feature_cache
    experiments: Experiments | None = _group(Experiments)
    eval_sets: list | None = _items(EvalSet)


# --------------------------------------------------------------------------------------------- tables


@dataclass
class Tables:
    paper_numbers: str | None = None   # published numbers with their source


#: section name -> its dataclass (``notebooks``: papermill parameters per notebook number, free).
SECTIONS = {"shared": Shared, "data": Data, "masks": Masks, "captions": Captions, "filter": Filter,
            "export": Export, "ris": Ris, "tables": Tables, "notebooks": None}

#: Keys of a profile file that are not sections.
FILE_KEYS = ("extends", "name")


class UnknownSettingError(ValueError):
    """A profile file, ``--param`` or a notebook override names a setting no section has."""


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, valid, where: str, prefix: str) -> UnknownSettingError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return UnknownSettingError(f"unknown setting '{prefix}{key}' in {where}{hint} (valid keys"
                               f"{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(valid))})")


def check_mapping(data: dict, cls, where: str, prefix: str, extra=()) -> None:
    """Refuse keys of ``data`` that ``cls`` (or ``extra``) does not have; recurse into groups and item lists."""
    fields = _fields(cls)
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            if key in extra:
                continue
            raise _unknown(str(key), set(fields) | set(extra), where, prefix)
        sub = f.metadata.get("group")
        if sub is not None and isinstance(value, dict):
            check_mapping(value, sub, where, f"{prefix}{key}.")
        item = f.metadata.get("items")
        if item is not None and isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    check_mapping(v, item, where, f"{prefix}{key}[{i}].")


def check_profile(data: dict, where: str) -> None:
    """Refuse unknown sections and keys of a profile file's mapping (``where`` names the file)."""
    for section, body in data.items():
        if section in FILE_KEYS:
            continue
        if section not in SECTIONS:
            raise _unknown(str(section), set(SECTIONS) | set(FILE_KEYS), where, "")
        cls = SECTIONS[section]
        if cls is None or body is None:
            continue
        if not isinstance(body, dict):
            raise ValueError(f"{where}: section '{section}' must be a mapping, got {type(body).__name__}")
        extra = () if cls is Shared else tuple(_fields(Shared))   # a section may override a shared key
        check_mapping(body, cls, where, f"{section}.", extra)


def check_overrides(step: str, overrides: dict, where: str) -> None:
    """Refuse keys of ``overrides`` (``--param`` / notebook parameters) that step ``step`` does not have."""
    cls = section_class(step)
    extra = () if cls is Shared else tuple(_fields(Shared))
    check_mapping(overrides, cls, where, f"{step}.", extra)


def section_class(step: str):
    if step not in SECTIONS or SECTIONS[step] is None:
        raise _unknown(step, [s for s, c in SECTIONS.items() if c is not None], "the step name", "")
    return SECTIONS[step]


def _default_of(f):
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


#: Sections whose defaults :func:`defaults` does not fill in (yet): ``ris`` -- its code resolves them
#: (``ris.build.resolve_config``, CRIS's aliases), and notebook 04's job keys hash the section as given, so
#: filling it would re-train finished runs. Switching ``ris`` over is one line here plus its code.
NOT_FILLED = ("ris",)


def defaults(step: str) -> dict:
    """``shared``'s and the section's top-level defaults (nested groups are left to :func:`group`)."""
    out = {f.name: _default_of(f) for f in dataclasses.fields(Shared)}
    cls = section_class(step)
    if cls is not Shared and step not in NOT_FILLED:
        out.update({f.name: _default_of(f) for f in dataclasses.fields(cls)
                    if "group" not in f.metadata and "items" not in f.metadata})
    return out


def complete(step: str, cfg: dict | None) -> dict:
    """``cfg`` with the defaults of ``step`` added for missing (or ``None``) keys (a config built in code)."""
    out = defaults(step)
    out.update({k: v for k, v in (cfg or {}).items() if v is not None or k not in out})
    return out


def group(cls, given: dict | None, where: str = "") -> dict:
    """A nested option group's settings: ``cls``'s defaults updated with ``given`` (unknown keys refused)."""
    given = dict(given or {})
    check_mapping(given, cls, where or "the settings", "")
    out = {f.name: _default_of(f) for f in dataclasses.fields(cls)}
    out.update(given)
    return out


def typed(step: str, cfg: dict):
    """The section ``step`` of a resolved config as its dataclass (keys of other sections ignored)."""
    cls = section_class(step)
    names = _fields(cls)
    full = complete(step, cfg)
    return cls(**{k: v for k, v in full.items() if k in names})
