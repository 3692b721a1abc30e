"""Shards in processes on one machine: ``<step>.workers`` processes, each running :func:`~ris_utils.engine.run` on
every ``workers``-th item (the caller merges), none outliving its parent."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def check_workers(workers, setting: str) -> int:
    """A ``<step>.workers`` setting as a process count: None / 0 -> 1; refuses bools, non-ints, negatives."""
    if isinstance(workers, bool) or not isinstance(workers, int | None) or (workers or 0) < 0:
        raise ValueError(f"{setting} must be a positive int, got {workers!r}")
    return int(workers or 1)


def watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """In a worker process: a daemon thread that ends the process (exit code 70) as soon as its parent
    ``parent_pid`` is gone (``kill -9`` of the parent re-parents the worker), so no worker outlives its run."""

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _shard_worker(fn: Callable, args: tuple, rank: int, world_size: int):
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # the shards are merged by the parent, not a process group
        os.environ.pop(key, None)
    return fn(*args, rank=rank, world_size=world_size)


def run_shard_workers(fn: Callable, args: tuple, workers: int, label: str) -> list:
    """Run ``fn(*args, rank=r, world_size=workers)`` in ``workers`` spawned processes, one per shard ``r``
    (``fn`` runs :func:`run` with ``merge_output=False``; the caller merges). Returns the results by rank.

    When a worker fails, the others are stopped (their finished images are committed, a rerun resumes) and
    the first failure is raised here with a note naming the worker (``label``, e.g. ``"captions"``).
    """
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=watch_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_shard_worker, fn, args, r, workers) for r in range(workers)]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [(r, f) for r, f in enumerate(futures) if f.done() and f.exception() is not None]
        if failed:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            r, f = failed[0]
            err = f.exception()
            err.add_note(f"(raised in {label} worker {r} of {workers}; a rerun resumes the finished images)")
            raise err
        return [f.result() for f in futures]
