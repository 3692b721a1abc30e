"""The engine's run: one record per image into a locked, resumable folder; merging the ranks' logs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ris_utils.fileio import atomic_write, folder_lock, fsync_dir, remove_stale_temps

from .records import (
    MANIFEST,
    PARTS,
    RECORDS,
    SUMMARY,
    committed_index,
    log_line,
    read_entry,
    read_summary,
    record_key,
    scan_log,
)

logger = logging.getLogger(__name__)


class FatalError(RuntimeError):
    """Raised by a step function to stop the whole run (not just one image): e.g. the model broke."""


class ResumeMismatchError(RuntimeError):
    """``out_dir`` holds a run of a different step, item list or configuration."""


# ----------------------------------------------------------------------------------------------------------
# small helpers


def item_seed(seed: int, image_id) -> int:
    """Per-image seed derived from ``(seed, image_id)``: stable across runs, ranks and item order."""
    h = hashlib.sha256(f"{int(seed)}:{image_id!r}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def fingerprint(obj) -> str:
    """A short hash of a JSON-able object (used to refuse resuming a run made with other settings)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, else an initialised process group, else ``RANK``/``WORLD_SIZE``."""
    if rank is None or world_size is None:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if "torch" in sys.modules:  # a process group can only exist when torch is loaded (saves its import)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                r, w = dist.get_rank(), dist.get_world_size()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"engine: invalid rank={rank} / world_size={world_size}")
    return int(rank), int(world_size)


def shard(items: list, rank: int, world_size: int) -> list:
    """The items of one rank: every ``world_size``-th item starting at ``rank``."""
    return items[rank::world_size]


def _check_items(items: list[dict]) -> list:
    ids, seen = [], set()
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "image_id" not in it:
            raise ValueError(f"engine: item {i} must be a dict with 'image_id' and 'path', got {it!r:.200}")
        k = record_key(it["image_id"])
        if k in seen:
            raise ValueError(f"engine: duplicate image_id {it['image_id']!r} (item {i}); ids must be unique")
        seen.add(k)
        ids.append(it["image_id"])
    return ids


def _file_name(item: dict) -> str:
    if item.get("file_name"):
        return str(item["file_name"])
    return Path(str(item["path"])).name if item.get("path") else str(item["image_id"])


def _maybe_init_process_group(world_size: int) -> bool:
    """Initialise a gloo group from the launcher's env (torchrun sets MASTER_ADDR/PORT). True when we did."""
    if world_size <= 1:
        return False
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    if not dist.is_available() or dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return False
    dist.init_process_group(backend="gloo", timeout=timedelta(hours=48))
    return True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dist_ready() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------------------------
# the engine


def run(
    step: str,
    items: list[dict],
    fn: Callable[[dict], dict],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    desc: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    config: dict | None = None,
    merge_output: bool = True,
    fatal: tuple[type[BaseException], ...] = (FatalError,),
    progress: bool = True,
    fsync: bool = True,
    lock_wait: float | None = 0.0,
) -> dict:
    """Run ``fn`` over this rank's shard of ``items`` and write one record per image into ``out_dir``.

    Arguments:
      step (str): the step's name (``masks``, ``captions``, ``filter``); names the log files.
      items (list[dict]): at least ``image_id`` (unique, JSON-able) and ``path``; optional ``file_name``
        and any fields ``fn`` needs. Their order is the order of the merged ``records.jsonl``.
      fn (callable): ``fn(item) -> dict`` (the record body, JSON-able). ``item`` is a copy with
        ``item["seed"]`` set to :func:`item_seed` ``(seed, image_id)``. Raise to mark the image failed.
      out_dir (path): where the logs, ``records.jsonl`` and ``summary.json`` go. A rerun resumes.
      seed (int): base seed.
      desc (str): progress-bar label (default: the step).
      rank, world_size (int): default: the process group, else ``RANK`` / ``WORLD_SIZE``, else 0 / 1.
      config (dict): the step's settings; its fingerprint is stored and a rerun with different settings
        (or a different item list) raises :class:`ResumeMismatchError` instead of mixing outputs.
      merge_output (bool): merge when this rank can (1 process, or rank 0 after a barrier).
      fatal (tuple): exception types that stop the run instead of becoming an error record (default:
        :class:`FatalError` only; a ``MemoryError`` on one image becomes that image's error record).
      progress (bool): show a tqdm bar (images/s, ETA).
      fsync (bool): fsync the log after every record (crash safety; disable only for throwaway runs).
      lock_wait (float | None): seconds to wait when another run holds ``out_dir`` (0: refuse at once with
        :class:`~ris_utils.fileio.FolderBusyError`; None: wait until it is free).

    Returns:
      dict: the summary (``n_items``, ``ok``, ``failed``, ``failed_reasons``, ``errors``, ...). Before the
      merge (a rank > 0 without a process group, or ``merge_output=False``) the summary of this rank's
      shard only, with ``"merged": False``.
    """
    if not isinstance(step, str) or not step or "/" in step or " " in step:
        raise ValueError(f"engine: step must be a short name without '/' or spaces, got {step!r}")
    out_dir = Path(out_dir)
    ids = _check_items(items)
    rank, world_size = dist_info(rank, world_size)
    if world_size > 1:
        _maybe_init_process_group(world_size)
    what = f"engine step {step!r}" + (f" rank {rank}/{world_size}" if world_size > 1 else "")
    # One run per output folder: a 1-process run holds <out_dir>/.lock exclusively; the ranks of a sharded run
    # hold it shared, plus an exclusive lock on their own log. A second run waits ``lock_wait`` s, then is refused.
    with contextlib.ExitStack() as stack:
        stack.enter_context(folder_lock(out_dir, shared=world_size > 1, wait=lock_wait, what=what))
        if world_size > 1:
            stack.enter_context(folder_lock(out_dir, wait=lock_wait, what=what,
                                            name=f".lock.{step}.rank{rank}of{world_size}"))
        # leftovers of a killed run (temp files named with a dead PID; mkstemp names only when we hold it alone)
        for folder in (out_dir, out_dir / PARTS):
            for p in remove_stale_temps(folder, legacy=world_size == 1):
                logger.info("engine: removed %s (left by a killed run)", p)
        with folder_lock(out_dir, wait=None, what=what, name=".manifest.lock"):  # check-then-write, one at a time
            _write_manifest(out_dir, step, ids, config, seed, rank)
        return _run_locked(step, items, fn, out_dir, seed, desc, rank, world_size, merge_output, fatal,
                           progress, fsync)


