"""Safe file output: atomic writes, folder locks, whole-folder swaps and the removal of a killed run's leftovers.

* :func:`atomic_write`: a reader sees the old file or the new one, never a half-written one; the new file gets
  the mode an ordinary ``open(path, "w")`` would give (``0o666 & ~umask``), not ``mkstemp``'s 0600.
* :func:`folder_lock`: an ``flock`` on ``<folder>/.lock`` held while a run writes into the folder (a second
  run waits or is refused with :class:`FolderBusyError` naming the holder).
* :class:`StagedDir`: a folder written as a temp sibling and swapped in whole (``renameat2(RENAME_EXCHANGE)``
  where the kernel has it), so a reader or a killed writer sees the old folder or the new one, never a mix.
* :func:`remove_stale_temps`: temp files and staging folders carry their writer's PID in their name
  (``.<name>.tmp<PID>...``, ``.<name>.staging<PID>...``, ``.<name>.old<PID>...``); the next run removes those
  whose writer is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

try:  # POSIX; elsewhere the folder lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".lock"

#: ``.<name>.<kind><PID>`` optionally followed by ``.<anything>``: a temp written by process PID.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|staging|old)(?P<pid>\d+)(?:\..*)?$")
#: temp names of older versions without a PID (``mkstemp``'s ``.<name>.<8 random chars>.tmp``, ``.log.csv.tmp``)
LEGACY_TEMP_RE = re.compile(r"^\..+\.tmp$")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where possible (``/proc/self/status``, Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - other systems: set and restore (not thread-safe)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~current_umask()


def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """``<folder>/.<name>.<kind><PID>``: a temp sibling of ``path`` that :func:`remove_stale_temps` recognises."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a unique temp file in the same folder and ``os.replace``.

    ``fsync=True`` also flushes the file and its folder to disk (for records that must survive ``kill -9`` or
    a power cut). The temp file (``.<name>.tmp<PID>.<random>``) is removed if writing fails, and by the next
    run's :func:`remove_stale_temps` if the process is killed. The file gets mode ``0o666 & ~umask``.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp{os.getpid()}.", suffix="")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), default_file_mode())
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


