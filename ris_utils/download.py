"""Downloads for the paper profile: the RefCOCO family, COCO train2014 and the SAM checkpoints.

``python -m ris_utils download --what refcoco,refcoco+,refcocog,coco-train2014,sam-vit-h --data-root DIR``

Everything a download needs is in :data:`SOURCES` (one table, never in notebook cells): the URLs (the
official one first, mirrors after), the expected size and checksum where one is known, and where the
file goes. The files land in the REFER toolkit's layout, which LAVT / CRIS / ReLA and
:mod:`ris_utils.data.refer` read unchanged::

    DIR/refcoco/refs(unc).p, refs(google).p, instances.json
    DIR/refcoco+/refs(unc).p, instances.json
    DIR/refcocog/refs(umd).p, refs(google).p, instances.json
    DIR/images/mscoco/images/train2014/COCO_train2014_*.jpg
    DIR/checkpoints/sam_vit_h_4b8939.pth (and the other checkpoints)
    DIR/downloads/*.zip             archives (kept unless --delete-archives)
    DIR/checksums.lock.json         sha256 + size of every file downloaded here

Behaviour:

- **Resume**: a download writes ``<file>.part`` and, after an interruption (a cut connection, Ctrl-C, a
  crash), asks the server for the rest with an HTTP ``Range`` request. A server that ignores ``Range``
  (answers 200) restarts the file from zero.
- **Verification**: every finished file is hashed (sha256, and md5 where that is what was published) and
  compared with the table BEFORE it gets its final name (``<file>.part`` until then), so a download killed at
  any moment is never taken for a good file; a file found in place without a record of its verification
  (placed by hand, or left by an older version) is verified once before it counts as present. Where no checksum is published, the first download records its sha256 and size
  in ``DIR/checksums.lock.json`` and says so; later downloads and ``--verify`` compare with that record. A
  file that does not match is renamed ``*.corrupt`` and the command stops with a message naming it.
- **Offline**: an unreachable host (connection refused, no DNS, timeout) ends with a message naming the
  URL, the file it was for and where to put a copy fetched elsewhere; files already in place are verified
  and used without any network access.

The paper's captioner, the authors' CoCa ViT-L/14 fine-tuned on CC3M (``coca-cc3m``, from the Hugging Face
repo ``SeonghoonYu/pseudo-ris``), is an open_clip *training* checkpoint: it is downloaded here to
``DIR/checkpoints/coca_laion_cc3m_epoch_1.pt`` (no checksum is published: the first download records its
sha256 and size in ``checksums.lock.json``) and loaded through open_clip's ``pretrained=<path>`` (the paper
profile's ``captions.pretrained``). Stock open_clip weights (CLIP ``RN50`` / ``openai``, the CoCa
alternative ``mscoco_finetuned_laion2B-s13B-b90k``) are NOT downloaded here: they load through open_clip's
own ``pretrained=`` mechanism (its pretrained table / Hugging Face hub cache), exactly as the authors load
them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import hashlib
import http.client
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ris_utils.fileio import atomic_write
from ris_utils.profiles import step_config
from ris_utils.sources import GROUPS, SOURCES, Source

logger = logging.getLogger(__name__)

USER_AGENT = "pseudo-ris-downloader/0.1 (+https://github.com/pseudo-ris/pseudo-ris)"
LOCK_NAME = "checksums.lock.json"
CHUNK = 1 << 20


# --------------------------------------------------------------------------- errors


class DownloadError(RuntimeError):
    """A download failed (HTTP error, every mirror failed)."""


class OfflineError(DownloadError):
    """The host could not be reached at all."""


class ChecksumError(DownloadError):
    """A file's size or digest differs from the expected one."""


# --------------------------------------------------------------------------- hashing / lock file


