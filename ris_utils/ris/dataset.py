"""REFER-format datasets for the RIS model: letterboxing, tokens, one sentence drawn per ref per epoch.

Input pipeline as CRIS's: the image is resized keeping its aspect ratio so its longer side fits the input
size S, centred on an SxS canvas filled with the CLIP mean colour (0 after normalisation), then normalised
with CLIP's mean/std; the mask goes through the same letterbox. At test time the prediction is warped back:
crop the padding, resize to the original HxW (:func:`unletterbox`).

Training samples are refs. A ref may carry several sentences (ground truth: several annotators; pseudo
supervision: the surviving captions of a mask); each epoch draws ONE of them per ref, uniformly, from a
generator seeded by ``(seed, epoch)`` -- the authors' "one surviving caption per sample" -- so every DDP
rank and a resumed run draw the same sentences. Evaluation samples are (ref, sentence) pairs: every
sentence of every ref.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ris_utils.crops import DEFAULT_MEAN, DEFAULT_STD
from ris_utils.data.refer import (
    ReferData,
    decode_segmentation,
    instances_path,
    load_refer,
    refs_path,
    select_split,
)
from ris_utils.images import load_image_rgb

logger = logging.getLogger(__name__)

__all__ = ["Letterbox", "letterbox_params", "letterbox_image", "letterbox_tensor", "letterbox_mask", "unletterbox",
           "image_key",
           "resolve_refer", "open_refer", "RisTrainSet", "RisEvalSet", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN, CLIP_STD = DEFAULT_MEAN, DEFAULT_STD  # OpenAI CLIP's normalisation (one place: ris_utils.crops)


@dataclass(frozen=True)
class Letterbox:
    """Geometry of a letterbox of an HxW image into SxS: content at rows top:top+new_h, cols left:left+new_w."""

    height: int
    width: int
    size: int
    new_h: int
    new_w: int
    top: int
    left: int


def letterbox_params(height: int, width: int, size: int) -> Letterbox:
    """scale = min(S/H, S/W); the resized content is centred (CRIS's ``getTransformMat``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(size / height, size / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return Letterbox(height, width, size, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)


def letterbox_image(img: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """HxWx3 uint8 -> (SxSx3 uint8 letterboxed on the CLIP mean colour, geometry)."""
    h, w = img.shape[:2]
    lb = letterbox_params(h, w, size)
    resized = np.asarray(Image.fromarray(img).resize((lb.new_w, lb.new_h), Image.BILINEAR))
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = np.round(np.array(CLIP_MEAN) * 255).astype(np.uint8)
    out[lb.top:lb.top + lb.new_h, lb.left:lb.left + lb.new_w] = resized
    return out, lb


def letterbox_mask(mask: np.ndarray, lb: Letterbox) -> np.ndarray:
    """HxW {0,1} mask -> SxS uint8 {0,1} through the same letterbox (bilinear, then > 0.5, as CRIS)."""
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.float32))
    m = np.asarray(m.resize((lb.new_w, lb.new_h), Image.BILINEAR)) > 0.5
    out = np.zeros((lb.size, lb.size), dtype=np.uint8)
    out[lb.top:lb.top + lb.new_h, lb.left:lb.left + lb.new_w] = m
    return out