# ----------------------------------------------------------------------------------------------------------
# leftovers of killed runs


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (a PID we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: staging folders of this process still being written (others of our PID are leftovers of a failed write)
_ACTIVE: set[str] = set()


def remove_stale_temps(folder: str | os.PathLike, *, legacy: bool = False, only_name: str | None = None) -> list[Path]:
    """Remove the temp files / staging folders in ``folder`` whose writing process is gone.

    A name matching :data:`TEMP_RE` is removed when its PID is not a running process (or is this process and
    the entry is a staging folder no longer written: not active, or superseded when ``only_name`` is given). ``legacy=True`` (only when the caller holds the folder's
    exclusive lock) also removes ``mkstemp`` names without a PID (:data:`LEGACY_TEMP_RE`). ``only_name``
    restricts the sweep to temps of that file / folder name. Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    me = os.getpid()
    for e in entries:
        m = TEMP_RE.match(e.name)
        if m:
            if only_name is not None and m["name"] != only_name:
                continue
            pid = int(m["pid"])
            if pid != me and pid_alive(pid):
                continue
            if pid == me and e.path in _ACTIVE and only_name is None:
                continue  # (a new StagedDir of the same folder in this process supersedes an unfinished one)
            if pid == me and m["kind"] == "tmp":
                continue  # a temp file of this process may be in the middle of an atomic write (other thread)
            if m["kind"] == "old":
                continue  # the previous version of a swapped folder: StagedDir recovers or removes it
        elif not (legacy and only_name is None and LEGACY_TEMP_RE.match(e.name)):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------------------------------------
# folder locks


class FolderBusyError(RuntimeError):
    """Another process holds the lock of an output folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, shared: bool = False, wait: float | None = 0.0, what: str = "a run",
                name: str = LOCK_NAME):
    """Hold an ``flock`` on ``<folder>/<name>`` (default ``.lock``) inside the block (the folder is created).

    Arguments:
      shared: a shared lock (the ranks of one sharded run hold it together); else exclusive.
      wait: seconds to wait for the lock (``0``: refuse at once, ``None``: wait as long as it takes).
      what: who holds it, written into the lock file and shown to a refused process.
    Raises :class:`FolderBusyError` naming the folder and the holder when the lock is not obtained in time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = None if wait is None else time.monotonic() + float(wait)
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise FolderBusyError(
                        f"{folder} is in use by another run ({_holder(path)}); wait for it to finish, or write "
                        f"to another output folder") from None
                time.sleep(0.1)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def hold_folder_lock(folder: str | os.PathLike, **kw):
    """:func:`folder_lock` taken now and held until the returned handle's ``release()`` (or until the handle is
    garbage-collected / the process ends): for functions that write a folder from start to end."""
    key = str(Path(folder).resolve() / kw.get("name", LOCK_NAME))
    old = _HELD.pop(key, None)
    if old is not None:  # left held by an earlier call of this process that died (e.g. a notebook cell's error)
        old.release()
    cm = folder_lock(folder, **kw)
    cm.__enter__()
    done = []

    def release():
        if not done:
            done.append(1)
            _HELD.pop(key, None)
            cm.__exit__(None, None, None)

    cm.release = release
    _HELD[key] = cm
    return cm


_HELD: dict = {}


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"{info.get('what', 'a run')}, pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"
    except (OSError, ValueError):
        return "holder unknown"


# ----------------------------------------------------------------------------------------------------------
# whole-folder replacement


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


class StagedDir:
    """Write a folder as a temp sibling, then swap it in whole: ``final`` holds the old content or the new,
    never a mix (also after ``kill -9`` at any moment).

    ::

        stage = StagedDir(out_dir, marker="dataset_card.json")
        ... write into stage.path ...
        stage.commit()          # or use it as a context manager (commit on success, discard on error)

    ``marker``: a file name or glob (or several) that marks ``final`` as a folder of this kind; an existing
    non-empty ``final`` without any is refused (``FileExistsError``) instead of being replaced. A leftover staging folder of a killed or
    failed writer is removed here, and a ``final`` left missing by a killed non-atomic swap is restored.
    """

    def __init__(self, final: str | os.PathLike, *, marker: str | tuple[str, ...] | None = None):
        self.final = Path(final)
        if self.final.is_symlink():  # a link to a folder elsewhere (e.g. a big disk): swap the target, keep the link
            self.final = self.final.resolve()
        parent = self.final.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        markers = (marker,) if isinstance(marker, str) else tuple(marker or ())
        if (markers and self.final.is_dir() and any(self.final.iterdir())
                and not any(next(self.final.glob(m), None) is not None for m in markers)):
            raise FileExistsError(f"{self.final} exists and is not a previous output of this kind (no "
                                  f"{' / '.join(markers)}); refusing to replace it: choose a new or empty folder")
        if self.final.exists() and not self.final.is_dir():
            raise NotADirectoryError(f"{self.final} exists and is not a folder")
        remove_stale_temps(parent, only_name=self.final.name)
        for k in range(1000):
            path = parent / f".{self.final.name}.staging{os.getpid()}.{k}"
            try:
                path.mkdir()  # mode 0o777 & ~umask
                break
            except FileExistsError:
                continue
        self.path = path
        _ACTIVE.add(str(path))
        self.done = False

    @property
    def previous(self) -> Path | None:
        """The folder being replaced (readable until :meth:`commit`), or None."""
        return self.final if self.final.is_dir() else None

    def _recover(self) -> None:
        if self.final.exists() or self.final.is_symlink():
            for p in self.final.parent.glob(f".{glob_escape(self.final.name)}.old*"):
                m = TEMP_RE.match(p.name)
                if m and m["name"] == self.final.name and not pid_alive(int(m["pid"])):
                    shutil.rmtree(p, ignore_errors=True)
            return
        for p in sorted(self.final.parent.glob(f".{glob_escape(self.final.name)}.old*")):
            m = TEMP_RE.match(p.name)
            if m and m["name"] == self.final.name and not pid_alive(int(m["pid"])):
                os.rename(p, self.final)  # a swap killed half-way: the old folder comes back
                return

    def commit(self) -> Path:
        """Swap the staged folder in (atomically where the kernel can); returns ``final``."""
        if self.done:
            return self.final
        fsync_dir(self.path)
        try:
            if self.final.is_dir() and not self.final.is_symlink():
                if exchange_paths(self.path, self.final):
                    shutil.rmtree(self.path, ignore_errors=True)  # now the old content
                else:
                    old = self.final.parent / f".{self.final.name}.old{os.getpid()}"
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(self.final, old)
                    os.rename(self.path, self.final)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.path, self.final)
            fsync_dir(self.final.parent)
        finally:
            _ACTIVE.discard(str(self.path))
        self.done = True
        return self.final

    def abort(self) -> None:
        """Discard the staged folder (``final`` is untouched)."""
        _ACTIVE.discard(str(self.path))
        shutil.rmtree(self.path, ignore_errors=True)
        self.done = True

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (``refs(x)`` is fine; ``[``, ``*``, ``?`` are not)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)
