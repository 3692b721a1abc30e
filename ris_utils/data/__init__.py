"""Datasets: REFER-format I/O (:mod:`.refer`), the shapes world (:mod:`.shapes`), the paper-tiny
sample photos (:mod:`.samples`), and the paper's RefCOCO family (:mod:`.paper`, through :mod:`ris_utils.download`).

:func:`prepare` is what notebook 00 calls: it dispatches on the profile's ``data.world``.
"""

from __future__ import annotations

import importlib

#: data.world -> module providing ``prepare(cfg) -> dict`` (returns dataset statistics)
WORLDS = {
    "shapes": "ris_utils.data.shapes",
    "samples": "ris_utils.data.samples",
    "refer": "ris_utils.data.paper",
}


def prepare(cfg: dict) -> dict:
    """Make the profile's data available under ``cfg['data_root']``; return statistics to record."""
    world = cfg.get("world")
    if world not in WORLDS:
        raise ValueError(f"data.world must be one of {sorted(WORLDS)}, got {world!r} (profile {cfg.get('profile')})")
    return importlib.import_module(WORLDS[world]).prepare(cfg)