def unletterbox(prob: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """Warp a prediction back to the original image: (h, w) map over the SxS input (any h = w, e.g. S/4)
    -> resized to SxS (bilinear), padding cropped, resized to the original HxW (bilinear). Returns (H, W)."""
    return unletterbox_batch(prob[None], lb)[0]


def unletterbox_batch(probs: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """:func:`unletterbox` of N maps of images with one geometry: (N, h, w) -> (N, H, W), each map the same
    numbers as alone (bilinear resizing treats every map on its own), in two resize calls instead of 2N."""
    p = probs.float()[:, None]
    if p.shape[-1] != lb.size or p.shape[-2] != lb.size:
        p = torch.nn.functional.interpolate(p, size=(lb.size, lb.size), mode="bilinear", align_corners=False)
    p = p[..., lb.top:lb.top + lb.new_h, lb.left:lb.left + lb.new_w]
    p = torch.nn.functional.interpolate(p, size=(lb.height, lb.width), mode="bilinear", align_corners=False)
    return p[:, 0]


def resolve_refer(path: str | os.PathLike, dataset: str | None = None, split_by: str | None = None
                  ) -> tuple[Path, str, str]:
    """Find ``(data_root, dataset, split_by)`` of a REFER dataset given as a folder.

    ``path`` may be the data root (holding ``<dataset>/refs(<split_by>).p``) or the dataset folder itself
    (holding ``refs(<split_by>).p``). ``dataset`` / ``split_by`` pick one when several exist.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"REFER dataset folder {path} does not exist")
    found = [(path.parent, path.name, p.name[5:-3]) for p in sorted(path.glob("refs(*).p"))]
    if not found:
        found = [(path, p.parent.name, p.name[5:-3]) for p in sorted(path.glob("*/refs(*).p"))]
    if dataset is not None:
        found = [f for f in found if f[1] == dataset]
    if split_by is not None:
        found = [f for f in found if f[2] == split_by]
    if len(found) != 1:
        what = ", ".join(f"{d}/refs({s}).p" for _, d, s in found) or "none"
        raise ValueError(f"{path}: expected exactly one REFER dataset <dataset>/refs(<split_by>).p matching "
                         f"dataset={dataset!r} split_by={split_by!r}; found {what}. Pass --dataset / --split-by.")
    return found[0]


def letterbox_tensor(img: np.ndarray, size: int) -> tuple[torch.Tensor, Letterbox]:
    """HxWx3 uint8 -> (letterboxed 3xSxS uint8 tensor, its :class:`Letterbox`)."""
    lbimg, lb = letterbox_image(img, size)
    return torch.from_numpy(lbimg).permute(2, 0, 1).contiguous(), lb


def image_key(path, size: int) -> str:
    """The key of an image's features (:class:`ris_utils.ris.features.ImageFeatureStore`): its resolved path
    and the letterbox size, so the same file seen through a linked export and through the human data root is
    one key."""
    return f"{os.path.realpath(path)}@{int(size)}"


def _image_path(refer: ReferData, image_id: int, fallback_roots=()) -> Path:
    try:
        return refer.image_path(image_id)
    except FileNotFoundError:
        name = refer.imgs[image_id]["file_name"]
        for root in fallback_roots:
            for d in ("images", "images/train2014", "images/mscoco/images/train2014", "."):
                p = Path(root) / d / name
                if p.exists():
                    return p
        raise


def _to_tensor_image(img: torch.Tensor) -> torch.Tensor:
    """3xSxS uint8 -> 3xSxS float, CLIP-normalised."""
    x = img.float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class _ReferBase(torch.utils.data.Dataset):
    """Shared loading: refs of one split, letterboxed images/masks (memoised when ``cache``), tokens."""

    def __init__(self, refer: ReferData, split: str, tokenizer, input_size: int, word_len: int,
                 cache: bool = True, image_fallback_roots=()):
        self._load = load_image_rgb
        self.refer = refer
        self.split = split
        self.refs = [r for r in select_split(refer.refs, split) if r["sentences"]]
        if not self.refs:
            raise ValueError(f"{refer.data_root}/{refer.dataset}: split {split!r} has no refs with sentences")
        self.input_size, self.word_len, self.cache = int(input_size), int(word_len), bool(cache)
        self.fallback = tuple(image_fallback_roots)
        self.tokens = _tokens(refer, split, self.refs, tokenizer, self.word_len)  # per ref (n_sent, L)
        # False: items leave out "img" -- a frozen image tower's cached features replace it, and a cache miss
        # asks :meth:`image_tensor` (normalising every image of every batch was ~15 % of a frozen-tower step)
        self.with_images = True
        self._img_cache: dict[int, tuple[torch.Tensor, Letterbox]] = {}
        self._mask_cache: dict[int, torch.Tensor] = {}
        self._lb_cache: dict[int, Letterbox] = {}
        self._keys: dict[int, str] = {}

    def image(self, image_id: int) -> tuple[torch.Tensor, Letterbox]:
        if image_id in self._img_cache:
            return self._img_cache[image_id]
        img = self._load(_image_path(self.refer, image_id, self.fallback))
        self._check_size(image_id, *img.shape[:2])
        out = letterbox_tensor(img, self.input_size)
        if self.cache:
            self._img_cache[image_id] = out
        return out

    def letterbox(self, image_id: int) -> Letterbox:
        """The letterbox of an image. Without ``with_images`` (a frozen tower's cached features replace the
        pixels) it comes from the file's header size, checked against instances.json as :meth:`image` checks
        it, without decoding the image (decoding only for the geometry was ~5 % of a cached-feature run)."""
        if self.with_images or image_id in self._img_cache:
            return self.image(image_id)[1]
        if image_id not in self._lb_cache:
            with Image.open(_image_path(self.refer, image_id, self.fallback)) as img:
                w, h = img.size
            self._check_size(image_id, h, w)
            self._lb_cache[image_id] = letterbox_params(h, w, self.input_size)
        return self._lb_cache[image_id]

    def _check_size(self, image_id: int, height: int, width: int) -> None:
        """The image file's size must be the one instances.json gives (masks are decoded at that size)."""
        info = self.refer.imgs[image_id]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(f"image {image_id}: file is {width}x{height} but instances.json says "
                             f"{info['width']}x{info['height']}")

    def image_tensor(self, i: int) -> torch.Tensor:
        """The letterboxed, CLIP-normalised 3xSxS image of ref ``i`` (an item's ``"img"``)."""
        return _to_tensor_image(self.image(self.refs[int(i)]["image_id"])[0])

    def image_keys(self, ref_indices) -> list[str]:
        """The resolved image file path of each ref (the key of :class:`ris_utils.ris.features.ImageFeatureStore`:
        the same image seen through a linked export and through the human data root is one key)."""
        out = []
        for i in (ref_indices.tolist() if torch.is_tensor(ref_indices) else ref_indices):
            image_id = self.refs[int(i)]["image_id"]
            if image_id not in self._keys:
                self._keys[image_id] = image_key(_image_path(self.refer, image_id, self.fallback), self.input_size)
            out.append(self._keys[image_id])
        return out

    def lb_mask(self, i: int, lb: Letterbox) -> torch.Tensor:
        if i in self._mask_cache:
            return self._mask_cache[i]
        m = torch.from_numpy(letterbox_mask(self.refer.get_mask(self.refs[i]), lb))
        if self.cache:
            self._mask_cache[i] = m
        return m


class RisTrainSet(_ReferBase):
    """Refs of a split; ``set_epoch(e)`` fixes which sentence each ref uses this epoch.

    Item: ``{"img": 3xSxS float (normalised), "tokens": (L,) long, "mask": SxS float {0,1}, "index": int}``
    (no ``"img"`` when ``with_images`` is False).
    """

    def __init__(self, *args, seed: int = 0, **kw):
        super().__init__(*args, **kw)
        self.seed = int(seed)
        self.n_sents = np.array([len(t) for t in self.tokens])
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, int(epoch)])
        self.choice = np.floor(rng.random(len(self.refs)) * self.n_sents).astype(int)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        lb = self.letterbox(self.refs[i]["image_id"])
        item = {"tokens": self.tokens[i][self.choice[i]], "mask": self.lb_mask(i, lb).float(), "index": i}
        return {"img": self.image_tensor(i), **item} if self.with_images else item


