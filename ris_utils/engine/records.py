"""The engine's files: per-rank logs of checksummed record lines, the index of committed records, and reading a
finished folder (``records.jsonl``, ``summary.json``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ris_utils.layout import RECORDS

SUMMARY = "summary.json"
MANIFEST = "manifest.json"
PARTS = "parts"


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps_record(record: dict) -> str:
    """One record as compact JSON text that is valid UTF-8: non-ASCII text as is, lone surrogates (the bytes of
    a non-UTF-8 file name under Python's ``surrogateescape``, e.g. byte 0xff -> ``\\udcff``) as JSON escapes,
    which ``json.loads`` turns back into the same string (so ``os.fsencode`` gives the original bytes)."""
    body = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", body)


def log_line(record: dict) -> str:
    body = dumps_record(record)
    return f"{hashlib.sha256(body.encode()).hexdigest()[:16]} {body}\n"


def parse_line(line: str) -> dict | None:
    """The record of one log line, or None when the line is torn / corrupt."""
    if not line.endswith("\n"):
        return None
    check, _, body = line[:-1].partition(" ")
    if len(check) != 16 or hashlib.sha256(body.encode()).hexdigest()[:16] != check:
        return None
    try:
        rec = json.loads(body)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and "image_id" in rec else None


def scan_log(path: Path) -> tuple[list[tuple[str, str, int, int]], int]:
    """Index of a log: ``[(key, status, offset, length)]`` of its valid lines (records are not kept in
    memory) and the byte offset just after the last valid line."""
    entries, good_end, pos = [], 0, 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = parse_line(raw.decode("utf-8"))
            except UnicodeDecodeError:
                rec = None
            if rec is None:
                break  # a torn or corrupt line: everything after it is not trusted
            entries.append((record_key(rec["image_id"]), rec.get("status", "error"), pos, len(raw)))
            pos += len(raw)
            good_end = pos
    return entries, good_end


def read_entry(handles: dict, path: Path, offset: int, length: int) -> str:
    """The JSON body of one indexed log line."""
    f = handles.get(path)
    if f is None:
        f = handles[path] = open(path, "rb")
    f.seek(offset)
    return f.read(length).decode("utf-8")[:-1].partition(" ")[2]


def record_key(image_id) -> str:
    return json.dumps(image_id)


def committed_index(out_dir: Path, step: str | None) -> dict[str, tuple[Path, int, int, str]]:
    """``{json(image_id): (log, offset, length, status)}``: the first committed record of every image."""
    index: dict[str, tuple[Path, int, int, str]] = {}
    parts = Path(out_dir) / PARTS
    if not parts.is_dir():
        return index
    pattern = f"{step}.rank*.log" if step else "*.rank*.log"
    for log in sorted(parts.glob(pattern)):
        for key, status, offset, length in scan_log(log)[0]:
            index.setdefault(key, (log, offset, length, status))
    return index


def finished_records(out_dir: str | os.PathLike, step: str | None = None) -> dict[str, dict]:
    """All committed records in ``out_dir/parts`` (first valid one per image id), keyed by ``json(image_id)``.
    Loads every record: for inspection and tests; the engine itself only keeps an index."""
    handles: dict = {}
    try:
        return {k: json.loads(read_entry(handles, log, off, n))
                for k, (log, off, n, _) in committed_index(Path(out_dir), step).items()}
    finally:
        for f in handles.values():
            f.close()




class RecordsError(ValueError):
    """A ``records.jsonl`` that cannot be read (damaged, truncated, not an engine output)."""


def read_records(out_dir: str | os.PathLike, *, only_ok: bool = False) -> Iterator[dict]:
    """Iterate the merged records of ``out_dir/records.jsonl`` (in item order).

    Raises :class:`RecordsError` (one line naming the file, the line and what to do) on a damaged line."""
    path = Path(out_dir) / RECORDS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the step (and merge) first")
    fix = (f"rerun the step that wrote it into {Path(out_dir)} (finished images are kept in parts/ and it "
           f"resumes), or `python -m ris_utils.engine merge {Path(out_dir)}`")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RecordsError(f"{path} line {n} is not a valid JSON record ({e}): the file is damaged; "
                                   f"{fix}") from None
            if not isinstance(rec, dict) or "image_id" not in rec:
                raise RecordsError(f"{path} line {n} is not an engine record (a JSON object with 'image_id'); {fix}")
            if not only_ok or rec.get("status") == "ok":
                yield rec


def read_summary(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the step (and merge) first")
    return json.loads(path.read_text())


