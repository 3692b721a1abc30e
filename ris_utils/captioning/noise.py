"""Keyed sampling noise: one uniform number per (seed, image, mask, view, setting, step).

A caption's randomness depends only on its own key, never on which other captions share its batch, on
resume or on sharding: the key of a row is hashed once (:func:`row_key`, BLAKE2b of the key tuple), the
uniform of step t is a counter-based hash of (row key, t) (:func:`keyed_uniform`, SplitMix64), and a
token is drawn by inverse-CDF from the row's probabilities (:func:`sample_inverse_cdf`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def row_key(seed: int, image_key, mask: int, view: int, setting: str) -> int:
    """64-bit key of one caption's noise stream (``image_key``: the image id or file name)."""
    text = repr((int(seed), str(image_key), int(mask), int(view), str(setting))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def keyed_uniform(keys, step: int) -> torch.Tensor:
    """(B,) float64 uniforms in [0, 1) for rows with 64-bit ``keys`` (B,) at decoding ``step``."""
    k = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = _splitmix64(k ^ _splitmix64(np.full_like(k, np.uint64(step) + np.uint64(1))))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) drawn from ``probs`` (B, V) (non-negative, need not sum to 1) with uniforms ``u`` (B,).

    Returns the first index whose cumulative probability exceeds ``u * total``; a zero-probability token
    is never returned.
    """
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_max(probs.shape[-1] - 1)


__all__ = ["row_key", "keyed_uniform", "sample_inverse_cdf"]