class RisEvalSet(_ReferBase):
    """Every sentence of every ref of a split. Item: ``{"img", "tokens", "ref_index", "sent_index"}`` (no
    ``"img"`` when ``with_images`` is False);
    :meth:`gt_mask` gives the original-size HxW mask, :meth:`geometry` the letterbox of the ref's image."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.pairs = [(i, j) for i, t in enumerate(self.tokens) for j in range(len(t))]
        self._anns_by_image: dict[int, list[dict]] | None = None  # built on the first image_objects call
        self._objects: dict[int, tuple[list, list]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        i, j = self.pairs[k]
        item = {"tokens": self.tokens[i][j], "ref_index": i, "sent_index": j}
        return {"img": self.image_tensor(i), **item} if self.with_images else item

    def geometry(self, i: int) -> Letterbox:
        return self.letterbox(self.refs[i]["image_id"])

    def gt_mask(self, i: int) -> np.ndarray:
        return self.refer.get_mask(self.refs[i])

    def object_pixels(self, i: int) -> list[tuple[int, np.ndarray]]:
        """``[(ann_id, flat pixel indices)]`` of :meth:`image_objects` (C order: ``m.ravel()[idx]`` holds the
        values of ``m[mask]`` in the same order), memoised with them."""
        return self._image_entry(i)[1]

    def image_objects(self, i: int) -> list[tuple[int, np.ndarray]]:
        """``[(ann_id, HxW bool mask)]`` of every annotated object in the image of ref ``i`` (the referred
        one included), at the original size; the last few images are memoised (refs come image by image)."""
        return self._image_entry(i)[0]

    def _image_entry(self, i: int) -> tuple[list, list]:
        """(:meth:`image_objects`, :meth:`object_pixels`) of the image of ref ``i``, for the last 8 images."""
        if self._anns_by_image is None:
            self._anns_by_image = {}
            for a in self.refer.anns.values():
                self._anns_by_image.setdefault(a["image_id"], []).append(a)
        image_id = self.refs[i]["image_id"]
        if image_id not in self._objects:
            info = self.refer.imgs[image_id]
            if len(self._objects) >= 8:
                self._objects.pop(next(iter(self._objects)))
            objects = [
                (a["id"], decode_segmentation(a["segmentation"], info["height"], info["width"]).astype(bool))
                for a in sorted(self._anns_by_image.get(image_id, []), key=lambda a: a["id"])]
            self._objects[image_id] = (objects, [(a, np.flatnonzero(m)) for a, m in objects])
        return self._objects[image_id]


#: the REFER sets this process opened, by their files' identity (most recently used last; see open_refer)
_OPENED: OrderedDict[tuple, ReferData] = OrderedDict()
_OPENED_MAX = 8


def open_refer(path, dataset=None, split_by=None) -> ReferData:
    """The REFER set of a folder (:func:`resolve_refer`), read once per process while its files are unchanged
    (path, inode, size, mtime of refs and instances): the runs of a grid that a worker trains one after the other
    share what they read (a pseudo export: ~1 s to read, ~1.5 s to tokenize), and a job's splits share their
    dataset. The result is shared: callers read it and never change it."""
    root, ds, sb = resolve_refer(path, dataset, split_by)
    files = (refs_path(root, ds, sb), instances_path(root, ds))
    try:
        key = (str(Path(root).resolve()), ds, sb,
               tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (f.stat() for f in files)))
    except OSError:  # load_refer names the missing file
        return load_refer(root, ds, sb)
    if key in _OPENED:
        _OPENED.move_to_end(key)
        return _OPENED[key]
    data = load_refer(root, ds, sb)
    _OPENED[key] = data
    while len(_OPENED) > _OPENED_MAX:
        _OPENED.popitem(last=False)
    return data


def _tokens(refer: ReferData, split: str, refs: list[dict], tokenizer, word_len: int) -> list[torch.Tensor]:
    """Per ref, its sentences' tokens (n_sent, L); kept on the (shared, see :func:`open_refer`) ReferData for a
    tokenizer that describes itself (``to_dict``), so the next dataset of that split does not tokenize again."""
    spec = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else None
    key = None if spec is None else (split, int(word_len), json.dumps(spec, sort_keys=True))
    memo = refer.__dict__.setdefault("_ris_tokens", {})
    if key is None or key not in memo:
        toks = [tokenizer([s["sent"] or s["raw"] for s in r["sentences"]], context_length=word_len) for r in refs]
        if key is None:
            return toks
        memo[key] = toks
    return memo[key]


def collate(batch: list[dict]) -> dict:
    """Stack a list of items (tensors stacked, numbers to a tensor)."""
    return {k: torch.stack([b[k] for b in batch]) if torch.is_tensor(batch[0][k]) else torch.tensor([b[k] for b in batch])
            for k in batch[0]}

