"""RIS training checkpoints: written atomically as plain data, read with ``torch.load(weights_only=True)``.

A checkpoint (``<out>/last.pt``) holds the model, optimizer, epoch, step, history, RNG states and the resolved
config + tokenizer, converted by :func:`plain` to data a safe load reads: a crafted file cannot run code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CheckpointLoadError", "atomic_save", "load_ris_checkpoint", "load_model_state", "plain",
           "pickle_errors", "rng_state", "set_rng_state", "unwrap_state_dict"]


def unwrap_state_dict(model: nn.Module) -> dict:
    """State dict without DDP's ``module.`` and DistBatchNorm's ``.bn`` name parts (loadable by a plain model)."""
    sd = (model.module if hasattr(model, "module") else model).state_dict()
    return {k.replace(".bn.", ".") if _is_wrapped(k) else k: v for k, v in sd.items()}


def _is_wrapped(key: str) -> bool:
    return ".bn." in key and key.rsplit(".bn.", 1)[1] in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},  # plain data, no ndarray
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    st = s["numpy"]
    if isinstance(st, dict):
        st = (st["kind"], st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"], st["cached_gaussian"])
    np.random.set_state(st)
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def plain(obj):
    """``obj`` as data a ``torch.load(weights_only=True)`` reads: dicts, lists, tuples, str, numbers, None,
    tensors (numpy scalars -> Python numbers, arrays -> tensors, paths and other objects -> str)."""
    if isinstance(obj, torch.Tensor | str | bool | int | float | type(None)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v) for v in obj)
    return str(obj)


def atomic_save(obj, path: Path) -> None:
    """``torch.save(plain(obj))`` through a temp file (``.<name>.tmp<PID>``, removed by the next run if this one
    is killed) and ``os.replace``: a reader sees the old checkpoint or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(plain(obj), tmp)
    os.replace(tmp, path)


class CheckpointLoadError(ValueError):
    """A RIS checkpoint that cannot be used; the message names the file and what to do."""


def _legacy_numpy_globals() -> list:
    """numpy's array / scalar reconstructors: checkpoints written before RNG states were stored as plain data
    hold the numpy RNG state as an ndarray (reconstructing arrays runs no code; torch documents this list)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return [_reconstruct, scalar, np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType,
            np.dtypes.Int64DType]


def load_ris_checkpoint(path, what: str = "RIS checkpoint") -> dict:
    """A training checkpoint (``<out>/last.pt``) read with ``torch.load(weights_only=True)``: a crafted file
    cannot run code. Raises :class:`CheckpointLoadError` (one line naming the file and what to do) for a
    missing, truncated or damaged file, a file holding Python objects, or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"{what} {path} does not exist (train writes <out>/last.pt); check the path")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle_errors() as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            unsafe = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln][:1]
            raise CheckpointLoadError(
                f"{what} {path} holds Python objects that a safe load refuses ({'; '.join(unsafe) or first}): it was "
                f"not written by `python -m ris_utils train` and loading it could run code; not loaded") from None
        raise CheckpointLoadError(f"{what} {path} is not a readable torch checkpoint ({type(e).__name__}: "
                                  f"{first[:200]}); it is truncated or damaged: copy it again or retrain") from None
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{what} {path} holds a {type(ckpt).__name__}, not a training checkpoint of "
                                  f"`python -m ris_utils train`")
    missing = [k for k in ("model", "config", "tokenizer") if k not in ckpt]
    if missing:
        bare = ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        raise CheckpointLoadError(
            f"{what} {path} " + ("is a bare state dict (weights only, no config / tokenizer)" if bare else
                                 f"lacks {missing}") +
            ": evaluate / resume need the <out>/last.pt that `python -m ris_utils train` writes")
    return ckpt


def pickle_errors() -> tuple:
    import pickle
    import zipfile

    return (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, KeyError)


def load_model_state(model: nn.Module, ckpt: dict, path, what: str = "RIS checkpoint") -> None:
    """``model.load_state_dict(ckpt["model"])``, failing with one line naming the file when the weights belong
    to another architecture / version (missing or unexpected keys, shape mismatches)."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        msg = " ".join(str(e).split())
        raise CheckpointLoadError(
            f"{what} {path} does not fit model {ckpt.get('config', {}).get('model')!r} built from its own config "
            f"({msg[:300]}...): it was written for another architecture or by another version; retrain it") from None

