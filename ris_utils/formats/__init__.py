"""Output formats of the pseudo-supervision besides the REFER export (``--format refer,cris,hf``).

* ``refer`` -- the REFER export itself (:mod:`ris_utils.export`): ``<dataset>/refs(<split_by>).p`` +
  ``instances.json`` + ``images/train2014/``.
* ``cris`` -- :func:`ris_utils.formats.cris.write_cris`: ``anns/<dataset>/<split>.json`` +
  ``masks/<dataset>/<segment_id>.png``, what CRIS / ETRIS's ``tools/data_process.py`` writes from REFER data
  (their ``folder2lmdb.py`` step reads it unchanged).
* ``hf`` -- :func:`ris_utils.formats.hf.write_hf`: a Hugging Face ``datasets`` dataset (parquet + README card)
  that ``datasets.load_dataset(<dir>)`` reads back.

Both are derived from a finished REFER export folder (they never re-run a step).
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("refer", "cris", "hf")


def parse_formats(text) -> list[str]:
    """``"refer,cris"`` / ``["refer", "hf"]`` -> the formats in :data:`FORMATS` order; refuses unknown names."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    names = {s.strip().lower() for s in items if s and s.strip()}
    unknown = sorted(names - set(FORMATS))
    if unknown:
        raise ValueError(f"--format: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in names] or ["refer"]


def write_formats(export_dir, formats, out_root=None, progress: bool = False) -> dict:
    """Write the ``cris`` / ``hf`` formats of the REFER export ``export_dir`` into ``<out_root>/cris`` and
    ``<out_root>/hf`` (``out_root`` default: ``export_dir``). ``refer`` needs nothing (it is the export).
    Returns ``{format: summary dict}``."""
    export_dir = Path(export_dir)
    out_root = Path(out_root) if out_root is not None else export_dir
    done: dict = {}
    for fmt in parse_formats(formats):
        if fmt == "cris":
            from .cris import write_cris

            done["cris"] = write_cris(export_dir, out_root / "cris", progress=progress)
        elif fmt == "hf":
            from .hf import write_hf

            done["hf"] = write_hf(export_dir, out_root / "hf")
        else:
            done["refer"] = {"dir": str(export_dir)}
    return done


__all__ = ["FORMATS", "parse_formats", "write_formats"]
