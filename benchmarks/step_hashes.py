"""Byte-identity of the shapes profile's step outputs: record sha256 of every output, or check against the record.

    python benchmarks/step_hashes.py            # run the steps, write benchmarks/step_hashes.json
    python benchmarks/step_hashes.py --check    # run them again, diff against benchmarks/step_hashes.json (exit 1)

Runs the pipeline's CLI (``python -m ris_utils <step> --profile shapes``, the checkout's own package first on
``PYTHONPATH``, CPU only, one OpenMP thread) into a temporary root (``--root`` to choose it, ``--keep`` to keep it):

* ``shapes``: the shapes world under ``<root>/data`` (every image, ``scenes.json``, the REFER datasets);
* ``masks``: step 1 on the profile's splits (train, val; every image);
* ``captions``: step 2, naive and distinctive, train and val, the first ``--max-images`` images per split
  (default 60: the whole split takes minutes on a shared CPU; the cap is stored in the record and reused by
  ``--check``);
* ``filter``: step 3 (DoC) on every captions folder;
* ``export``: the three training sets of notebook 03 (naive and distinctive unfiltered from captions,
  pseudo_ris from the filtered distinctive captions; split train) as REFER + CRIS formats.

Every file under the root is hashed after the root's path is replaced by ``<ROOT>`` (records hold absolute
image paths); a symbolic link is hashed as its (normalised) target. Left out or kept apart, and why:

* ``parts/*.log`` and dotfiles (locks): the engine's per-rank work logs; each line is the merged
  ``records.jsonl`` line prefixed by the run's config fingerprint, so they repeat what is hashed, plus bookkeeping;
* ``manifest.json`` and ``config.yaml`` files: bookkeeping, not outputs -- the data manifest holds a hash of the
  generator's source (``code``: it changes whenever ``data/shapes*`` is edited, by design), the step manifests
  hold the resolved config and its fingerprint (they change when settings gain or lose keys, and with the root's
  path), ``config.yaml`` is the resolved config saved beside a step's output. They are recorded under
  ``bookkeeping``; a difference there (or one that appears) is reported but does not fail ``--check``.

Folders with more than 40 files (images, CRIS masks) are stored as one digest over (name, file digest) pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "benchmarks" / "step_hashes.json"
PROFILE = "shapes"
SPLITS = ("train", "val")
MODES = ("naive", "distinctive")
#: export name -> (step folder it reads, mode, filtered)
TRAINSETS = {"naive": ("captions", "naive", False), "distinctive": ("captions", "distinctive", False),
             "pseudo_ris": ("filter", "distinctive", True)}
BIG_FOLDER = 40
#: files that describe a run rather than hold its output (reported, never failing --check)
BOOKKEEPING = ("manifest.json", "config.yaml")


def run_cli(args: list[str], log) -> float:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PSEUDO_RIS_ROOT=str(REPO),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "ris_utils", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        sys.exit(f"step failed (exit {proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_steps(root: Path, max_images: int, log) -> dict:
    data, work = root / "data", root / "work"
    common = ["--profile", PROFILE, "--param", f"data_root={data}", "--param", f"work_dir={work}"]
    seconds = {"shapes": run_cli(["shapes", "--profile", PROFILE, "--out", str(data)], log)}
    seconds["masks"] = run_cli(["masks", *common, "--no-progress", *sum((["--split", s] for s in SPLITS), [])], log)
    seconds["captions"] = sum(
        run_cli(["captions", *common, "--split", split, "--mode", mode, "--param", f"max_images={max_images}"], log)
        for split in SPLITS for mode in MODES)
    seconds["filter"] = sum(
        run_cli(["filter", *common, "--candidates", str(work / "captions" / mode / split),
                 "--out", str(work / "filter" / mode / split)], log)
        for split in SPLITS for mode in MODES)
    seconds["export"] = sum(
        run_cli(["export", *common, "--candidates", str(work / src / mode / "train"),
                 "--out", str(work / "export" / name), "--format", "refer,cris",
                 *([] if filtered else ["--unfiltered"])], log)
        for name, (src, mode, filtered) in TRAINSETS.items())
    return {k: round(v, 1) for k, v in seconds.items()}


def file_digest(path: Path, root: Path) -> str:
    marker = str(root).encode()
    if path.is_symlink():
        body = b"symlink:" + os.readlink(path).encode()
    else:
        body = path.read_bytes()
    return hashlib.sha256(body.replace(marker, b"<ROOT>")).hexdigest()


def skipped(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts) or (rel.parent.name == "parts" and rel.suffix == ".log")


def hash_tree(root: Path) -> dict:
    """{"files": {rel: sha}, "folders": {rel: {"n", "sha256"}}, "bookkeeping": {rel: sha}}."""
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (path.is_file() or path.is_symlink()) and not skipped(rel):
            by_folder.setdefault(rel.parent, []).append(rel)
    out: dict = {"files": {}, "folders": {}, "bookkeeping": {}}
    for folder, rels in sorted(by_folder.items()):
        digests = {rel: file_digest(root / rel, root) for rel in rels}
        if len(rels) > BIG_FOLDER:
            joined = "".join(f"{rel.name}\0{d}\n" for rel, d in sorted(digests.items()))
            out["folders"][folder.as_posix()] = {"n": len(rels), "sha256": hashlib.sha256(joined.encode()).hexdigest()}
            continue
        for rel, d in digests.items():
            out["bookkeeping" if rel.name in BOOKKEEPING else "files"][rel.as_posix()] = d
    return out


def diff(old: dict, new: dict, kind: str) -> list[str]:
    a, b = old.get(kind, {}), new.get(kind, {})
    lines = [f"{kind}: missing now: {k}" for k in sorted(set(a) - set(b))]
    lines += [f"{kind}: new: {k}" for k in sorted(set(b) - set(a))]
    lines += [f"{kind}: differs: {k}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return lines


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help=f"diff against {RECORD.relative_to(REPO)} (exit 1 on a difference)")
    ap.add_argument("--record", type=Path, default=RECORD, help="the hash list to write / check against")
    ap.add_argument("--root", type=Path, default=None, help="where the steps write (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the root (default: removed at the end)")
    ap.add_argument("--max-images", type=int, default=60, help="captions: images per split (record mode only)")
    args = ap.parse_args(argv)
    if args.check and not args.record.is_file():
        sys.exit(f"{args.record} does not exist: run without --check on the reference code first")
    old = json.loads(args.record.read_text()) if args.check else None
    max_images = old["max_images"] if old else args.max_images
    root = (args.root or Path(tempfile.mkdtemp(prefix="step_hashes_"))).resolve()
    if args.root and root.exists() and any(root.iterdir()):
        sys.exit(f"--root {root} is not empty: name a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    try:
        with open(root / ".steps.log", "w") as log:
            seconds = run_steps(root, max_images, log)
        hashes = hash_tree(root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    n = len(hashes["files"]) + sum(f["n"] for f in hashes["folders"].values())
    print(f"{n} output files hashed ({len(hashes['bookkeeping'])} bookkeeping); step seconds {seconds}")
    if not args.check:
        record = {"profile": PROFILE, "max_images": max_images, "commit": git_commit(), **hashes}
        args.record.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.record}")
        return 0
    problems = diff(old, hashes, "files") + diff(old, hashes, "folders")
    notes = diff(old, hashes, "bookkeeping")
    for line in notes:
        print(f"note (bookkeeping, not an output): {line}")
    for line in problems:
        print(f"DIFFERENT {line}")
    print(f"{'FAIL' if problems else 'OK'}: outputs vs {args.record.name} (recorded at {old.get('commit', '?')[:10]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
