"""Step 3 (notebook 03): distinctiveness-based text filtering with CLIP.

For every caption candidate ``c`` written for a target mask ``t`` of an image with masks ``k = 1..K``
(paper, step 3; CLIP RN50 with OpenAI weights, scores are CLIP logits = logit_scale x cosine)::

    noun_k(c)    = CLIP(masked crop of k,        "a photo of a {head noun of c}")
    caption_k(c) = CLIP(crop of k enlarged x1.2, c)
    product_k(c) = noun_k(c) * caption_k(c)
    DoC(c)       = product_t(c) / max_{k != t} product_k(c)

Candidates with ``DoC > 1`` survive (``DoC == 1``, a tie with another mask, does NOT). Images with a single
mask: ``DoC = noun_t(c)`` and the top ``C // 2`` of the mask's ``C`` candidates by it survive, ranked as the
authors rank them (``np.argsort(doc)[::-1][:C // 2]``, so ties follow numpy's argsort order;
``my_utils/pseudo_datasets.py`` l. 658-660 at de5d124). With ``C == 1`` that keeps none (the authors' code
then crashes on ``random.choice([])``; here the mask goes to the fallback below, which by default exports
its one candidate).

A mask none of whose candidates survives is handled by ``fallback`` (``filter.fallback``):

- ``"all"`` (default, the authors): every candidate of the mask becomes a survivor. The authors' loader
  draws uniformly over ALL of the mask's candidates at every fetch when none has DoC > 1
  (``np.random.choice(num_sent)``, ``my_utils/pseudo_datasets.py`` l. 655 and l. 469-470 at de5d124);
  exporting every candidate as a sentence of the ref gives the same distribution to a loader that draws
  one sentence per sample.
- ``"keep_random"``: one candidate drawn at random (seeded per image) -- the project's earlier rule.
- ``"drop"``: the mask gets no ref.

Non-positive scores (our choice; the ratio assumes positive scores, as CLIP logits of matching pairs are):
``nonpositive="clamp"`` (default) uses ``s+ = max(s, 0)`` in the products, i.e. a cosine <= 0 counts as
"no match at all". Then ``product_t == 0`` gives ``DoC = 0`` (not distinctive, also when every other
product is 0: 0/0 := 0), and ``product_t > 0`` with every ``product_{k!=t} == 0`` gives ``DoC = +inf``
(distinctive; written as ``Infinity`` by Python's json). When every score is positive this is exactly the
paper's formula. ``nonpositive="shift"`` instead adds ``logit_scale`` to every logit before the products
(``s + scale = scale * (1 + cos) >= 0``), a monotone positive transform that changes the ratio's values.
The single-mask rule ranks by the raw noun score (no transform needed).

Noun prompt (the authors, ``distinctive_caption_generation.py`` l. 259 / 287): ``"a photo of a " + noun``,
but ``"a photo of " + noun`` when the extracted noun phrase already starts with an article (``a / an /
the``): :meth:`ClipScorer.prompt_for` applies that rule to any template ending in ``"a {noun}"``.

Precision (``filter.precision``): ``"fp16"`` (the authors: OpenAI ``clip.load`` keeps fp16 weights on CUDA,
so their features, logits, products and DoC ratio are fp16) or ``"fp32"``. fp16 takes effect on CUDA only;
on CPU the scorer always runs in fp32 (a no-op, logged once).

Features are computed once per image: one CLIP image pass per view kind (``"masked"`` for all masks, then
``1.2`` for all masks) and one text pass over the distinct strings of the image (noun prompts and captions).

The step is run by :func:`run_filter` through the resumable engine (``ris_utils.engine``) and writes, in
``<out>/records.jsonl``, the captions body with, per candidate, ``"noun", "noun_scores": [per mask],
"caption_scores": [per mask], "doc", "keep"`` and, per mask, ``"survivors": [candidate indices]`` (after
the fallback), ``"fallback"`` (``None`` or the rule applied) and ``"dropped"`` (``None`` or the reason).
:func:`filter_jobs` runs several mode / split / seed jobs in ``filter.workers`` processes, each filtering one
engine shard of every job (same records as one process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FALLBACKS = ("all", "keep_random", "drop")
PRECISIONS = ("fp16", "fp32")
ARTICLES = ("a", "an", "the")
NONPOSITIVE = ("clamp", "shift")
DEFAULT_PROMPT = "a photo of a {noun}"


# --------------------------------------------------------------------------- the score


def degree_of_distinctiveness(noun_scores, caption_scores, target: int, nonpositive: str = "clamp",
                              logit_scale: float = 100.0, dtype: str = "float64") -> np.ndarray:
    """DoC of C candidates of mask ``target`` among K masks (paper, step 3).

    ``DoC(c) = product_t(c) / max_{k != t} product_k(c)`` with ``product_k = noun_k * caption_k``; for
    ``K == 1`` the single-mask rule ``DoC(c) = noun_t(c)``. Non-positive scores: see the module docstring
    (``nonpositive="clamp"``: ``max(s, 0)``, ``0 / x = 0``, ``0 / 0 = 0``, ``x / 0 = inf``;
    ``"shift"``: ``s + logit_scale``).

    Arguments:
      noun_scores, caption_scores: CxK arrays of CLIP logits (candidate x mask).
      target: index of the candidates' own mask (0..K-1).
      nonpositive: ``"clamp"`` or ``"shift"``.
      logit_scale: the shift of ``"shift"`` (CLIP's logit scale: 100 for OpenAI weights).
      dtype: arithmetic of the products and the ratio: ``"float64"`` (default) or ``"float16"`` (the
        authors' fp16 CLIP on CUDA: ``target_score / max_other_score`` of fp16 tensors,
        ``distinctive_caption_generation.py`` l. 298-310; IEEE products and quotients are correctly
        rounded in numpy and torch alike, so the values are the same).
    Returns:
      float64 array (C,) of DoC values.
    """
    if dtype not in ("float64", "float16"):
        raise ValueError(f"DoC dtype must be 'float64' or 'float16', got {dtype!r}")
    n = np.asarray(noun_scores, dtype=np.float64)
    c = np.asarray(caption_scores, dtype=np.float64)
    if n.ndim != 2 or n.shape != c.shape:
        raise ValueError(f"noun_scores and caption_scores must both be CxK, got {n.shape} and {c.shape}")
    C, K = n.shape
    if not 0 <= target < K:
        raise ValueError(f"target mask index {target} out of range for K={K} masks")
    if nonpositive not in NONPOSITIVE:
        raise ValueError(f"filter.nonpositive must be one of {NONPOSITIVE}, got {nonpositive!r}")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(c))):
        raise ValueError("CLIP scores must be finite (got NaN or inf): check the model's weights / inputs")
    if K == 1:
        return n[:, 0].copy()
    if nonpositive == "clamp":
        n, c = np.maximum(n, 0.0), np.maximum(c, 0.0)
    else:
        n, c = n + logit_scale, c + logit_scale
    ft = np.float16 if dtype == "float16" else np.float64
    with np.errstate(over="ignore"):
        prod = n.astype(ft) * c.astype(ft)  # (C, K)
    own = prod[:, target]
    others = np.delete(prod, target, axis=1).max(axis=1)
    doc = np.zeros(C, dtype=np.float64)
    pos = own > 0
    with np.errstate(divide="ignore", over="ignore"):
        safe = np.where(others[pos] > 0, others[pos], ft(1.0))
        doc[pos] = np.where(others[pos] > 0, (own[pos] / safe).astype(np.float64), np.inf)
    return doc


def select_survivors(doc, n_masks: int, noun_scores_t=None, caption_scores_t=None) -> np.ndarray:
    """Boolean ``keep`` (C,) of one mask's candidates.

    ``n_masks > 1``: ``DoC > 1`` (strict). ``n_masks == 1``: the authors' rule, the top ``C // 2`` by ``doc``
    (= the noun score) in the order of ``np.argsort(doc)[::-1]`` (``my_utils/pseudo_datasets.py``
    l. 658-659 at de5d124: ties follow numpy's argsort order); ``C == 1`` keeps none (the fallback then
    applies). ``noun_scores_t`` / ``caption_scores_t`` are accepted for the callers' convenience and not used.
    """
    doc = np.asarray(doc, dtype=np.float64)
    C = len(doc)
    if n_masks > 1:
        return doc > 1.0
    keep = np.zeros(C, dtype=bool)
    if C == 0:
        return keep
    keep[np.argsort(doc)[::-1][: C // 2]] = True
    return keep


def apply_fallback(keep, fallback: str, rng: np.random.Generator) -> tuple[list[int], str | None, str | None]:
    """``(survivors, fallback_used, dropped_reason)`` of one mask from its ``keep`` flags.

    No candidate: dropped (``"no_candidates"``). No survivor: ``"all"`` (the authors: their loader draws
    over all candidates, ``my_utils/pseudo_datasets.py`` l. 655) -> every index; ``"keep_random"`` -> one
    index drawn with ``rng``; ``"drop"`` -> dropped (``"no_survivor"``). ``rng`` is used by
    ``"keep_random"`` only.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"filter.fallback must be one of {FALLBACKS}, got {fallback!r}")
    keep = np.asarray(keep, dtype=bool)
    if keep.size == 0:
        return [], None, "no_candidates"
    surv = [int(i) for i in np.flatnonzero(keep)]
    if surv:
        return surv, None, None
    if fallback == "all":
        return list(range(int(keep.size))), "all", None
    if fallback == "keep_random":
        return [int(rng.integers(keep.size))], "keep_random", None
    return [], None, "no_survivor"


