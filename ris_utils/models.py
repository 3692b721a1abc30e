"""Model plumbing shared by the steps: our open_clip configs, device choice, seeding.

Our tiny architectures are open_clip JSON configs in ``ris_utils/model_configs/`` (same format as
open_clip's own ``model_configs``), registered with ``open_clip.add_model_config`` so that
``open_clip.create_model_and_transforms("coca_tiny", pretrained=None)`` builds them exactly like the
paper's ``coca_ViT-L-14``. Builders of each step's models live in that step's module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
ASSETS_DIR = Path(__file__).parent / "assets"
_registered = False


def register_open_clip_configs() -> list[str]:
    """Register every JSON in ``model_configs/`` with open_clip (idempotent); return the names."""
    global _registered
    import open_clip

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if not _registered and names:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return names


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> ``cuda:$LOCAL_RANK`` (torchrun) or ``cuda:0`` if CUDA is available, else cpu; anything
    else is passed to ``torch.device``."""
    import torch

    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under torchrun each rank takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asked for, but CUDA is not available here; use device: cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


class quiet_random_init:
    """Context manager: hide open_clip's root-logger warning "No pretrained weights loaded for model ...
    Model initialized randomly." while building a model whose weights are loaded right after (a committed
    checkpoint). Every other log record passes."""

    def __enter__(self):
        self._filter = _RandomInitFilter()
        logging.getLogger().addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)
        return False


def warmup_cosine_lr(step: int, steps: int, warmup: int, lr: float = 1.0, after_warmup: bool = False) -> float:
    """The learning rate at ``step`` of the shapes models' one schedule: linear warmup, then cosine decay to 0.

    ``after_warmup=False`` (the shapes CLIPs, :mod:`ris_utils.train_clip`, :mod:`ris_utils.ris.pretrain`): the
    warmup factor ``min(1, (s + 1) / warmup)`` times a cosine over all ``steps``. ``after_warmup=True`` (the
    shapes captioner, :mod:`ris_utils.captioning.train`): ``lr (s + 1) / warmup`` during warmup, then the
    cosine over the remaining ``steps - warmup``. Both forms keep their checkpoints' training bit for bit."""
    if after_warmup:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    return lr * (min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def warmup_cosine(opt, steps: int, warmup: int):
    """``LambdaLR`` of :func:`warmup_cosine_lr` (factor of the optimizer's lr)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_lr(s, steps, warmup))


def init_uninitialised(model) -> None:
    """open_clip 3.3.0 leaves a CoCa's ``text_decoder.text_projection`` as ``torch.empty`` (its
    ``MultimodalTransformer.init_parameters`` is never called): give it the intended normal init
    (std = width ** -0.5) so a random-init CoCa has finite logits (and a seeded one is deterministic)."""
    import torch

    proj = model.text_decoder.text_projection
    with torch.no_grad():
        torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)


@contextlib.contextmanager
def torch_threads(n: int | None, setting: str = "threads"):
    """``torch.set_num_threads(n)`` inside the block (restored after); ``None`` / 0 leaves torch's default.

    The steps' models are tiny on the shapes profile: on a shared 2-core CPU one thread decodes ~4-6x and scores
    ~8x faster than two (measured: captions 0.22 vs 1.32 s/image naive; filter 0.08 vs 0.68 s per image). The
    thread count does not change the outputs (checked in tests/test_captioning_step.py). ``setting`` names the
    profile key in the error of a bad value."""
    import torch

    prev = torch.get_num_threads()
    if n:
        if int(n) < 1:
            raise ValueError(f"{setting} must be a positive int or null, got {n!r}")
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class TensorMemo:
    """Results kept by key up to ``max_mb`` of tensor bytes; when the next one would pass the bound, all are
    dropped first (the encoded crops of the captioner, the image features of the DoC scorer: an image's next
    mode / seed comes soon after its first, so keeping the latest is enough). Callers must not change a kept
    result: :meth:`get` hands back the same tensors."""

    def __init__(self, max_mb: float = 256):
        self.max_mb = max_mb
        self.items: dict = {}
        self.bytes = 0

    def get(self, key):
        return self.items.get(key)

    def put(self, key, tensors) -> None:
        """Keep ``tensors`` (a tuple / list / dict of tensors) under ``key``."""
        values = tensors.values() if isinstance(tensors, dict) else tensors
        size = sum(t.nelement() * t.element_size() for t in values)
        if self.bytes + size > self.max_mb * 2**20:
            self.clear()
        self.items[key] = tensors
        self.bytes += size

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0