def file_digests(path: str | os.PathLike, algorithms=("sha256", "md5")) -> dict[str, str]:
    """Hex digests of a file (read in 1 MiB chunks)."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            for h in hashes.values():
                h.update(buf)
    return {a: h.hexdigest() for a, h in hashes.items()}


def read_lock(data_root: str | os.PathLike) -> dict:
    """``DIR/checksums.lock.json`` as a dict (``{}`` if missing); a malformed file is an error naming it."""
    path = Path(data_root) / LOCK_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to record checksums again") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; delete it to record checksums again")
    return data


def write_lock(data_root: str | os.PathLike, lock: dict) -> None:
    atomic_write(Path(data_root) / LOCK_NAME, json.dumps(lock, indent=2, sort_keys=True))


def verify_file(path: Path, source: Source, lock: dict, final: Path | None = None) -> dict:
    """Check ``path`` against the table (or the lock record); return ``{"sha256", "md5", "size"}``.

    Raises ChecksumError (after renaming the file to ``<final or path>.corrupt``) on a mismatch.
    """
    size = path.stat().st_size
    logger.info("verifying %s (%.2f GB)", path, size / 1e9)
    digests = file_digests(path)
    expected = []
    if source.size is not None:
        expected.append(("size", source.size, size, source.checksum_source))
    if source.sha256:
        expected.append(("sha256", source.sha256, digests["sha256"], source.checksum_source))
    if source.md5:
        expected.append(("md5", source.md5, digests["md5"], source.checksum_source))
    rec = lock.get(source.name)
    if rec and not source.sha256:
        expected.append(("sha256", rec.get("sha256"), digests["sha256"], f"{LOCK_NAME} (recorded {rec.get('recorded')})"))
    if rec and source.size is None and rec.get("size") is not None:
        expected.append(("size", rec["size"], size, f"{LOCK_NAME} (recorded {rec.get('recorded')})"))
    for what, want, got, where in expected:
        if want is not None and want != got:
            bad = (final or path).with_name((final or path).name + ".corrupt")
            os.replace(path, bad)
            raise ChecksumError(
                f"{path}: {what} mismatch: expected {want} ({where}), got {got}. The file is corrupt or the "
                f"server now serves a different file; it was moved to {bad}. Run the command again to download "
                f"it again (delete {bad} when done)."
            )
    return {"sha256": digests["sha256"], "md5": digests["md5"], "size": size}


# --------------------------------------------------------------------------- HTTP with resume


def _is_offline(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    if isinstance(reason, (ConnectionRefusedError, socket.gaierror, socket.timeout, TimeoutError)):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH,
                                                            errno.ECONNREFUSED)


def fetch(url: str, dest: str | os.PathLike, *, expected_size: int | None = None, retries: int = 5,
          timeout: float = 60.0, backoff: float = 1.0, progress: bool = True, verify=None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with HTTP Range after a cut connection.

    Arguments:
      expected_size: bytes the file must have (when known); a ``.part`` of that size is complete.
      retries: how many times an interrupted transfer is resumed before giving up.
      verify: ``verify(part_path)`` called on the complete ``.part`` BEFORE it is renamed to ``dest`` (raises
        on a mismatch): a process killed while verifying leaves ``.part``, never an unverified ``dest``.
    Returns ``dest``. Raises OfflineError (host unreachable), DownloadError (HTTP error, too many cuts).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_err: BaseException | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have == expected_size:
            break
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                total = _receive(resp, url, dest, part, have, expected_size, progress)
            got = part.stat().st_size
            if total is not None and got < total:
                raise http.client.IncompleteRead(b"", total - got)
            if total is not None and got > total:
                part.unlink()
                raise DownloadError(f"{url}: received {got} bytes, more than the announced {total}")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # range not satisfiable: nothing left to send, or a stale .part
                if expected_size is None or have == expected_size:
                    break
                part.unlink()
                last_err = e
                continue
            if e.code in (408, 429, 500, 502, 503, 504) and attempt < retries:
                last_err = e
                time.sleep(backoff * (attempt + 1))
                continue
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (downloading {dest.name})") from e
        except urllib.error.URLError as e:
            if _is_offline(e):
                raise OfflineError(
                    f"cannot reach {url} ({e.reason}): this machine looks offline or the host is blocked. "
                    f"Download the file elsewhere and put it at {dest}; the command then verifies and uses it."
                ) from e
            last_err = e
        except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as e:
            last_err = e
            logger.warning("%s: transfer interrupted after %d bytes (%s); resuming (%d/%d)", url,
                           part.stat().st_size if part.exists() else 0, type(e).__name__, attempt + 1, retries)
            time.sleep(backoff * attempt)
    else:
        raise DownloadError(f"{url}: gave up after {retries} interrupted attempts ({last_err!r}); "
                            f"run the command again to resume from {part}")
    if verify is not None:
        verify(part)
    os.replace(part, dest)
    return dest


def _receive(resp, url: str, dest: Path, part: Path, have: int, expected_size: int | None, progress: bool
             ) -> int | None:
    """Append a 206 answer to ``part`` (resumed at ``have``) or write a 200 answer over it; returns the file's
    announced total size (``expected_size`` when the server names none)."""
    status = getattr(resp, "status", 200)
    mode = "ab"
    if status == 206:
        crange = resp.headers.get("Content-Range", "")
        start = int(crange.split()[1].split("-")[0]) if crange.startswith("bytes ") else have
        if start != have:
            raise DownloadError(f"{url}: server resumed at byte {start}, asked for {have}")
        total = int(crange.rsplit("/", 1)[1]) if "/" in crange and not crange.endswith("*") else None
    else:  # 200: the whole file (the server ignored Range, or this is the first request)
        if have:
            logger.info("%s: server ignored the Range request; restarting from zero", url)
        have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None else None
    if expected_size is not None and total is not None and total != expected_size:
        raise ChecksumError(f"{url}: server announces {total} bytes, expected {expected_size} "
                            f"(table entry for {dest.name}); the file on the server changed")
    total = total if total is not None else expected_size
    _copy_body(resp, part, mode, have, total, dest.name, progress)
    return total


def _copy_body(resp, part: Path, mode: str, have: int, total: int | None, label: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=label, disable=not progress, leave=False) as bar:
        while True:
            buf = resp.read(CHUNK)
            if not buf:
                break
            f.write(buf)
            bar.update(len(buf))


# --------------------------------------------------------------------------- entries


def resolve_names(what: str | list[str]) -> list[Source]:
    """``"refcoco,sam-vit-h"`` / ``["paper"]`` -> Sources (groups expanded, aliases accepted)."""
    items = what.split(",") if isinstance(what, str) else list(what)
    alias = {a: s.name for s in SOURCES.values() for a in s.aliases}
    out: list[Source] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        names = GROUPS.get(name, (alias.get(name, name),))
        for n in names:
            if n not in SOURCES:
                raise ValueError(f"--what: unknown item {name!r}; known: {', '.join([*SOURCES, *GROUPS])}")
            if SOURCES[n] not in out:
                out.append(SOURCES[n])
    return out


def _verified(source: Source, dest: Path, lock: dict) -> bool:
    """Whether ``dest`` was verified by this tool (its lock record matches its size): else it is verified before
    it counts as present (a file placed by hand, or renamed before verification by an older version)."""
    rec = lock.get(source.name) or {}
    try:
        return rec.get("size") == dest.stat().st_size and bool(rec.get("sha256"))
    except OSError:
        return False


def _marker(source: Source, root: Path) -> Path:
    return root / ".extracted" / source.name


def is_present(source: Source, data_root: str | os.PathLike) -> bool:
    """Whether everything ``source`` provides is already under ``data_root``.

    An archive still in ``downloads/`` without its ``.extracted/<name>`` marker means an unpacking that was
    interrupted: not present (it is unpacked again). Files placed by hand (no archive) count as present.
    """
    root = Path(data_root)
    if not source.provides or not all((root / p).exists() for p in source.provides):
        return False
    if source.extract_to is not None and (root / source.dest / source.filename).exists():
        return _marker(source, root).exists()
    return True


def _safe_extract(archive: Path, target: Path) -> int:
    """Unzip ``archive`` into ``target``, refusing members that would land outside it; returns #files.

    The check is on the member names (absolute paths, drive letters and ``..`` are refused), not on resolved
    paths: a folder inside ``target`` that the user made a symlink (e.g. ``train2014`` -> a big disk) is used,
    as the user meant (zip members are plain files: an archive cannot create links of its own here)."""
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                raise DownloadError(f"{archive}: member {info.filename!r} would unpack outside {target}; refusing")
        for info in zf.infolist():
            zf.extract(info, target)
            n += not info.is_dir()
    return n


def ensure(source: Source, data_root: str | os.PathLike, *, verify_existing: bool = False,
           delete_archives: bool = False, progress: bool = True, retries: int = 5, timeout: float = 60.0) -> dict:
    """Make ``source`` available under ``data_root``: download (resuming), verify, unpack.

    Returns ``{"name", "status": "present" | "downloaded" | "verified", "path", "sha256"?, "recorded"?}``.
    """
    root = Path(data_root)
    if source.manual:
        if is_present(source, root):
            return {"name": source.name, "status": "present", "path": str(root / source.provides[0])}
        raise DownloadError(f"{source.name} is not downloaded automatically: {source.note}")
    dest = root / source.dest / source.filename
    lock = read_lock(root)
    if is_present(source, root) and not verify_existing and (not dest.exists() or _verified(source, dest, lock)):
        return {"name": source.name, "status": "present", "path": str(root / source.provides[0])}
    status = "verified"
    if not dest.exists():
        if is_present(source, root):  # unpacked earlier, archive deleted: nothing to verify against
            return {"name": source.name, "status": "present", "path": str(root / source.provides[0])}
        errors, offline, checked = [], [], {}
        for url in source.urls:  # official URL first, then the mirrors
            try:
                fetch(url, dest, expected_size=source.size or (lock.get(source.name) or {}).get("size"),
                      progress=progress, retries=retries, timeout=timeout,
                      verify=lambda part: checked.update(verify_file(part, source, lock, final=dest)))
                break
            except ChecksumError:
                raise
            except OfflineError as e:  # this host is unreachable; a mirror may not be
                offline.append(str(e))
                logger.warning("%s; trying the next mirror", e)
            except DownloadError as e:
                errors.append(str(e))
                logger.warning("%s; trying the next mirror", e)
        else:
            if offline and not errors:
                raise OfflineError(offline[0] if len(offline) == 1 else
                                   f"{source.name}: no URL reachable:\n  " + "\n  ".join(offline))
            raise DownloadError(f"{source.name}: every URL failed:\n  " + "\n  ".join(errors + offline))
        status = "downloaded"
    info = checked if status == "downloaded" else verify_file(dest, source, lock)
    result = {"name": source.name, "status": status, "path": str(dest), "sha256": info["sha256"]}
    if source.name not in lock:
        lock[source.name] = {"file": str(Path(source.dest) / source.filename), "size": info["size"],
                             "sha256": info["sha256"], "md5": info["md5"],
                             "recorded": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                             "published_checksum": bool(source.sha256 or source.md5)}
        write_lock(root, lock)
        if not (source.sha256 or source.md5):
            result["recorded"] = True
            logger.warning("%s: no published checksum; recorded sha256 %s (%d bytes) in %s; later downloads "
                           "are checked against it", source.name, info["sha256"], info["size"], root / LOCK_NAME)
    if source.extract_to is not None and is_present(source, root):  # --verify of an unpacked archive
        result["path"] = str(root / source.provides[0])
        return result
    if source.extract_to is not None:
        n = _safe_extract(dest, root / source.extract_to)
        result["extracted_files"] = n
        missing = [p for p in source.provides if not (root / p).exists()]
        if missing:
            raise DownloadError(f"{dest}: unpacked, but {missing} are still missing under {root}; "
                                f"the archive's layout is not the expected one")
        _marker(source, root).parent.mkdir(parents=True, exist_ok=True)
        _marker(source, root).write_text(json.dumps({"sha256": info["sha256"], "files": n}))
        if delete_archives:
            dest.unlink()
    result["path"] = str(root / source.provides[0]) if source.provides else str(dest)
    return result


def download(what: str | list[str], data_root: str | os.PathLike, **kw) -> list[dict]:
    """:func:`ensure` every item of ``what`` (comma list, groups ``paper`` / ``refer`` allowed)."""
    return [ensure(s, data_root, **kw) for s in resolve_names(what)]


# --------------------------------------------------------------------------- CLI


def _table() -> str:
    lines = [f"{'name':<16} {'size':>12}  {'checksum':<8} note"]
    for s in SOURCES.values():
        size = "manual" if s.manual else (f"{s.size / 1e9:.2f} GB" if s.size else "?")
        check = "sha256" if s.sha256 else ("md5" if s.md5 else ("-" if s.manual else "lock"))
        lines.append(f"{s.name:<16} {size:>12}  {check:<8} {s.note}")
    groups = "; ".join(f"{k} = {','.join(v)}" for k, v in GROUPS.items())
    lines.append(f"groups: {groups}")
    lines.append("lock = no published checksum: sha256 recorded in DIR/checksums.lock.json on first download")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ris_utils download",
        description="Download and verify the paper profile's datasets and checkpoints (resumable).",
        epilog="open_clip weights (CoCa, CLIP) are not downloaded here: open_clip's pretrained= fetches them.",
    )
    ap.add_argument("--what", default="paper", help="comma list of items or groups (see --list); default: paper")
    ap.add_argument("--data-root", default=None,
                    help="target folder (REFER layout); default: shared.data_root of --profile (data/paper)")
    ap.add_argument("--profile", default="paper", help="profile whose data_root is the default (default: paper)")
    ap.add_argument("--list", action="store_true", help="print the source table and exit")
    ap.add_argument("--verify", action="store_true", help="re-hash files already present (when the archive is kept)")
    ap.add_argument("--delete-archives", action="store_true", help="delete zip archives after unpacking")
    ap.add_argument("--retries", type=int, default=5, help="resume attempts after a cut connection")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print(_table())
        return 0
    try:
        sources = resolve_names(args.what)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data_root is None:
        args.data_root = step_config(args.profile, "shared")["data_root"]
    failed = 0
    for s in sources:
        try:
            r = ensure(s, args.data_root, verify_existing=args.verify, delete_archives=args.delete_archives,
                       progress=not args.no_progress, retries=args.retries, timeout=args.timeout)
            extra = " (no published checksum: recorded in checksums.lock.json)" if r.get("recorded") else ""
            print(f"[download] {s.name}: {r['status']} -> {r['path']}{extra}")
        except OfflineError as e:
            print(f"[download] {s.name}: OFFLINE: {e}", file=sys.stderr)
            return 3
        except (DownloadError, OSError, zipfile.BadZipFile) as e:
            print(f"[download] {s.name}: FAILED: {e}", file=sys.stderr)
            failed += 1
    if failed:
        return 1
    print(f"[download] done; data root {Path(args.data_root).resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