def step_dirs(work_dir, mode: str, split: str, seed: int, base_seed: int = 0) -> tuple[Path, Path]:
    """``(captions_dir, filter_dir)`` of one mode / split / caption seed under ``work_dir``.

    The profile's seed uses the standard folders ``captions/<mode>/<split>`` and ``filter/<mode>/<split>``;
    another seed ``s`` uses ``<split>_seed<s>`` in their place (notebook 02's convention for extra seeds).
    """
    w = Path(work_dir)
    name = split if int(seed) == int(base_seed) else f"{split}_seed{int(seed)}"
    return w / "captions" / mode / name, w / "filter" / mode / name


def ensure_captions(captions_cfg: dict, cdir, mode: str, split: str, seed: int, captioner=None,
                    progress: bool = True) -> Path:
    """Run the captions step into ``cdir`` (with ``seed``) unless its ``records.jsonl`` exists."""
    from ris_utils import engine

    cdir = Path(cdir)
    if not (cdir / engine.RECORDS).is_file():
        from ris_utils.captioning.step import run_captions

        logger.info("filter: no captions under %s, running the captions step (seed %d)", cdir, seed)
        run_captions({**captions_cfg, "seed": int(seed)}, split, mode, captioner, out_dir=cdir, progress=progress)
    return cdir