def _run_locked(step, items, fn, out_dir: Path, seed, desc, rank, world_size, merge_output, fatal, progress,
                fsync) -> dict:
    from tqdm import tqdm

    log_path = out_dir / PARTS / f"{step}.rank{rank}of{world_size}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Cut a torn tail off our own log so that appends start on a fresh line.
    if log_path.exists():
        _, good_end = scan_log(log_path)
        if good_end != log_path.stat().st_size:
            logger.warning("engine: %s: dropping a torn/corrupt tail after byte %d", log_path, good_end)
            with open(log_path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
    done = committed_index(out_dir, step)

    mine = shard(items, rank, world_size)
    todo = [it for it in mine if record_key(it["image_id"]) not in done]
    counts: Counter = Counter()
    for it in mine:
        entry = done.get(record_key(it["image_id"]))
        if entry is not None:
            counts[entry[3]] += 1
    if len(mine) - len(todo):
        logger.info("engine: %s rank %d: resuming, %d/%d images already done", step, rank, len(mine) - len(todo), len(mine))

    label = desc or step
    if world_size > 1:
        label = f"{label} [rank {rank}/{world_size}]"
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), desc=label, unit="img", disable=not progress,
        position=rank if world_size > 1 else None, dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,  # logs / notebooks: a line every 15 s at most
    )
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        for item in todo:
            rec, line = _process(item, fn, seed, fatal)
            log.write(line)
            log.flush()
            if fsync:
                os.fsync(log.fileno())
            counts[rec["status"]] += 1
            bar.update(1)
            bar.set_postfix(ok=counts["ok"], failed=counts["error"], refresh=False)
    bar.close()
    elapsed = time.perf_counter() - t0
    if fsync:
        fsync_dir(log_path.parent)

    local = {"step": step, "rank": rank, "world_size": world_size, "n_items": len(mine),
             "ok": counts["ok"], "failed": counts["error"], "processed_now": len(todo),
             "seconds_now": round(elapsed, 3), "merged": False}
    if not merge_output:
        return local
    if world_size == 1:
        return merge(out_dir, step=step)
    if _dist_ready():
        _barrier()
        summary = merge(out_dir, step=step) if rank == 0 else None
        _barrier()
        return summary if summary is not None else read_summary(out_dir)
    logger.info("engine: rank %d done; no process group, call engine.merge(%s) once all ranks are done",
                rank, out_dir)
    return local


def strict_exit(strict: bool, summaries) -> int:
    """The exit code of a generation command: 1 with ``--strict`` when any summary counts an error record
    (their reasons printed on stderr), else 0."""
    failed = [e for s in summaries for e in (s.get("errors") or [])]
    n = sum(int(s.get("failed") or 0) for s in summaries)
    if not strict or not n:
        return 0
    print(f"--strict: {n} image(s) became error records:", file=sys.stderr)
    for e in failed[:20]:
        print(f"  {e.get('file_name') or e.get('image_id')}: {e.get('error')}", file=sys.stderr)
    return 1


