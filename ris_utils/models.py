"""Model plumbing shared by the steps: our open_clip configs, device choice, seeding.

Our tiny architectures are open_clip JSON configs in ``ris_utils/model_configs/`` (same format as
open_clip's own ``model_configs``), registered with ``open_clip.add_model_config`` so that
``open_clip.create_model_and_transforms("coca_tiny", pretrained=None)`` builds them exactly like the
paper's ``coca_ViT-L-14``. Builders of each step's models live in that step's module.
"""

from __future__ import annotations

import logging
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


def warmup_cosine(opt, steps: int, warmup: int):
    """``LambdaLR``: linear warmup over ``warmup`` steps times a cosine from 1 to 0 over ``steps`` (the schedule
    of the shapes CLIPs: :mod:`ris_utils.train_clip`, :mod:`ris_utils.ris.pretrain`)."""
    import math

    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