def filter_split(cfg: dict, captions_cfg: dict, mode: str, split: str, seed: int | None = None,
                 scorer: ClipScorer | None = None, captioner=None, progress: bool = True) -> Path:
    """Filter one mode / split / caption seed (captioning it first when its records are missing).

    Returns the filter folder (see :func:`step_dirs`). ``captions_cfg`` is
    ``profiles.step_config(profile, "captions")``; for a seed other than the profile's the captions step
    is run with that seed (the captioner is loaded once, or passed in).
    """
    base = int(captions_cfg.get("seed", 0))
    seed = base if seed is None else int(seed)
    cdir, fdir = step_dirs(cfg["work_dir"], mode, split, seed, base)
    ensure_captions(captions_cfg, cdir, mode, split, seed, captioner, progress)
    run_filter(cdir, fdir, cfg, scorer=scorer, progress=progress)
    return fdir


def _check_filter_jobs(jobs) -> list[dict]:
    out = []
    for k, job in enumerate(jobs):
        if not isinstance(job, dict) or "mode" not in job or "split" not in job:
            raise ValueError(f"filter job {k}: a dict with 'mode' and 'split' expected, got {job!r}")
        unknown = set(job) - {"mode", "split", "seed"}
        if unknown:
            raise ValueError(f"filter job {k}: unknown keys {sorted(unknown)}")
        out.append(dict(job))
    return out


