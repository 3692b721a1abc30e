"""Frozen CLIP towers' features computed once: per letterboxed image (image tower) and per sentence (text tower).

With ``ris.freeze: visual | both`` the image tower's output (:meth:`CRIS.encode_image`: C3, C4, layer4 and the
dense attention pool) depends on the image alone, so a training step needs only the neck, decoder and
projector (ETRIS-style parameter-efficient tuning). :class:`ImageFeatureStore` computes it once per image and
keeps it in memory up to ``max_mb`` (least recently used out), and, when given a folder, on disk as one file
per image named by the image tower's weights digest, the input size and the image path, so that every run of
a grid (and its evaluation) reuses what the first computed. :class:`TextFeatureStore` does the same for the
frozen text tower per token sequence (memory only; it is cheap).

Features are stored in float32: a cached forward gives the same logits as the uncached one (a test checks).
The in-memory copy of a disk-backed store belongs to the process, not to the store: the runs of a grid that one
worker process trains one after the other (and their evaluations) read each image's file once, not once per
run (~3 s of a 40-s shapes run). A store made for a channels-last model keeps its rows channels-last, so a
batch is assembled in the layout the model runs in (one copy, not two).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["ImageFeatureStore", "TextFeatureStore", "tower_digest"]


def tower_digest(module: torch.nn.Module) -> str:
    """sha256 (16 hex) over a module's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Memory:
    """Features by key, least recently used first, and their bytes (the in-memory copy of a store)."""

    def __init__(self):
        self.rows: OrderedDict[str, tuple] = OrderedDict()
        self.bytes = 0


#: the process's in-memory copies of disk-backed stores, by (folder, memory format): see the module docstring
_PROCESS_MEMORY: dict[tuple[str, str], _Memory] = {}


class ImageFeatureStore:
    """Image-tower features of letterboxed images, computed once.

    Arguments:
      model: a :class:`~ris_utils.ris.model.CRIS` whose image tower is frozen (its :meth:`encode_image` is used).
      input_size: the letterbox side (part of the disk key).
      folder: optional disk cache folder (files ``<digest>-<size>/<sha1(key)>.pt``), shared across runs.
      max_mb: memory bound of the in-memory copy (``None``: unbounded); with a folder, that copy is the
        process's (shared with the other stores of that folder, see the module docstring).
      channels_last: keep the rows of 4-d features channels-last (a model with ``channels_last``).
    """

    def __init__(self, model, input_size: int, folder=None, max_mb: float | None = None, device="cpu",
                 channels_last: bool = False):
        self.model, self.device = model, torch.device(device)
        self.max_bytes = None if max_mb is None else float(max_mb) * 2**20
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.hits = self.misses = 0
        self.folder = None
        memory = _Memory()
        if folder is not None:
            self.folder = Path(folder) / f"{tower_digest(model.backbone.visual)}-{int(input_size)}"
            self.folder.mkdir(parents=True, exist_ok=True)
            memory = _PROCESS_MEMORY.setdefault((str(self.folder.resolve()), str(self.format)), memory)
        self._memory = memory

    @property
    def mem(self) -> OrderedDict:
        """The in-memory rows by key (least recently used first)."""
        return self._memory.rows

    def _file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    def on_disk(self, key: str) -> bool:
        """Whether the disk cache holds ``key``'s features."""
        return self.folder is not None and self._file(key).is_file()

    def _remember(self, key: str, feats: tuple) -> None:
        """Keep one image's features as batch rows (1, ...): 4-d ones in the store's memory format."""
        memory = self._memory
        rows = tuple(f[None].clone(memory_format=self.format if f.dim() == 3 else torch.contiguous_format)
                     for f in feats)  # the format's own strides (a size-1 dim leaves .contiguous() ambiguous)
        if key in memory.rows:
            memory.bytes -= sum(f.numel() * f.element_size() for f in memory.rows.pop(key))
        memory.rows[key] = rows
        memory.bytes += sum(f.numel() * f.element_size() for f in rows)
        while self.max_bytes is not None and memory.bytes > self.max_bytes and len(memory.rows) > 1:
            _, old = memory.rows.popitem(last=False)
            memory.bytes -= sum(f.numel() * f.element_size() for f in old)

    def _read(self, key: str):
        try:
            feats = tuple(torch.load(self._file(key), map_location="cpu", weights_only=True))
        except Exception:  # a torn or foreign file: recompute it
            logger.warning("feature cache file %s unreadable; recomputing", self._file(key))
            return None
        self._remember(key, feats)
        return feats

    @torch.no_grad()
    def batch(self, keys: list[str], images: torch.Tensor | None = None, load=None) -> tuple:
        """Features of a batch: ``keys`` name the images (e.g. their file paths); missing ones are computed
        from ``images`` (B, 3, S, S) rows or ``load(i)`` (a normalised 3xSxS tensor for row i).
        Returns the model's feature tuple, batched (B, ...) on the store's device."""
        rows: list = [None] * len(keys)
        todo: dict[str, list[int]] = {}  # key -> rows (an image is encoded once per batch)
        for i, k in enumerate(keys):
            if k in todo:
                todo[k].append(i)
            elif k in self.mem:
                self.mem.move_to_end(k)
                rows[i] = self.mem[k]
                self.hits += 1
            elif self.folder is not None and self._file(k).is_file() and self._read(k) is not None:
                rows[i] = self.mem[k]
                self.hits += 1
            else:
                todo[k] = [i]
        if todo:
            self.misses += len(todo)
            was = self.model.training  # (switching modes walks every module: ~7 ms, as long as encoding an image)
            if was:
                self.model.eval()
            for k, ix in todo.items():
                # one image at a time: a feature must not depend on which images shared its batch (float
                # noise), nor on which run of a grid computed it first -- same seed, same bytes
                x = (images[ix[0]] if images is not None else load(ix[0]))[None].to(self.device)
                feats = tuple(f[0].detach().cpu().clone() for f in self.model.encode_image(x))
                self._remember(k, feats)
                for i in ix:
                    rows[i] = self.mem[k]
                if self.folder is not None:
                    path = self._file(k)
                    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                    torch.save(list(feats), tmp)
                    os.replace(tmp, path)
            if was:
                self.model.train()
        return tuple(torch.cat([r[j] for r in rows]).to(self.device) for j in range(len(rows[0])))


