"""The grid of notebook 04: training sets x expression styles x seeds, trained and evaluated.

Training sets (rows of the paper's ablation and semi-supervised tables):

- ``naive``, ``distinctive``, ``pseudo_ris``: step 3's exports ``<work_dir>/export/<name>`` (REFER, split
  train). Pseudo supervision knows no expression style, so each is trained ONCE per seed and evaluated on
  every style.
- ``gt``: the human (ground-truth) refs of a style's train split (fully supervised).
- ``gt10``: the human refs of ``fraction`` (10 %) of the train images, drawn by
  :func:`ris_utils.export.sample_images` with the profile's ``export.mix`` seed -- the same images the mix uses.
- ``gt10+pseudo``: :func:`ris_utils.export.mix_datasets` of ``pseudo_ris`` and the style's human refs.

The last three are trained per style. Each job writes ``<out>/last.pt`` (training), and per evaluated split
``<out>/eval/<style>.<split>.json`` with the scores and ``trainset``, ``style``, ``seed``. Jobs run in a
process pool (``workers``, one torch thread each: on a shared CPU this beats one process with several
threads); a job whose evaluation files exist for the same settings is skipped.

Eval sets (``ris.experiments.eval_sets``: ``{style, dataset, split_by, splits}``) may also carry

- ``data_root``: the REFER root of that benchmark (relative paths are resolved against the project root, as
  the profile's own paths), e.g. the converted PhraseCut of notebook 00; default: the profile's data_root.
- ``eval_only: true``: an evaluation-only benchmark (the paper's zero-shot unseen domain): no ``gt`` /
  ``gt10`` / ``gt10+pseudo`` row is trained on that style; only the style-free pseudo rows are scored on it.
  Such a set is not part of a job's key (it does not change training): a finished job gets its missing
  eval-only scores added later without retraining (each such file carries an ``eval_key``).
- ``optional: true``: when its refs file ``<data_root>/<dataset>/refs(<split_by>).p`` is missing,
  :func:`plan` leaves the set out with a warning instead of failing later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ris_utils import layout
from ris_utils.data import refer
from ris_utils.data.refer import refs_path, select_split
from ris_utils.export import mix_datasets, sample_images
from ris_utils.fileio import atomic_write
from ris_utils.images import load_image_rgb
from ris_utils.models import resolve_device, seed_everything
from ris_utils.profiles import project_root, resolve_paths
from ris_utils.ris.build import build_tokenizer, make_model, resolve_config
from ris_utils.ris.dataset import _to_tensor_image, image_key, letterbox_tensor, open_refer
from ris_utils.ris.diagnostics import ATTRIBUTE_KINDS
from ris_utils.ris.evaluate import evaluate_checkpoint, load_checkpoint
from ris_utils.ris.features import feature_stores
from ris_utils.ris.train import train

logger = logging.getLogger(__name__)

PSEUDO_TRAINSETS = ("naive", "distinctive", "pseudo_ris")
GT_TRAINSETS = ("gt", "gt10", "gt10+pseudo")
ALL_TRAINSETS = PSEUDO_TRAINSETS + GT_TRAINSETS


@dataclass
class Job:
    """One training run and its evaluations."""

    trainset: str
    style: str | None          # None: style-free pseudo supervision, evaluated on every style
    seed: int
    train_path: str
    train_dataset: str | None
    split_by: str | None
    out: str
    evals: list = field(default_factory=list)   # [{"style", "dataset", "split_by", "splits"} (+ data_root,
                                                #   eval_only, optional: see the module docstring)]
    val: dict | None = None                      # {"path", "dataset", "split_by"} for the per-epoch curve

    @property
    def name(self) -> str:
        return f"{self.trainset}/{self.style or 'any'}/seed{self.seed}"


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_gt10(data_root, style: str, split_by: str, fraction: float, seed: int, out_root) -> Path:
    """Write the human refs of ``fraction`` of the train images of ``style`` as a REFER set; returns its root."""
    human = refer.load_refer(data_root, style, split_by)
    train = refer.select_split(human.refs, "train")
    chosen = set(sample_images([r["image_id"] for r in train], fraction, seed))
    refs = [r for r in train if r["image_id"] in chosen]
    imgs = [human.imgs[i] for i in sorted(chosen)]
    ann_ids = {r["ann_id"] for r in refs}
    anns = [a for a in human.anns.values() if a["id"] in ann_ids]
    cats = [{"id": k, "name": v} for k, v in human.cats.items()]
    refer.write_refer(out_root, style, split_by, refs, imgs, anns, cats)
    return Path(out_root)


def prepare_mix(pseudo_dir, data_root, style: str, split_by: str, fraction: float, seed: int, out_root) -> Path:
    """``gt10+pseudo`` for one style through :func:`ris_utils.export.mix_datasets` (images found in data_root;
    the pseudo export is read once for every style: :func:`ris_utils.ris.dataset.open_refer`)."""
    mix_datasets(open_refer(pseudo_dir), refer.load_refer(data_root, style, split_by), fraction, seed, out_root,
                 dataset=style, split_by="mix", images="none")
    return Path(out_root)


def runs_dir(cfg: dict) -> Path:
    """Where the grid's runs go: ``<work_dir>/<experiments.runs_dir>`` (default ``ris``). A profile variant
    that shares steps 1-3 with its base (same ``work_dir``) but trains differently names its own."""
    return layout.ris_runs_dir(cfg, (cfg.get("experiments") or {}).get("runs_dir"))


def _feature_cache(cfg: dict) -> dict:
    """``cfg`` with ``feature_cache`` = ``<runs dir>/features`` unless set: frozen towers' features are shared
    by every run of the grid."""
    if not cfg.get("feature_cache") and cfg.get("work_dir"):
        runs = (cfg.get("experiments") or {}).get("runs_dir")
        cfg = {**cfg, "feature_cache": str(layout.feature_cache_dir(cfg, runs))}
    return cfg


_NEW_EVAL_KEYS = ("data_root", "eval_only", "optional")


def _resolve_eval_set(e: dict) -> dict:
    """``e`` with a relative ``data_root`` made absolute (project root, as :func:`ris_utils.profiles.resolve_paths`);
    an eval set without ``data_root`` is returned unchanged."""
    if e.get("data_root") is None:
        return e

    return {**e, "data_root": resolve_paths({"data_root": str(e["data_root"])})["data_root"]}


def _refs_missing(e: dict, data_root) -> Path | None:
    """The refs file of eval set ``e`` when it does not exist, else None."""
    p = refs_path(e.get("data_root") or data_root, e["dataset"], e.get("split_by", "shapes"))
    return None if p.is_file() else p


def plan(cfg: dict, trainsets=None, styles=None, seeds=None) -> list[Job]:
    """The jobs of the grid from the ``ris`` settings (``experiments`` block) and the export layout.

    Missing pseudo exports are skipped with a warning (rows stay empty in the tables), and so are
    ``optional`` eval sets whose refs file is missing; ``eval_only`` styles get no gt / gt10 / gt10+pseudo job.
    """
    ex = cfg.get("experiments") or {}
    trainsets = list(trainsets or ex.get("trainsets") or ALL_TRAINSETS)
    seeds = [int(s) for s in (seeds or ex.get("seeds") or [0, 1])]
    # paper profiles keep ris.eval_sets = [{dataset, split_by, splits}] (the benchmark = the style)
    eval_sets = [_resolve_eval_set({"style": e.get("style", e["dataset"]), **e})
                 for e in (ex.get("eval_sets") or cfg.get("eval_sets") or [])]
    left_out = set()
    for e in [e for e in eval_sets if e.get("optional")]:
        missing = _refs_missing(e, cfg["data_root"])
        if missing is not None:
            logger.warning("optional eval set %s: %s is missing (run notebook 00 with the data it needs); "
                           "not evaluated", e["style"], missing)
            left_out.add(e["style"])
    eval_sets = [e for e in eval_sets if e["style"] not in left_out]
    eval_only = {e["style"] for e in eval_sets if e.get("eval_only")} | left_out
    styles = [s for s in (styles or ex.get("styles") or [e["style"] for e in eval_sets]) if s not in left_out]
    data_root = Path(cfg["data_root"])
    work = Path(cfg["work_dir"])
    export_dir = work / "export"
    split_by = ex.get("split_by", "shapes")  # of the human refs (gt, gt10, mix); per style when eval_sets name one
    mix = ex.get("mix") or {"fraction": 0.1, "seed": 0}
    runs = runs_dir(cfg)
    evals_by_style = {e["style"]: e for e in eval_sets}
    val = ex.get("val")  # {"dataset", "split_by"} of data_root used for the per-epoch curve
    val_spec = {"path": str(data_root), "dataset": val["dataset"], "split_by": val.get("split_by", split_by)} if val \
        else None
    jobs = []
    by_trainset = ex.get("seeds_by_trainset") or {}  # e.g. {gt: [0]}: fewer seeds for some rows
    for ts in trainsets:
        if ts not in ALL_TRAINSETS:
            raise ValueError(f"ris.experiments.trainsets: unknown training set {ts!r}; use {ALL_TRAINSETS}")
        for seed in [int(s) for s in by_trainset.get(ts, seeds)]:
            if ts in PSEUDO_TRAINSETS:
                path = export_dir / ts
                if not path.is_dir():
                    logger.warning("no export %s: run notebook 03 (step 3) first; row %s skipped", path, ts)
                    continue
                jobs.append(Job(ts, None, seed, str(path), None, None, str(layout.ris_run_dir(runs, ts, None, seed)),
                                [evals_by_style[s] for s in styles if s in evals_by_style], val_spec))
                continue
            for style in styles:
                if style in eval_only:  # evaluation-only benchmark: no human refs are trained on
                    continue
                split_by = evals_by_style.get(style, {}).get("split_by", ex.get("split_by", "shapes"))
                out = layout.ris_run_dir(runs, ts, style, seed)
                ev = [evals_by_style[style]] if style in evals_by_style else []
                sval = {"path": str(data_root), "dataset": style, "split_by": split_by} if val else None
                if ts == "gt":
                    jobs.append(Job(ts, style, seed, str(data_root), style, split_by, str(out), ev, sval))
                elif ts == "gt10":
                    path = runs / "data" / f"gt10_{style}"
                    jobs.append(Job(ts, style, seed, str(path), style, split_by, str(out), ev, sval))
                else:
                    if not (export_dir / "pseudo_ris").is_dir():
                        logger.warning("no export %s: gt10+pseudo skipped", export_dir / "pseudo_ris")
                        continue
                    path = runs / "data" / f"mix_{style}"
                    jobs.append(Job(ts, style, seed, str(path), style, "mix", str(out), ev, sval))
    # derived training sets (written once, before the workers start)
    for job in jobs:
        sb = evals_by_style.get(job.style, {}).get("split_by", ex.get("split_by", "shapes"))
        if job.trainset == "gt10" and not (Path(job.train_path) / job.style).is_dir():
            prepare_gt10(data_root, job.style, sb, mix["fraction"], mix["seed"], job.train_path)
        if job.trainset == "gt10+pseudo" and not (Path(job.train_path) / job.style).is_dir():
            prepare_mix(export_dir / "pseudo_ris", data_root, job.style, sb, mix["fraction"], mix["seed"],
                        job.train_path)
    return jobs


def job_key(job: Job, cfg: dict) -> str:
    """Identity of a job's results: its training set, style, seed, data and training settings -- not the
    folders (``work_dir``, ``out``), so a copy of the work folder or another checkout reuses finished jobs."""
    skip = {"experiments", "step", "work_dir", "profile", "data_root", "note", "feature_cache", "feature_cache_mb"}
    d = asdict(job)
    d.pop("out")
    d["train_path"] = "/".join(Path(job.train_path).parts[-2:])
    if d.get("val"):
        d["val"] = {k: v for k, v in d["val"].items() if k != "path"}
    if any(k in e for e in d["evals"] for k in _NEW_EVAL_KEYS):  # eval sets without these keys: as before
        d["evals"] = [_eval_identity(e) for e in d["evals"] if not e.get("eval_only")]
    return _hash({"job": d, "cfg": {k: v for k, v in cfg.items() if k not in skip}, "seed": int(job.seed)})


def _eval_identity(e: dict) -> dict:
    """An eval set as it enters a key: ``data_root`` by its last two path parts (not the checkout's folder),
    without ``optional`` (which only decides whether the set is planned)."""
    out = {k: v for k, v in e.items() if k != "optional"}
    if out.get("data_root") is not None:
        out["data_root"] = "/".join(Path(out["data_root"]).parts[-2:])
    return out


def _eval_key(key: str, ev: dict, split: str) -> str:
    return _hash({"job": key, "eval": _eval_identity(ev), "split": split})


def _pending_eval_only(job: Job, out: Path, key: str) -> list[tuple[dict, str]]:
    """(eval set, split) pairs of the job's eval-only sets whose score file is missing or of other settings."""
    todo = []
    for ev in job.evals:
        if not ev.get("eval_only"):
            continue
        for split in ev["splits"]:
            p = out / "eval" / f"{ev['style']}.{split}.json"
            try:
                ok = json.loads(p.read_text()).get("eval_key") == _eval_key(key, ev, split)
            except (OSError, ValueError):
                ok = False
            if not ok:
                todo.append((ev, split))
    return todo


def _train_settings(cfg: dict, seed: int) -> dict:
    skip = {"experiments", "step"}
    return {**{k: v for k, v in cfg.items() if k not in skip}, "seed": int(seed)}


def run_job(job: Job | dict, cfg: dict) -> dict:
    """Train (resuming) and evaluate one job; returns ``{"job", "seconds", "evals": [paths], "skipped"}``."""
    import torch

    job = Job(**job) if isinstance(job, dict) else job
    cfg = _feature_cache(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    out = Path(job.out)
    tcfg = _train_settings(cfg, job.seed)
    key = job_key(job, cfg)
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        summary = json.loads(done.read_text())
        todo = _pending_eval_only(job, out, key)
        if not todo or not (out / "last.pt").is_file():
            return {**summary, "skipped": True}
        # trained already; an eval-only benchmark was added (or changed) since: score it, do not retrain
        t0 = time.time()
        paths = _evaluate(job, cfg, out, key, todo)
        summary["evals"] = [*summary.get("evals", []), *(p for p in paths if p not in summary.get("evals", []))]
        summary["eval_only_seconds"] = round(time.time() - t0, 1)
        done.write_text(json.dumps(summary, indent=1))
        return {**summary, "skipped": False}
    keyfile = out / "key.txt"
    if (out / "last.pt").is_file() and (not keyfile.is_file() or keyfile.read_text() != key):
        (out / "last.pt").unlink()  # a checkpoint of other settings: start over (same settings: resume)
    out.mkdir(parents=True, exist_ok=True)
    keyfile.write_text(key)
    t0 = time.time()
    val = job.val
    res = train(tcfg, job.train_path, out, val_path=val["path"] if val else None, train_dataset=job.train_dataset,
                split_by=job.split_by, val_dataset=val["dataset"] if val else None,
                val_split_by=val["split_by"] if val else None, progress=False)
    t_train = time.time() - t0
    paths = _evaluate(job, cfg, out, key, [(ev, split) for ev in job.evals for split in ev["splits"]])
    summary = {"key": key, "job": job.name, "train_seconds": round(t_train, 1),
               "seconds": round(time.time() - t0, 1), "evals": paths, "history": res["history"]}
    done.write_text(json.dumps(summary, indent=1))
    return {**summary, "skipped": False}


def _evaluate(job: Job, cfg: dict, out: Path, key: str, todo: list[tuple[dict, str]]) -> list[str]:
    """Score ``out/last.pt`` on each (eval set, split) of ``todo``, each on the set's own ``data_root`` when it
    names one (else the profile's); writes ``out/eval/<style>.<split>.json``, returns their paths."""
    device = resolve_device(cfg["device"])  # the profile's device (CPU in CI, the GPU on Colab)
    loaded = load_checkpoint(out / "last.pt", device)
    stores = feature_stores(loaded[0], {**loaded[2], "feature_cache": cfg.get("feature_cache")}, device)
    paths = []
    for ev, split in todo:
        scores = evaluate_checkpoint(out / "last.pt", ev.get("data_root") or cfg["data_root"], split, ev["dataset"],
                                     ev.get("split_by", "shapes"), loaded=loaded, device=device, stores=stores)
        scores.update(trainset=job.trainset, style=ev["style"], seed=job.seed, train_style=job.style)
        if ev.get("eval_only"):
            scores["eval_key"] = _eval_key(key, ev, split)
        p = out / "eval" / f"{ev['style']}.{split}.json"
        atomic_write(p, json.dumps(scores, indent=1))
        paths.append(str(p))
    return paths


def _opened(cache: dict | None, path, dataset, split_by):
    """``open_refer(path, dataset, split_by)`` read once per ``cache`` (the pseudo exports take seconds each);
    None when it cannot be read (the run reports why)."""
    cache = {} if cache is None else cache
    k = (str(path), dataset, split_by)
    if k not in cache:
        try:
            cache[k] = open_refer(path, dataset, split_by)
        except (OSError, ValueError, KeyError):
            cache[k] = None
    return cache[k]


def job_cost(job: Job, cfg: dict, _refs: dict | None = None) -> float:
    """Rough cost of a job in forward passes: training samples (train refs x epochs, a training step costing
    ~3 forwards) + evaluated sentences. Used only to order the pool's queue (:func:`run_jobs`). ``_refs``: a
    cache of the opened REFER sets, shared with :func:`job_images`."""
    cache = {} if _refs is None else _refs

    def refs(path, dataset, split_by):
        data = _opened(cache, path, dataset, split_by)
        return data.refs if data is not None else []

    n_train = len(select_split(refs(job.train_path, job.train_dataset, job.split_by), "train"))
    n_eval = sum(len(r["sentences"]) for ev in job.evals for sp in ev["splits"]
                 for r in select_split(refs(ev.get("data_root") or cfg["data_root"], ev["dataset"],
                                            ev.get("split_by", "shapes")), sp))
    return 3.0 * n_train * float(resolve_config(cfg)["epochs"]) + n_eval


def job_images(jobs: list[Job], cfg: dict, _refs: dict | None = None) -> list[str]:
    """The images every job trains or is evaluated on, as image-feature keys (resolved path ``@`` input size),
    sorted; an image linked into several sets is one key. ``_refs``: as :func:`job_cost`'s."""
    sets = {(str(j.train_path), j.train_dataset, j.split_by) for j in jobs}
    sets |= {(str(ev.get("data_root") or cfg["data_root"]), ev["dataset"], ev.get("split_by", "shapes"))
             for j in jobs for ev in j.evals}
    keys = set()
    for path, dataset, split_by in sorted(sets, key=str):
        refer = _opened(_refs, path, dataset, split_by)
        if refer is None:
            refer = open_refer(path, dataset, split_by)  # raises the reason
        for image_id in sorted({r["image_id"] for r in refer.refs}):
            try:
                keys.add(image_key(refer.image_path(image_id), cfg["input_size"]))
            except FileNotFoundError:
                continue  # the training / evaluation run reports it
    return sorted(keys)


def encode_images(keys: list[str], cfg: dict) -> int:
    """Fill the disk feature cache (``feature_cache``) with the frozen image tower's features of ``keys``
    (:func:`job_images`); returns how many were computed. The features are those a training run computes
    (one image at a time), so a run that finds them reads the same bytes."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    tcfg = resolve_config(_train_settings(cfg, cfg["seed"]))
    seed_everything(int(tcfg["seed"]))  # a random-init tower (tests): the weights of that seed's runs
    # the features stay in this worker's memory too (up to feature_cache_mb): its runs will not read them again
    store = feature_stores(make_model(tcfg, build_tokenizer(tcfg)).eval(), tcfg)[0]
    if store is None or store.folder is None:
        return 0
    todo = [k for k in keys if not store.on_disk(k)]
    for k in todo:
        def load(_, path=k.rsplit("@", 1)[0]):
            return _to_tensor_image(letterbox_tensor(load_image_rgb(path), tcfg["input_size"])[0])
        store.batch([k], load=load)
    return len(todo)


def run_jobs(jobs: list[Job], cfg: dict, workers: int = 1, progress: bool = True) -> list[dict]:
    """Run ``jobs`` (in a spawn process pool when ``workers`` > 1); results in the order of ``jobs``.

    With several workers the queue is ordered longest job first (:func:`job_cost`), so the pool does not end
    with one long job running alone (each job's result does not depend on the order)."""
    from tqdm.auto import tqdm

    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j, cfg) for j in tqdm(jobs, desc="ris jobs", disable=not progress)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    cache: dict = {}
    order = sorted(range(len(jobs)), key=lambda i: -job_cost(jobs[i], cfg, cache))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        if cfg.get("freeze") in ("visual", "both"):  # frozen image tower: encode each image once, split over the
            cfg = _feature_cache(cfg)               # workers, before the runs (else the first two encode all)
            keys = job_images(jobs, cfg, cache)
            for f in [pool.submit(encode_images, keys[w::workers], cfg) for w in range(workers)]:
                f.result()
        futs = {i: pool.submit(run_job, asdict(jobs[i]), cfg) for i in order}
        results = {}
        for i in tqdm(order, desc="ris jobs", disable=not progress):
            results[i] = futs[i].result()
        return [results[i] for i in range(len(jobs))]


def collect(runs_dir) -> list[dict]:
    """Every evaluation JSON under ``runs_dir`` (``<work_dir>/ris``) as a flat record."""
    rows = []
    for p in sorted(Path(runs_dir).glob("*/*/seed*/eval/*.json")):
        d = json.loads(p.read_text())
        rows.append({k: d.get(k) for k in ("trainset", "style", "split", "seed", "train_style", "mIoU", "oIoU",
                                           "Pr@0.5", "Pr@0.7", "Pr@0.9", "n", "pick_acc", "pick_chance",
                                           *(f"pick_acc_{a}" for a in ATTRIBUTE_KINDS))}
                    | {"path": str(p)})
    return rows


def curves(jobs: list[Job]) -> list[dict]:
    """The pick-vs-step curves of finished jobs (``<out>/curve.json``, written when ``ris.val_every`` is set):
    one record per (job, evaluated step) with ``trainset``, ``style``, ``seed``, ``step``, ``pick_acc``, ``mIoU``."""
    rows = []
    for j in jobs:
        p = Path(j.out) / "curve.json"
        if p.is_file():
            rows += [{"trainset": j.trainset, "style": j.style or "any", "seed": j.seed, **c}
                     for c in json.loads(p.read_text())]
    return rows


def pretrain_card(cfg: dict) -> dict | None:
    """The card of the RIS model's pretrained CLIP (``<pretrained minus .pt>.json``), when it has one: data,
    seed, steps, time and the training-free pick accuracies of :func:`ris_utils.ris.pretrain.pick_accuracy`."""
    pre = cfg.get("pretrained")
    if not isinstance(pre, str) or not pre.endswith(".pt"):
        return None
    p = Path(pre)
    p = (p if p.is_absolute() else project_root() / p).with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else None
