"""The resumable, sharded per-image generation engine used by steps 1-3 (masks, captions, filter).

``run(step, items, fn, out_dir)`` calls ``fn(item) -> dict`` once per image and writes exactly one JSON
record per image::

    {"image_id": ..., "file_name": ..., "status": "ok" | "error", "error": None | "reason", **fn(item)}

Guarantees:

* **Resumable, crash-safe.** Every finished record is appended to a per-rank log
  ``out_dir/parts/<step>.rank<R>of<W>.log``; each line is ``<sha256[:16]> <json>\\n`` and is flushed and
  fsync'ed before the next image starts. On a rerun the logs of all earlier runs (any world size) are
  read, lines whose checksum does not match (a torn last line after ``kill -9``) are ignored and cut off,
  and finished images are skipped. Output after ``kill -9`` + rerun is byte-identical to an uninterrupted
  run: nothing lost, nothing duplicated (a record is either fully committed or redone).
* **Bad input never stops the run.** An exception raised by ``fn`` (a ``MemoryError`` on one huge image
  included) becomes an error record ``{"status": "error", "error": "<ExceptionType>: <message>"}`` and the run
  goes on; an item without ``path`` too. Exceptions listed in ``fatal`` (default: :class:`FatalError`) and
  ``KeyboardInterrupt`` stop it. Model and checkpoint problems must be caught by the step *before* calling
  :func:`run` (build the model first).
* **One run per folder.** A run holds an ``flock`` on ``out_dir/.lock`` (the ranks of one sharded run share
  it); a second run into the same folder is refused with :class:`~ris_utils.fileio.FolderBusyError` (or waits
  ``lock_wait`` seconds), and the manifest is checked and written under a lock, so two runs with different
  settings never mix their records. Temp files left by a killed run are removed by the next one.
* **Sharded.** Under ``torchrun --nproc_per_node K`` (or any launcher that sets ``RANK``/``WORLD_SIZE``)
  rank ``r`` takes items ``i`` with ``i % K == r``. When a ``torch.distributed`` process group is
  initialised (the engine initialises a gloo group itself when the launcher's rendezvous variables are
  set), rank 0 merges after a barrier; otherwise call :func:`merge` once all ranks are done.
* **Deterministic.** ``fn`` receives a copy of the item with ``item["seed"] = item_seed(seed, image_id)``.
  The merged ``records.jsonl`` lists records in the order of ``items``, whatever the world size.

Files in ``out_dir``: ``manifest.json`` (step, ordered image ids, config fingerprint), ``parts/*.log``,
``records.jsonl`` (merged, written atomically), ``summary.json`` (ok/failed counts and reasons).
"""


from ris_utils.fileio import FolderBusyError

from .records import (
    MANIFEST,
    PARTS,
    RECORDS,
    SUMMARY,
    RecordsError,
    dumps_record,
    finished_records,
    read_records,
    read_summary,
)
from .runner import (
    FatalError,
    ResumeMismatchError,
    dist_info,
    fingerprint,
    item_seed,
    main,
    merge,
    run,
    shard,
    strict_exit,
)
from .workers import check_workers, run_shard_workers, watch_parent

__all__ = [
    "MANIFEST", "PARTS", "RECORDS", "SUMMARY", "FatalError", "FolderBusyError", "RecordsError", "ResumeMismatchError",
    "check_workers", "dist_info", "dumps_record", "fingerprint", "finished_records", "item_seed", "main", "merge",
    "read_records", "read_summary", "run", "run_shard_workers", "shard", "strict_exit", "watch_parent",
]