class TextFeatureStore:
    """Text-tower features (words (L, W), sentence (E)) per token sequence, computed once (memory only,
    at most ``max_items`` sequences kept, least recently used out)."""

    def __init__(self, model, max_items: int = 200_000, device="cpu"):
        self.model, self.device, self.max_items = model, torch.device(device), int(max_items)
        self.mem: OrderedDict[tuple, tuple] = OrderedDict()

    @torch.no_grad()
    def batch(self, tokens: torch.Tensor) -> tuple:
        keys = [tuple(t.tolist()) for t in tokens]
        first: dict = {}
        for i, k in enumerate(keys):
            if k not in self.mem and k not in first:
                first[k] = i
        todo = list(first.values())
        if todo:
            words, state = self.model.encode_text(tokens[todo].to(self.device))
            for n, i in enumerate(todo):
                self.mem[keys[i]] = (words[n].cpu(), state[n].cpu())
            while len(self.mem) > self.max_items:
                self.mem.popitem(last=False)
        rows = [self.mem[k] for k in keys]
        return (torch.stack([r[0] for r in rows]).to(self.device), torch.stack([r[1] for r in rows]).to(self.device))


def feature_stores(model, cfg: dict, device="cpu") -> tuple:
    """``(image store or None, text store or None)`` for a model whose towers :meth:`CRIS.freeze` froze;
    ``cfg``: ``input_size``, ``feature_cache`` (disk folder or None), ``feature_cache_mb`` (memory bound)."""
    raw = model.module if hasattr(model, "module") else model
    frozen = getattr(raw, "frozen", ())
    img = (ImageFeatureStore(raw, cfg["input_size"], folder=cfg.get("feature_cache"),
                             max_mb=cfg.get("feature_cache_mb"), device=device,
                             channels_last=bool(getattr(raw, "channels_last", False))) if "visual" in frozen else None)
    txt = TextFeatureStore(raw, device=device) if "text" in frozen else None
    return img, txt
