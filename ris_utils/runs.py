"""The papermill runner: ``python -m ris_utils.runs --profile shapes [--only 01,02] [--params k=v ...]``.

Executes ``notebooks/NN_*.ipynb`` in numeric order through papermill's Python API on the project's
kernel, with ``profile`` (and the profile's ``notebooks.<NN>`` entry, and ``--params``) injected after
each notebook's ``parameters`` cell. Executed notebooks go to ``papermill_runs/output/<profile>/``; the
numbers each notebook records with :func:`ris_utils.record` are merged into
``papermill_runs/output/<profile>/metrics.json`` after each notebook, so a later failure keeps them.
On a failing notebook the runner stops, prints the notebook, the failing cell's source and the error,
and exits non-zero; the partly executed notebook is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from ris_utils.fileio import atomic_write

from . import METRICS_ENV
from .profiles import load_profile, notebook_parameters, parse_params, profile_path, project_root

logger = logging.getLogger(__name__)

KERNEL_NAME = "pseudo-ris"
NOTEBOOK_RE = re.compile(r"^(\d\d)_[\w\-]+\.ipynb$")


def find_notebooks(notebooks_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Numbered notebooks in numeric order, optionally restricted to the numbers in ``only``."""
    nbs = sorted(p for p in notebooks_dir.glob("*.ipynb") if NOTEBOOK_RE.match(p.name))
    if only:
        wanted = {o.strip().zfill(2) for o in only if o.strip()}
        missing = wanted - {p.name[:2] for p in nbs}
        if missing:
            raise SystemExit(f"--only: no notebook numbered {', '.join(sorted(missing))} in {notebooks_dir}")
        nbs = [p for p in nbs if p.name[:2] in wanted]
    return nbs


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure a kernel spec ``name`` exists that runs this interpreter; install it under sys.prefix."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        if Path(spec.argv[0]).exists():
            return name
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=name, display_name="Python (pseudo-ris)", prefix=sys.prefix)
    logger.info("installed kernel %s under %s", name, sys.prefix)
    return name


def _atomic_write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def merge_metrics(out_dir: Path) -> dict:
    """Rebuild ``metrics.json`` from the per-notebook files in ``metrics/`` (notebook order).

    A notebook that is run again replaces all of its keys, so no stale number survives a rerun, and
    notebooks not run this time keep the numbers of their last run.
    """
    data: dict = {}
    for path in sorted((out_dir / "metrics").glob("*.json")):
        data.update(json.loads(path.read_text() or "{}"))
    _atomic_write_json(out_dir / "metrics.json", data)
    return data


def describe_failure(output_nb: Path) -> str:
    """Text naming the failing cell (source + error) of an executed notebook."""
    import nbformat

    try:
        nb = nbformat.read(str(output_nb), as_version=4)
    except Exception as e:  # pragma: no cover - unreadable output
        return f"(could not read {output_nb}: {e})"
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = "\n".join(out.get("traceback", []))
                tb = re.sub(r"\x1b\[[0-9;]*m", "", tb)  # strip ANSI colours
                return (
                    f"failing cell #{i}:\n{cell.source}\n\n"
                    f"error: {out.get('ename')}: {out.get('evalue')}\n{tb}"
                )
    return "(no error output found in the notebook)"


def run_profile(
    profile: str,
    only: list[str] | None = None,
    params: dict | None = None,
    kernel_name: str = KERNEL_NAME,
    notebooks_dir: Path | None = None,
    output_root: Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the numbered notebooks of a profile; return the merged metrics. Raises SystemExit on failure."""
    import papermill as pm

    root = project_root()
    notebooks_dir = Path(notebooks_dir or root / "notebooks")
    prof = load_profile(profile)
    name = prof["name"]
    out_dir = Path(output_root or root / "papermill_runs" / "output") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics").mkdir(exist_ok=True)
    shutil.copyfile(profile_path(profile), out_dir / "profile.yaml")  # the settings beside the results
    metrics_path = out_dir / "metrics.json"
    kernel_name = ensure_kernel(kernel_name)
    notebooks = find_notebooks(notebooks_dir, only)
    if not notebooks:
        raise SystemExit(f"no numbered notebooks found in {notebooks_dir}")
    metrics = merge_metrics(out_dir)
    for nb in notebooks:
        number = nb.name[:2]
        nb_params = notebook_parameters(profile, number)
        nb_params.update(params or {})
        out_nb = out_dir / nb.name
        nb_metrics = out_dir / "metrics" / f"{nb.stem}.json"
        nb_metrics.unlink(missing_ok=True)
        env_before = os.environ.get(METRICS_ENV)
        os.environ[METRICS_ENV] = str(nb_metrics)
        os.environ.setdefault("PSEUDO_RIS_ROOT", str(root))
        print(f"[runs] {nb.name} (profile {name}) -> {out_nb}", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(nb),
                str(out_nb),
                parameters=nb_params,
                kernel_name=kernel_name,
                cwd=str(notebooks_dir),
                progress_bar=progress,
                log_output=False,
            )
        except pm.PapermillExecutionError as e:
            print(
                f"\n[runs] FAILED: notebook {nb} (executed copy kept at {out_nb})\n"
                f"{describe_failure(out_nb)}\n",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from e
        finally:
            if env_before is None:
                os.environ.pop(METRICS_ENV, None)
            else:
                os.environ[METRICS_ENV] = env_before
        seconds = time.perf_counter() - t0
        new = json.loads(nb_metrics.read_text()) if nb_metrics.exists() else {}
        new[f"runtime.{nb.stem}.seconds"] = round(seconds, 1)
        _atomic_write_json(nb_metrics, new)
        metrics = merge_metrics(out_dir)
        print(f"[runs] {nb.name} done in {seconds:.1f} s, {len(new) - 1} numbers recorded", flush=True)
    print(f"[runs] metrics: {metrics_path}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils.runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="shapes", help="profile name (papermill_runs/<name>.yaml) or path")
    ap.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    ap.add_argument("--params", nargs="*", default=[], metavar="K=V", help="extra papermill parameters")
    ap.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel name")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    only = args.only.split(",") if args.only else None
    try:
        load_profile(args.profile)  # a broken profile is one line naming the file, before any notebook runs
        params = parse_params(args.params)
    except (ValueError, OSError) as e:
        from ris_utils.__main__ import one_line

        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    run_profile(args.profile, only=only, params=params, kernel_name=args.kernel, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