def _process(item: dict, fn: Callable[[dict], dict], seed: int, fatal) -> tuple[dict, str]:
    """One record for one item and its log line; exceptions of ``fn`` (except ``fatal`` ones) become error
    records."""
    work = dict(item)
    work["seed"] = item_seed(seed, item["image_id"])
    head = {"image_id": item["image_id"], "file_name": _file_name(item)}
    try:
        if not item.get("path"):
            raise ValueError(f"{head['file_name']}: item {item['image_id']!r} has no 'path' (every item needs "
                             f"'image_id' and 'path'); add it to the item list")
        body = fn(work)
        if not isinstance(body, dict):
            raise TypeError(f"step function returned {type(body).__name__}, expected a dict")
        bad = {"image_id", "file_name", "status", "error"} & set(body)
        if bad:
            raise ValueError(f"step function returned reserved keys {sorted(bad)}")
        rec = {**head, "status": "ok", "error": None, **body}
        return rec, log_line(rec)  # encoded once, here: not JSON-able -> error record, not a crash at write time
    except fatal:
        raise
    except MemoryError as e:  # one huge image: its error record, not the end of the run
        reason = (f"MemoryError: out of memory while processing {head['file_name']} ({str(e) or 'no detail'}): the "
                  f"image may be too large (masks.max_pixels limits its pixels); shrink it or free memory")
        logger.warning("engine: %s failed: %s", item["image_id"], reason)
        rec = {**head, "status": "error", "error": reason[:1000]}
    except Exception as e:  # noqa: BLE001 - bad input must never stop the run
        reason = f"{type(e).__name__}: {e}".strip()
        logger.warning("engine: %s failed: %s", item["image_id"], reason)
        rec = {**head, "status": "error", "error": reason[:1000]}
    return rec, log_line(rec)


def _write_manifest(out_dir: Path, step: str, ids: list, config, seed: int, rank: int) -> None:
    manifest = {"step": step, "seed": int(seed), "n_items": len(ids), "image_ids": ids,
                "items_fingerprint": fingerprint(ids), "config_fingerprint": fingerprint(config or {}),
                "config": config or {}}
    path = out_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("step", "seed", "items_fingerprint", "config_fingerprint"):
            if old.get(key) != manifest[key]:
                raise ResumeMismatchError(
                    f"engine: {out_dir} holds a run with a different {key.replace('_', ' ')} "
                    f"({old.get(key)!r} != {manifest[key]!r}); use another output folder or delete this one"
                )
        return
    atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True, default=str), fsync=True)


def merge(out_dir: str | os.PathLike, *, step: str | None = None, allow_partial: bool = False) -> dict:
    """Merge the per-rank logs into ``out_dir/records.jsonl`` (item order) and write ``summary.json``.

    Idempotent; gives the same file whatever the number of ranks or interruptions. Raises
    ``RuntimeError`` when images are still missing, unless ``allow_partial`` (then they are listed in the
    summary under ``missing``).
    """
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"engine.merge: {mpath} does not exist; is {out_dir} an engine output folder?")
    manifest = json.loads(mpath.read_text())
    step = step or manifest["step"]
    done = committed_index(out_dir, step)
    missing = [i for i in manifest["image_ids"] if record_key(i) not in done]
    if missing and not allow_partial:
        raise RuntimeError(
            f"engine.merge: {len(missing)} of {len(manifest['image_ids'])} images of step {step!r} are not "
            f"finished in {out_dir} (first: {missing[:3]}); rerun the step (it resumes) before merging"
        )
    reasons, errors, n_ok = Counter(), [], 0
    path = out_dir / RECORDS
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    handles: dict = {}
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for image_id in manifest["image_ids"]:
                entry = done.get(record_key(image_id))
                if entry is None:
                    continue
                log, offset, length, status = entry
                body = read_entry(handles, log, offset, length)
                out.write(body + "\n")
                if status == "ok":
                    n_ok += 1
                else:
                    rec = json.loads(body)
                    reasons[_reason_kind(rec.get("error"))] += 1
                    errors.append({"image_id": rec["image_id"], "file_name": rec.get("file_name"),
                                   "error": rec.get("error")})
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in handles.values():
            f.close()
    os.replace(tmp, path)
    fsync_dir(out_dir)
    summary = {"step": step, "n_items": len(manifest["image_ids"]), "ok": n_ok, "failed": len(errors),
               "failed_reasons": dict(sorted(reasons.items())), "errors": errors, "missing": missing,
               "merged": True, "records": str(out_dir / RECORDS)}
    atomic_write(out_dir / SUMMARY, json.dumps(summary, indent=1, default=str), fsync=True)
    return summary


def _reason_kind(error: str | None) -> str:
    """The exception type of an error reason (``"BadImageError: ..."`` -> ``BadImageError``) for counting."""
    if not error:
        return "unknown"
    head = error.split(":", 1)[0].strip()
    return head if head and " " not in head else "other"


def main(argv: list[str] | None = None) -> int:
    """``python -m ris_utils.engine merge OUT_DIR [--allow-partial]``: merge the per-rank logs of a run whose
    ranks were started without a torch.distributed process group (e.g. array jobs setting RANK/WORLD_SIZE)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ris_utils.engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge out_dir/parts/*.log into out_dir/records.jsonl + summary.json")
    m.add_argument("out_dir")
    m.add_argument("--allow-partial", action="store_true", help="merge even when images are missing")
    args = ap.parse_args(argv)
    try:
        summary = merge(args.out_dir, allow_partial=args.allow_partial)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("step", "n_items", "ok", "failed", "failed_reasons")}))
    return 0
