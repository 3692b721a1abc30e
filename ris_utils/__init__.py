"""pseudo-ris: a notebook-first reproduction of Pseudo-RIS (Yu, Seo, Son, ECCV 2024).

Steps (one module per notebook): ``masks`` (01), ``captioning`` (02), ``filtering`` (03),
``ris`` (04, 05). ``record`` is how a notebook hands a number to the papermill runner.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

#: Environment variable set by :mod:`ris_utils.runs` to the JSON file a notebook's numbers go to.
METRICS_ENV = "PSEUDO_RIS_METRICS"

_local_metrics: dict[str, float | int | str] = {}


def _check_value(name: str, value):
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"record(): metric name must be a non-empty string without spaces, got {name!r}")
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"record({name!r}): value must be finite, got {value!r}")
        return value
    if isinstance(value, str):
        if len(value) > 200:
            raise ValueError(f"record({name!r}): strings are limited to 200 characters (got {len(value)})")
        return value
    raise TypeError(f"record({name!r}): value must be a number or a short string, got {type(value).__name__}")


def record(name: str, value) -> float | int | str:
    """Record one number (or short string) under a dotted ``name`` such as ``masks.recall_at_0.5``.

    Under the papermill runner (``python -m ris_utils.runs``) the value is written to the file named by
    ``$PSEUDO_RIS_METRICS`` (atomically: temp file + rename) and merged into
    ``papermill_runs/output/<profile>/metrics.json``. In a notebook opened by hand the value is kept in
    memory (see :func:`recorded`) and printed, so the notebook runs unchanged.

    Returns the stored value.
    """
    value = _check_value(name, value)
    path = os.environ.get(METRICS_ENV)
    if not path:
        _local_metrics[name] = value
        print(f"[record] {name} = {value}")
        return value
    path = Path(path)
    data = {}
    if path.exists():
        data = json.loads(path.read_text() or "{}")
    data[name] = value
    from .fileio import atomic_write

    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))
    return value


def recorded() -> dict:
    """Values recorded in this process while no runner was present."""
    return dict(_local_metrics)


__all__ = ["record", "recorded", "__version__", "METRICS_ENV"]