def _filter_shard(cfg: dict, dirs: list[tuple[str, str]], progress: bool, rank: int, world_size: int) -> list[dict]:
    """One worker of :func:`filter_jobs`: shard ``rank`` of every (captions, filter) folder pair, in order,
    with one scorer. Runs in a spawned process."""
    import torch

    torch.set_num_threads(int(cfg.get("threads") or max(1, (os.cpu_count() or 1) // world_size)))
    scorer = make_scorer(cfg)
    return [run_filter(cdir, fdir, cfg, scorer=scorer, progress=progress, rank=rank, world_size=world_size,
                       merge_output=False) for cdir, fdir in dirs]


def filter_jobs(cfg: dict, captions_cfg: dict, jobs: list[dict], workers: int | None = 1,
                scorer: ClipScorer | None = None, captioner=None, progress: bool = True) -> list[Path]:
    """Filter several mode / split / caption-seed jobs (:func:`filter_split`) in ``workers`` processes.

    Arguments:
      cfg: ``profiles.step_config(profile, "filter")``. captions_cfg: as for :func:`filter_split`.
      jobs: ``[{"mode", "split", "seed" (optional: default the captions seed)}]``.
      workers: ``filter.workers``. 1 (or None/0): :func:`filter_split` for each job in turn, in this process,
        with ``scorer`` (default: ``make_scorer(cfg)``, built once) and ``captioner`` (loaded once when some
        captions are missing). W > 1: the missing captions are written first, here, by
        :func:`ris_utils.captioning.step.run_caption_jobs` (with ``captions.workers`` processes); then W
        spawned processes, process r filtering shard r (engine ``rank=r, world_size=W``) of every job in
        order with its own ``make_scorer(cfg)`` (``scorer`` is not used: pass ``workers=1`` for a scorer the
        profile does not describe) and ``torch.set_num_threads(filter.threads)`` (unset: cores / W); the
        shards of each job are then merged here. The records are byte-identical whatever W (the fallback
        draw is seeded per image) and a rerun resumes with any W. A worker's exception is raised here (with
        a note naming the worker).
    Returns:
      the filter folder of each job (:func:`step_dirs`), in the order of ``jobs``.
    """
    from ris_utils import engine

    jobs = _check_filter_jobs(jobs)
    n = engine.check_workers(workers, "filter.workers")
    if scorer is None and (cfg.get("clip") or {}).get("train_if_missing"):
        check_clip_checkpoint(cfg)  # a typo'd checkpoint path fails here, before captions or training
    base = int(captions_cfg.get("seed", 0))
    seeds = [base if job.get("seed") is None else int(job["seed"]) for job in jobs]
    dirs = [step_dirs(cfg["work_dir"], job["mode"], job["split"], s, base) for job, s in zip(jobs, seeds)]
    fdirs = [f.resolve() for _, f in dirs]
    if len(set(fdirs)) != len(fdirs):
        raise ValueError("filter jobs: two jobs name the same mode / split / seed (the same filter folder)")
    if not jobs:
        return []
    missing = [k for k, (cdir, _) in enumerate(dirs) if not (cdir / engine.RECORDS).is_file()]
    if n <= 1:
        scorer = scorer or make_scorer(cfg)
        if missing and captioner is None:
            from ris_utils.train_captioner import load_captioner

            captioner = load_captioner(captions_cfg)
        return [filter_split(cfg, captions_cfg, job["mode"], job["split"], s, scorer, captioner, progress)
                for job, s in zip(jobs, seeds)]
    if missing:  # every captions folder complete BEFORE the filter workers read it (sharded, merged)
        from ris_utils.captioning.step import run_caption_jobs

        logger.info("filter: no captions for %d job(s), running the captions step first", len(missing))
        cjobs = [{"split": jobs[k]["split"], "mode": jobs[k]["mode"], "seed": seeds[k], "out_dir": str(dirs[k][0])}
                 for k in missing]
        run_caption_jobs(captions_cfg, cjobs, workers=captions_cfg.get("workers", 1), progress=progress,
                         captioner=captioner)
    ckpt = (cfg.get("clip") or {}).get("checkpoint")
    if ckpt and (cfg.get("clip") or {}).get("train_if_missing"):
        from ris_utils.profiles import project_root

        if not (Path(ckpt) if Path(ckpt).is_absolute() else project_root() / ckpt).is_file():
            make_scorer(cfg)  # trains the missing CLIP once here, not once per worker
    pairs = [(str(c), str(f)) for c, f in dirs]
    engine.run_shard_workers(_filter_shard, (cfg, pairs, progress), n, "filter")
    for _, fdir in dirs:
        engine.merge(fdir, step="filter")
    return [f for _, f in dirs]


# --------------------------------------------------------------------------- CLIP


class ClipScorer:
    """CLIP logits of mask views against texts, features computed once per image.

    Arguments:
      model: an open_clip CLIP (``encode_image``, ``encode_text``, ``logit_scale``), in eval mode.
      tokenizer: ``tok(texts) -> LongTensor (B, L)`` (open_clip's or :class:`~ris_utils.captioning.tokenizer.WordTokenizer`).
      size, mean, std: the model's preprocessing (``ris_utils.crops.model_view_settings``).
      fill: fill value of the masked crop (grey value, RGB triple or ``"mean"``).
      prompt: the noun prompt template (``"a photo of a {noun}"``).
      logit_scale: ``None`` = the model's ``exp(logit_scale)`` (100 for OpenAI weights), else a number.
      batch_size: crops / texts per forward pass (a pass is split only when larger).
    """

    def __init__(self, model, tokenizer, size: int, mean, std, fill=0, prompt: str = DEFAULT_PROMPT,
                 logit_scale: float | None = None, batch_size: int = 256, device=None, precision: str = "fp32",
                 box: str = "exclusive"):
        import torch

        if "{noun}" not in prompt:
            raise ValueError(f"filter.noun_prompt must contain '{{noun}}', got {prompt!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"filter.precision must be one of {PRECISIONS}, got {precision!r}")
        from ris_utils.crops import BOX_MODES

        if box not in BOX_MODES:
            raise ValueError(f"filter.box must be one of {BOX_MODES}, got {box!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.size, self.mean, self.std, self.fill = int(size), tuple(mean), tuple(std), fill
        self.prompt = prompt
        self.batch_size = int(batch_size)
        self.device = device or next(model.parameters()).device
        self.box = box
        self.requested_precision = precision
        # fp16 only on CUDA (the authors' clip.load keeps fp16 weights there); on CPU: fp32, a no-op
        self.precision = "fp16" if precision == "fp16" and torch.device(self.device).type == "cuda" else "fp32"
        if precision == "fp16" and self.precision != "fp16":
            logger.info("filter.precision fp16 asked for on %s: scoring in fp32 (fp16 applies on CUDA only)",
                        self.device)
        if logit_scale is None:
            with torch.no_grad():
                logit_scale = float(model.logit_scale.float().exp().item())
        if self.precision == "fp16":  # as OpenAI's clip.load on CUDA: conv / linear / attention weights in fp16
            from open_clip.model import convert_weights_to_lp

            convert_weights_to_lp(self.model, torch.float16)
        self.logit_scale = float(logit_scale)

    @property
    def doc_dtype(self) -> str:
        """Arithmetic of the DoC ratio: ``"float16"`` when the scores are fp16 (the authors on CUDA)."""
        return "float16" if self.precision == "fp16" else "float64"

    def prompt_for(self, noun: str) -> str:
        """The noun prompt; the authors' rule: a template ending in ``"a {noun}"`` drops its article when the
        noun already starts with one (``"a photo of " + noun``; ``distinctive_caption_generation.py``
        l. 259 / 287)."""
        first = str(noun).split()[:1]
        if first and first[0] in ARTICLES and self.prompt.endswith("a {noun}"):  # case-sensitive, as theirs
            return self.prompt[: -len("a {noun}")] + str(noun)
        return self.prompt.format(noun=noun)

    def _encode(self, fn, x):
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                xb = x[i: i + self.batch_size].to(self.device)
                if self.precision == "fp16" and xb.is_floating_point():
                    xb = xb.half()
                f = fn(xb)
                if self.precision == "fp16":  # OpenAI CLIP's forward: normalised in fp16
                    outs.append((f / f.norm(dim=-1, keepdim=True)).half().cpu())
                else:
                    outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 1)

    def image_features(self, image: np.ndarray, masks) -> dict:
        """``{"masked": (K, D), 1.2: (K, D)}`` L2-normalised features; one pass per view kind.

        Arguments: image HxWx3 uint8 RGB; masks KxHxW bool.
        """
        from ris_utils.crops import make_views

        feats = {}
        for view in ("masked", 1.2):
            x = make_views(image, masks, views=(view,), size=self.size, fill=self.fill, mean=self.mean,
                           std=self.std, box=self.box)[:, 0]  # (K, 3, S, S)
            feats[view] = self._encode(self.model.encode_image, x)
        return feats

    def text_features(self, texts: Sequence[str]) -> dict:
        """``{text: (D,) feature}`` for the DISTINCT strings of ``texts`` (one pass)."""
        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return {}
        tokens = self.tokenizer(distinct)
        f = self._encode(self.model.encode_text, tokens)
        return {t: f[i] for i, t in enumerate(distinct)}

    def score_image(self, image: np.ndarray, masks, candidates: list[list[tuple[str, str]]]):
        """CLIP logits for every candidate of every mask against every mask.

        Arguments:
          image: HxWx3 uint8 RGB. masks: KxHxW bool.
          candidates: per mask, a list of ``(caption, noun)``.
        Returns:
          list over masks of ``(noun_scores, caption_scores)``, each a C_t x K float32 array.
        """
        import torch

        K = len(masks)
        img = self.image_features(image, masks)
        texts = [s for cands in candidates for cap, noun in cands for s in (cap, self.prompt_for(noun))]
        txt = self.text_features(texts)
        out = []
        for cands in candidates:
            if not cands:
                out.append((np.zeros((0, K), np.float32), np.zeros((0, K), np.float32)))
                continue
            P = torch.stack([txt[self.prompt_for(noun)] for _, noun in cands])  # (C, D)
            T = torch.stack([txt[cap] for cap, _ in cands])  # (C, D)
            if self.precision == "fp16":  # the authors (OpenAI CLIP's forward, on the GPU): (logit_scale (fp32
                # 0-dim) * fp16 image features) @ fp16 text features.T -> fp16 logits_per_image (K, C)
                scale = torch.tensor(self.logit_scale, dtype=torch.float32, device=self.device)
                dev = self.device
                noun_s = ((scale * img["masked"].to(dev)) @ P.to(dev).T).T.float().cpu()  # (C, K)
                cap_s = ((scale * img[1.2].to(dev)) @ T.to(dev).T).T.float().cpu()
            else:
                noun_s = self.logit_scale * (P @ img["masked"].T)  # (C, K)
                cap_s = self.logit_scale * (T @ img[1.2].T)  # (C, K)
            out.append((noun_s.numpy().astype(np.float32), cap_s.numpy().astype(np.float32)))
        return out


def build_clip(cfg: dict, device=None):
    """``(model, tokenizer, view_settings)`` of the profile's ``filter.clip`` section.

    ``clip: {model: RN50, pretrained: openai, tokenizer: open_clip}`` (the paper) or
    ``{model: clip_shapes, checkpoint: PATH, tokenizer: shapes}`` (our configs in ``model_configs/``,
    weights from ``checkpoint``; ``train_if_missing: true`` trains the shapes CLIP on first use), or
    ``{model: rn50_tiny, pretrained: null}`` (random init, tests).
    """
    import open_clip
    import torch

    from ris_utils.models import register_open_clip_configs, resolve_device

    ccfg = dict(cfg.get("clip") or {})
    name = ccfg.get("model")
    if not name:
        raise ValueError("filter.clip.model is not set: name an open_clip model (RN50) or one of our configs")
    register_open_clip_configs()
    device = resolve_device(device or cfg.get("device", "auto"))
    ckpt = ccfg.get("checkpoint")
    if ckpt:
        ckpt = Path(ckpt)
        if not ckpt.is_absolute():
            from ris_utils.profiles import project_root

            ckpt = project_root() / ckpt
        if not ckpt.is_file():
            check_clip_checkpoint(cfg)  # a path the user named must exist
            from ris_utils.train_clip import train_clip

            logger.warning("filter: %s (the profile's own CLIP checkpoint) is missing: training the shapes CLIP "
                           "now (clip.train_if_missing; a few minutes on CPU)", ckpt)
            train_clip(cfg, out=ckpt)
        from ris_utils.models import quiet_random_init

        with quiet_random_init():  # the checkpoint is loaded just below
            model = open_clip.create_model(name, pretrained=None, device="cpu")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        sd = state.get("state_dict", state)
        sd = {k: v.float() for k, v in sd.items()}
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise RuntimeError(f"{ckpt} does not match the open_clip config {name!r}: {e}") from e
    else:
        try:
            model = open_clip.create_model(name, pretrained=ccfg.get("pretrained"), device="cpu")
        except Exception as e:  # noqa: BLE001 - name the setting
            raise RuntimeError(f"filter.clip: could not build open_clip model {name!r} with pretrained="
                               f"{ccfg.get('pretrained')!r} ({type(e).__name__}: {e}); the paper's weights need "
                               f"`python -m ris_utils download` (internet)") from e
    model = model.to(device).eval()
    tok_spec = ccfg.get("tokenizer", "open_clip")
    from ris_utils.captioning.tokenizer import build_tokenizer

    ctx = getattr(model, "context_length", None)
    tokenizer = build_tokenizer(tok_spec, model_name=name, context_length=ctx)
    from ris_utils.crops import model_view_settings

    return model, tokenizer, model_view_settings(model)


def check_clip_checkpoint(cfg: dict) -> None:
    """Fail before any work when ``filter.clip.checkpoint`` names a file that does not exist, unless it is the
    profile's own default asset and ``clip.train_if_missing`` is set (then it is trained on first use)."""
    from ris_utils.profiles import is_profile_default, project_root

    ccfg = dict(cfg.get("clip") or {})
    ckpt = ccfg.get("checkpoint")
    if not ckpt:
        return
    path = Path(ckpt) if Path(ckpt).is_absolute() else project_root() / ckpt
    if path.is_file():
        return
    if not ccfg.get("train_if_missing"):
        raise FileNotFoundError(f"filter.clip.checkpoint {path} not found: check the path, run `python -m "
                                f"ris_utils.train_clip --out {path}`, or set clip.train_if_missing")
    if not is_profile_default(cfg, "filter", "clip.checkpoint", ckpt):
        raise FileNotFoundError(f"filter.clip.checkpoint {path} does not exist: check the path (a missing "
                                f"checkpoint is trained only when it is the profile's own default; to train one "
                                f"there run `python -m ris_utils.train_clip --out {path}`)")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """``torch.set_num_threads(n)`` inside the block (restored after); ``None`` leaves torch's default.

    On a shared 2-core CPU one thread scores ~8x faster than two (measured: 0.08 vs 0.68 s per shapes image
    under load)."""
    import torch

    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def make_scorer(cfg: dict, device=None) -> ClipScorer:
    """:class:`ClipScorer` of the profile's ``filter`` settings (seeded first: random-init models are
    reproducible)."""
    from ris_utils.models import seed_everything

    seed_everything(int(cfg.get("seed", 0)))
    model, tok, vs = build_clip(cfg, device)
    return ClipScorer(model, tok, vs["size"], vs["mean"], vs["std"], fill=cfg.get("fill", 0),
                      prompt=cfg.get("noun_prompt", DEFAULT_PROMPT), logit_scale=cfg.get("logit_scale"),
                      batch_size=int(cfg.get("batch_size", 256)), precision=cfg.get("precision", "fp32"),
                      box=cfg.get("box", "exclusive"))


# --------------------------------------------------------------------------- per image


def _extractor(cfg: dict):
    from ris_utils.text import HeadNounExtractor

    hn = dict(cfg.get("head_noun") or {})
    return HeadNounExtractor(hn.get("backend", "auto"), hn.get("spacy_model", "en_core_web_lg"), hn.get("nouns"),
                             rule=hn.get("rule", "authors"))


def filter_record(record: dict, image: np.ndarray, scorer: ClipScorer, extractor, fallback: str = "all",
                  nonpositive: str = "clamp", seed: int = 0) -> dict:
    """The filter body of one image from its captions record (see the module docstring).

    Arguments:
      record: a captions record (``height``, ``width``, ``masks`` with ``segmentation`` and ``candidates``).
      image: HxWx3 uint8 RGB.
      scorer: a :class:`ClipScorer`. extractor: ``text -> noun``.
      fallback: ``"all"`` (the authors), ``"keep_random"`` or ``"drop"`` (:func:`apply_fallback`).
      nonpositive: see :func:`degree_of_distinctiveness`.
      seed: seeds the ``keep_random`` draw.
    """
    from ris_utils.data.refer import decode_segmentation

    if fallback not in FALLBACKS:
        raise ValueError(f"filter.fallback must be one of {FALLBACKS}, got {fallback!r}")
    h, w = int(record["height"]), int(record["width"])
    if image.shape[:2] != (h, w):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but the record says {w}x{h}")
    masks_in = record.get("masks") or []
    body = {k: v for k, v in record.items() if k not in ("image_id", "file_name", "status", "error", "masks")}
    if not masks_in:
        return {**body, "masks": [], "n_masks": 0}
    masks = np.stack([decode_segmentation(m["segmentation"], h, w).astype(bool) for m in masks_in])
    cands = [[(c["text"], extractor(c["text"])) for c in m.get("candidates") or []] for m in masks_in]
    scores = scorer.score_image(image, masks, cands)
    rng = np.random.default_rng(seed)
    K = len(masks_in)
    out_masks = []
    for t, (m, cl, (ns, cs)) in enumerate(zip(masks_in, cands, scores)):
        doc = (degree_of_distinctiveness(ns, cs, t, nonpositive, scorer.logit_scale,
                                         getattr(scorer, "doc_dtype", "float64")) if cl else np.zeros(0))
        keep = select_survivors(doc, K, ns[:, t] if cl else None, cs[:, t] if cl else None)
        surv, fb, dropped = apply_fallback(keep, fallback, rng)
        new_c = []
        for i, (c, (_, noun)) in enumerate(zip(m.get("candidates") or [], cl)):
            new_c.append({**c, "noun": noun, "noun_scores": [float(x) for x in ns[i]],
                          "caption_scores": [float(x) for x in cs[i]], "doc": float(doc[i]), "keep": bool(keep[i])})
        out_masks.append({**m, "candidates": new_c, "survivors": surv, "fallback": fb, "dropped": dropped})
    return {**body, "masks": out_masks, "n_masks": K}


def _image_path(record: dict, images_dir: Path | None) -> Path:
    p = record.get("path")
    if p and Path(p).is_file():
        return Path(p)
    if images_dir is None:
        raise FileNotFoundError(f"image {record.get('file_name')!r}: no images directory (set filter.images)")
    return images_dir / record["file_name"]


def images_dir_of(cfg: dict) -> Path | None:
    """``cfg["images"]``, else the data root's image folder (:func:`ris_utils.data.refer.image_dir`:
    ``images/mscoco/images/train2014``, ``images/train2014`` or ``images``, the first that exists), else None."""
    if cfg.get("images"):
        return Path(cfg["images"])
    if cfg.get("data_root"):
        from ris_utils.data.refer import image_dir

        return image_dir(cfg["data_root"])
    return None


def run_filter(candidates_dir, out_dir, cfg: dict, scorer: ClipScorer | None = None, progress: bool = True, *,
               rank: int | None = None, world_size: int | None = None, merge_output: bool = True) -> dict:
    """Filter every image of ``candidates_dir/records.jsonl`` into ``out_dir`` (resumable engine run).

    ``cfg`` keys: ``clip`` (see :func:`build_clip`), ``fallback``, ``nonpositive``, ``noun_prompt``, ``fill``,
    ``logit_scale``, ``head_noun``, ``precision`` (fp16 | fp32), ``box`` (exclusive | authors: the crop box,
    :data:`ris_utils.crops.BOX_MODES`), ``images`` (image folder; default :func:`images_dir_of`), ``seed``.
    Returns the engine's summary. Captions records with status ``error`` become error records.
    ``rank``, ``world_size``, ``merge_output`` are passed to :func:`ris_utils.engine.run` (one shard of the
    images, merged later with ``engine.merge``; see :func:`filter_jobs`). Default: one process, merged.
    """
    from ris_utils import engine
    from ris_utils.images import load_image_rgb

    candidates_dir, out_dir = Path(candidates_dir), Path(out_dir)
    if scorer is None:
        check_clip_checkpoint(cfg)
    records = list(engine.read_records(candidates_dir))
    fallback = cfg.get("fallback", "all")
    nonpositive = cfg.get("nonpositive", "clamp")
    if fallback not in FALLBACKS:
        raise ValueError(f"filter.fallback must be one of {FALLBACKS}, got {fallback!r}")
    if nonpositive not in NONPOSITIVE:
        raise ValueError(f"filter.nonpositive must be one of {NONPOSITIVE}, got {nonpositive!r}")
    scorer = scorer or make_scorer(cfg)
    extractor = _extractor(cfg)
    images_dir = images_dir_of(cfg)
    items = [{"image_id": r["image_id"], "file_name": r.get("file_name"), "path": str(_image_path(r, images_dir)),
              "record": r} for r in records]

    def fn(item):
        rec = item["record"]
        if rec.get("status", "ok") != "ok":
            raise ValueError(f"captions step failed for this image: {rec.get('error')}")
        image = load_image_rgb(item["path"])
        return filter_record(rec, image, scorer, extractor, fallback, nonpositive, item["seed"])

    settings = {k: cfg.get(k) for k in ("clip", "fallback", "nonpositive", "noun_prompt", "fill", "logit_scale",
                                        "head_noun", "precision", "box")}
    settings["candidates"] = str(candidates_dir)
    with torch_threads(cfg.get("threads")):
        return engine.run("filter", items, fn, out_dir, seed=int(cfg.get("seed", 0)), config=settings,
                          progress=progress, rank=rank, world_size=world_size, merge_output=merge_output)


# --------------------------------------------------------------------------- analysis (notebook 03)


def sampling_kind(setting) -> str:
    """``"beam"``, ``"top_k"`` or ``"top_p"`` of a candidate's ``setting`` (``"top_k=5"`` -> ``"top_k"``)."""
    s = str(setting)
    return s.split("=", 1)[0] if "=" in s else s


def _subset(records: list[dict], which: str) -> list[dict]:
    out = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        masks = []
        for m in r.get("masks") or []:
            cands = m.get("candidates") or []
            if which == "keep":
                cands = [c for c in cands if c.get("keep")]
            elif which == "survivors":
                cands = [cands[i] for i in m.get("survivors") or []]
            masks.append({**m, "candidates": cands})
        out.append({**r, "masks": masks})
    return out


def distinct_rates(records: list[dict], scenes: dict, min_iou: float = 0.5) -> dict:
    """Shapes-world distinct rates of filter records, before and after the filter.

    Uses the captions step's :func:`ris_utils.captioning.step.distinct_rate` (GT object by IoU >= 0.5, the
    symbolic referee). Returns ``{"before": rate over all candidates, "after": rate over candidates with
    keep (DoC > 1 / single-mask rule), "exported": rate over the survivors incl. fallbacks,
    "masks_with_survivor": share of masks with >= 1 kept candidate, "n_before", "n_after", "n_masks"}``.
    """
    from ris_utils.captioning.step import distinct_rate

    recs = [r for r in records if r.get("status", "ok") == "ok"]
    before = distinct_rate(_subset(recs, "all"), scenes, min_iou)
    after = distinct_rate(_subset(recs, "keep"), scenes, min_iou)
    exported = distinct_rate(_subset(recs, "survivors"), scenes, min_iou)
    masks = [m for r in recs for m in r.get("masks") or [] if m.get("candidates")]
    with_surv = sum(any(c.get("keep") for c in m["candidates"]) for m in masks)
    return {"before": before["rate"], "after": after["rate"], "exported": exported["rate"],
            "masks_with_survivor": with_surv / len(masks) if masks else float("nan"),
            "n_before": before["n_candidates"], "n_after": after["n_candidates"], "n_masks": len(masks)}


def candidate_frame(records: list[dict]):
    """One row per candidate of filter records (pandas DataFrame): ``image_id, mask, mask_index, text, view,
    setting, sampling, mode, noun, noun_score, caption_score, doc, keep, survivor, n_masks``."""
    import pandas as pd

    rows = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        for t, m in enumerate(r.get("masks") or []):
            surv = set(m.get("survivors") or [])
            for i, c in enumerate(m.get("candidates") or []):
                rows.append({"image_id": r["image_id"], "mask": t, "mask_index": m.get("mask_index"),
                             "text": c["text"], "view": c.get("view"), "setting": c.get("setting"),
                             "sampling": sampling_kind(c.get("setting")), "mode": c.get("mode"),
                             "noun": c.get("noun"), "noun_score": c["noun_scores"][t],
                             "caption_score": c["caption_scores"][t], "doc": c["doc"], "keep": c["keep"],
                             "survivor": i in surv, "n_masks": r.get("n_masks", len(r["masks"]))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- CLI


def cli_filter(argv: list[str] | None = None) -> int:
    """``python -m ris_utils filter --candidates DIR --out DIR --profile NAME [--param k=v ...]``."""
    from ris_utils.profiles import parse_params, step_config

    ap = argparse.ArgumentParser(prog="python -m ris_utils filter", description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", required=True, help="captions step output folder (holds records.jsonl)")
    ap.add_argument("--out", required=True, help="output folder (records.jsonl, summary.json)")
    ap.add_argument("--profile", default="shapes", help="profile name or YAML path (default: shapes)")
    ap.add_argument("--images", default=None, help="image folder (default: <data_root>/images/train2014)")
    ap.add_argument("--param", action="append", default=[], help="override a filter setting, e.g. fallback=drop")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any image became an error record")
    args = ap.parse_args(argv)
    if not (Path(args.candidates) / "records.jsonl").is_file():
        ap.error(f"--candidates {args.candidates}: no records.jsonl there (run the captions step first)")
    cfg = step_config(args.profile, "filter", images=args.images, **parse_params(args.param))
    summary = run_filter(args.candidates, args.out, cfg)
    print(f"filter: {summary.get('ok')} ok, {summary.get('failed')} failed -> {os.path.join(args.out, 'records.jsonl')}")
    from ris_utils import engine

    if engine.strict_exit(args.strict, [summary]):
        return 1
    return 0 if summary.get("ok", 0) or not summary.get("n_items") else 1


cli = cli_filter

__all__ = ["degree_of_distinctiveness", "select_survivors", "apply_fallback", "ClipScorer", "build_clip",
           "make_scorer", "filter_record", "run_filter", "filter_split", "filter_jobs", "ensure_captions", "step_dirs",
           "distinct_rates", "candidate_frame", "sampling_kind", "cli_filter"]
