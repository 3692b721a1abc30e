"""Train the CRIS-style RIS model on any REFER-format dataset (ground truth, pseudo supervision, a mix).

    python -m ris_utils train --train REFER_DIR [--val REFER_DIR] --out DIR --profile shapes [--param k=v]
    python -m torch.distributed.run --nproc_per_node 2 -m ris_utils train ...      # DDP (gloo on CPU)

Settings come from the profile's ``ris`` section (``--param`` overrides, e.g. ``--param epochs=3``). The
loop (one sitting, nanoGPT style): AdamW over two groups (CLIP backbone at ``lr * backbone_lr_mult``, CRIS:
0.1; the new head at ``lr``), a per-step schedule (linear warmup, then cosine or CRIS's multi-step decay),
BCE-with-logits on the letterboxed mask, gradient clipping, one sentence per ref drawn per epoch.

Every epoch ends with an atomic checkpoint ``<out>/last.pt`` holding the model, optimizer, epoch, step,
history, RNG states (python / numpy / torch / cuda) and the resolved config + tokenizer; a rerun with the
same ``--out`` resumes from it and continues exactly as an uninterrupted run would (no randomness is drawn
between the save and the next epoch). Logs: ``<out>/log.csv`` (one row per step), ``<out>/history.json``
(one entry per epoch, val metrics included), ``<out>/config.json``.

DDP: under ``torchrun`` each rank gets ``batch_size / world_size`` refs of the same global batch
(``DistributedSampler``, same seed) and BatchNorm statistics are reduced over all ranks (``SyncBatchNorm``
on GPU, :class:`DistBatchNorm` on CPU/gloo), so a 2-process run matches one process up to float noise
(with dropout 0: dropout masks come from per-rank generators).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ris_utils.fileio import atomic_write
from ris_utils.ris.dataset import RisEvalSet, RisTrainSet, open_refer
from ris_utils.ris.diagnostics import pick_by_attribute
from ris_utils.ris.features import feature_stores
from ris_utils.ris.model import build_model, ris_loss

logger = logging.getLogger(__name__)

#: Defaults of the ``ris`` section (a profile overrides any of them).
DEFAULTS = dict(
    model="cris_tiny",        # MODEL_REGISTRY name
    model_args={},            # head overrides: fpn_out, num_layers, num_heads, dim_ffn, dropout
    pretrained="default",     # "default" = the builder's (openai for cris_rn50/101, none for cris_tiny)
    tokenizer="shapes",       # "shapes" (word-level) | "open_clip"
    tokenizer_model="RN50",   # open_clip model whose tokenizer is used when tokenizer = open_clip
    input_size=416,           # letterbox side S (CRIS: 416)
    word_len=17,              # tokens per sentence (CRIS: 17)
    threshold=0.35,           # sigmoid threshold at test time (CRIS)
    epochs=50, train_steps=None,  # train_steps (if set) replaces epochs: that many optimizer steps
    batch_size=64, lr=1e-4, backbone_lr_mult=0.1, weight_decay=0.0, grad_clip=0.0,
    schedule={"name": "multistep", "milestones": [35], "gamma": 0.1, "warmup_steps": 0},
    val_split="val", val_max_refs=None, eval_batch_size=64, num_workers=0, cache=True,
    val_every=None,           # also evaluate the val refs every this many steps (the pick-vs-step curve)
    convention="lavt", seed=0, device="auto",
    adam_eps=1e-8,            # AdamW epsilon
    threads=None,             # torch CPU threads (None = torch's default); 1 avoids oversubscription
    dice_weight=0.0,          # (our choice, shapes) + dice loss; CRIS: 0 (BCE only)
    loss_target="nearest",    # nearest (CRIS) | area: soft targets = mask coverage of each logit cell
    freeze="none",            # none (CRIS) | visual | text | both (ETRIS-style frozen towers, cached features)
    feature_cache=None,       # folder for the frozen image tower's features (shared by runs); None = memory only
    feature_cache_mb=None,    # memory bound of the in-memory feature copy (None = unbounded)
    prior_lr_mult=20.0,       # (ours) lr multiplier of the CLIP prior's scale and offset (model_args.clip_prior)
    location_lr_mult=20.0,    # (ours) lr multiplier of the relative-location head (model_args.location)
)


# --------------------------------------------------------------------------- helpers


def resolve_config(cfg: dict) -> dict:
    """``DEFAULTS`` + ``cfg`` (``None`` values ignored), with CRIS's config names accepted as aliases
    (as ``papermill_runs/paper.yaml`` writes them): ``clip_pretrained`` -> ``pretrained``; ``milestones`` +
    ``lr_decay`` -> a multistep ``schedule``; ``max_norm`` -> ``grad_clip``; ``num_layers``, ``num_head``,
    ``dim_ffn``, ``dropout`` -> ``model_args``."""
    given = {k: v for k, v in cfg.items() if v is not None}
    out = {**DEFAULTS, **given}
    if "clip_pretrained" in given:
        out["pretrained"] = given["clip_pretrained"]
    if "milestones" in given and "schedule" not in given:
        out["schedule"] = {"name": "multistep", "milestones": list(given["milestones"]),
                           "gamma": float(given.get("lr_decay", 0.1)), "warmup_steps": 0}
    if "max_norm" in given and "grad_clip" not in given:
        out["grad_clip"] = float(given["max_norm"])
    margs = dict(out.get("model_args") or {})
    for alias, key in (("num_layers", "num_layers"), ("num_head", "num_heads"), ("dim_ffn", "dim_ffn"),
                       ("dropout", "dropout")):
        if alias in given:
            margs.setdefault(key, given[alias])
    out["model_args"] = margs
    check_settings(out)
    return out


#: ``ris`` settings checked before any work: (key, kind, smallest value, None allowed).
_NUMERIC = (("epochs", int, 1, False), ("batch_size", int, 1, False), ("input_size", int, 8, False),
            ("word_len", int, 2, False), ("eval_batch_size", int, 1, False), ("num_workers", int, 0, False),
            ("seed", int, None, False), ("threads", int, 1, True), ("val_max_refs", int, 1, True),
            ("lr", float, 0.0, False), ("backbone_lr_mult", float, 0.0, False), ("weight_decay", float, 0.0, False),
            ("grad_clip", float, 0.0, False), ("threshold", float, None, False), ("adam_eps", float, 0.0, False),
            ("dice_weight", float, 0.0, False), ("train_steps", int, 1, True), ("val_every", int, 1, True),
            ("feature_cache_mb", float, 0.0, True), ("prior_lr_mult", float, 0.0, False),
            ("location_lr_mult", float, 0.0, False))


def check_settings(cfg: dict) -> None:
    """Refuse a non-numeric / out-of-range ``ris`` setting before any work, naming it (``ris.epochs=abc``)."""
    for key, kind, lo, nullable in _NUMERIC:
        v = cfg.get(key)
        if v is None and nullable:
            continue
        ok = not isinstance(v, bool) and isinstance(v, int | float) and (kind is float or v == int(v))
        if not ok or (lo is not None and v < lo):
            need = "an integer" if kind is int else "a number"
            need += f" >= {lo}" if lo is not None else ""
            raise ValueError(f"ris.{key} must be {need}{' or null' if nullable else ''}, got {v!r}; fix it in the "
                             f"profile's ris section or --param {key}=...")


class DistBatchNorm(nn.Module):
    """BatchNorm whose batch statistics are summed over all DDP ranks with a differentiable all-reduce
    (``SyncBatchNorm`` refuses CPU tensors). Wraps a ``BatchNorm1d/2d`` and keeps its parameters/buffers."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn = self.bn
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return bn(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        n_local = x.numel() / x.shape[1]
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([n_local])])
        with warnings.catch_warnings():  # deprecated in favour of functional collectives without autograd
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # sum over ranks; backward sums the gradients too
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            bn.num_batches_tracked += 1
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
        return y * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else y


def convert_dist_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d of ``module`` by a :class:`DistBatchNorm` around it (in place)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, DistBatchNorm(child))
        else:
            convert_dist_batchnorm(child)
    return module


def unwrap_state_dict(model: nn.Module) -> dict:
    """State dict without DDP's ``module.`` and DistBatchNorm's ``.bn`` name parts (loadable by a plain model)."""
    sd = (model.module if hasattr(model, "module") else model).state_dict()
    return {k.replace(".bn.", ".") if _is_wrapped(k) else k: v for k, v in sd.items()}


def _is_wrapped(key: str) -> bool:
    return ".bn." in key and key.rsplit(".bn.", 1)[1] in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def build_tokenizer(cfg: dict):
    """The tokenizer named by ``cfg['tokenizer']`` (or a saved spec dict from a checkpoint)."""
    from ris_utils.captioning.tokenizer import OpenClipTokenizer, WordTokenizer
    from ris_utils.captioning.tokenizer import build_tokenizer as _build

    spec = cfg["tokenizer"]
    if isinstance(spec, dict):
        if spec.get("type") == "word":
            return WordTokenizer(spec["vocab"], context_length=spec.get("context_length", cfg["word_len"]))
        return OpenClipTokenizer(spec["model"], context_length=cfg["word_len"])
    return _build(spec, model_name=cfg.get("tokenizer_model"), context_length=cfg["word_len"])


def tokenizer_spec(tok) -> dict:
    if hasattr(tok, "to_dict"):
        return tok.to_dict()
    return {"type": "open_clip", "model": getattr(tok, "model_name", None) or "RN50"}


def make_model(cfg: dict, tok) -> nn.Module:
    pretrained = cfg.get("pretrained", "default")
    kw = dict(cfg.get("model_args") or {})
    if pretrained in (None, "none") or (pretrained == "default" and cfg["model"] == "cris_tiny"):
        # random init: the CLIP is built at the letterbox size with the tokenizer's vocabulary
        kw.update(image_size=cfg["input_size"], vocab_size=tok.vocab_size)
    model = build_model(cfg["model"], word_len=cfg["word_len"], eot_token_id=tok.eot_token_id,
                        pretrained=None if pretrained == "none" else pretrained, **kw)
    return model.freeze(cfg.get("freeze") or "none")


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, sched: dict) -> float:
    """Multiplier of the base learning rates at optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps``; then ``cosine`` (to ``min_ratio``) or ``multistep`` (× gamma at
    each milestone epoch, CRIS: [35] of 50, gamma 0.1) or ``constant``.
    """
    warm = int(sched.get("warmup_steps", 0) or 0)
    if step < warm:
        return (step + 1) / warm
    name = sched.get("name", "cosine")
    if name == "cosine":
        t = (step - warm) / max(1, total_steps - warm)
        lo = float(sched.get("min_ratio", 0.0))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if name == "multistep":
        epoch = step // max(1, steps_per_epoch)
        return float(sched.get("gamma", 0.1)) ** sum(epoch >= m for m in sched.get("milestones", []))
    if name == "constant":
        return 1.0
    raise ValueError(f"ris.schedule.name must be cosine, multistep or constant, got {name!r}")


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},  # plain data, no ndarray
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    st = s["numpy"]
    if isinstance(st, dict):
        st = (st["kind"], st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"], st["cached_gaussian"])
    np.random.set_state(st)
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def plain(obj):
    """``obj`` as data a ``torch.load(weights_only=True)`` reads: dicts, lists, tuples, str, numbers, None,
    tensors (numpy scalars -> Python numbers, arrays -> tensors, paths and other objects -> str)."""
    if isinstance(obj, torch.Tensor | str | bool | int | float | type(None)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v) for v in obj)
    return str(obj)


def atomic_save(obj, path: Path) -> None:
    """``torch.save(plain(obj))`` through a temp file (``.<name>.tmp<PID>``, removed by the next run if this one
    is killed) and ``os.replace``: a reader sees the old checkpoint or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(plain(obj), tmp)
    os.replace(tmp, path)


class CheckpointLoadError(ValueError):
    """A RIS checkpoint that cannot be used; the message names the file and what to do."""


def _legacy_numpy_globals() -> list:
    """numpy's array / scalar reconstructors: checkpoints written before RNG states were stored as plain data
    hold the numpy RNG state as an ndarray (reconstructing arrays runs no code; torch documents this list)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return [_reconstruct, scalar, np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType,
            np.dtypes.Int64DType]


def load_ris_checkpoint(path, what: str = "RIS checkpoint") -> dict:
    """A training checkpoint (``<out>/last.pt``) read with ``torch.load(weights_only=True)``: a crafted file
    cannot run code. Raises :class:`CheckpointLoadError` (one line naming the file and what to do) for a
    missing, truncated or damaged file, a file holding Python objects, or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"{what} {path} does not exist (train writes <out>/last.pt); check the path")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle_errors() as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            unsafe = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln][:1]
            raise CheckpointLoadError(
                f"{what} {path} holds Python objects that a safe load refuses ({'; '.join(unsafe) or first}): it was "
                f"not written by `python -m ris_utils train` and loading it could run code; not loaded") from None
        raise CheckpointLoadError(f"{what} {path} is not a readable torch checkpoint ({type(e).__name__}: "
                                  f"{first[:200]}); it is truncated or damaged: copy it again or retrain") from None
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{what} {path} holds a {type(ckpt).__name__}, not a training checkpoint of "
                                  f"`python -m ris_utils train`")
    missing = [k for k in ("model", "config", "tokenizer") if k not in ckpt]
    if missing:
        bare = ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        raise CheckpointLoadError(
            f"{what} {path} " + ("is a bare state dict (weights only, no config / tokenizer)" if bare else
                                 f"lacks {missing}") +
            ": evaluate / resume need the <out>/last.pt that `python -m ris_utils train` writes")
    return ckpt


def pickle_errors() -> tuple:
    import pickle
    import zipfile

    return (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, KeyError)


def load_model_state(model: nn.Module, ckpt: dict, path, what: str = "RIS checkpoint") -> None:
    """``model.load_state_dict(ckpt["model"])``, failing with one line naming the file when the weights belong
    to another architecture / version (missing or unexpected keys, shape mismatches)."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        msg = " ".join(str(e).split())
        raise CheckpointLoadError(
            f"{what} {path} does not fit model {ckpt.get('config', {}).get('model')!r} built from its own config "
            f"({msg[:300]}...): it was written for another architecture or by another version; retrain it") from None


def _write_logs(out: Path, history: list, steps: list) -> None:
    tmp = out / f".log.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "lr"])
        w.writerows(steps)
    os.replace(tmp, out / "log.csv")
    atomic_write(out / "history.json", json.dumps(history, indent=1))


def collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) if torch.is_tensor(batch[0][k]) else torch.tensor([b[k] for b in batch])
            for k in batch[0]}


def _ddp_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    return world, rank, int(os.environ.get("LOCAL_RANK", "0"))


# --------------------------------------------------------------------------- the loop


def train(cfg: dict, train_path, out_dir, val_path=None, *, train_dataset: str | None = None,
          split_by: str | None = None, val_dataset: str | None = None, val_split_by: str | None = None,
          stop_after_epoch: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) a RIS model; returns ``{"out", "epochs", "history", "checkpoint"}``.

    Arguments:
      cfg: the ``ris`` settings (``DEFAULTS`` filled in for missing keys).
      train_path / val_path: REFER folders (see :func:`ris_utils.ris.dataset.resolve_refer`); the ``train``
        split of ``train_path`` is used, and ``cfg['val_split']`` of ``val_path`` (first
        ``val_max_refs`` refs) for the per-epoch validation.
      stop_after_epoch: stop after this many epochs as if the process died (tests of resuming).
    """
    from tqdm.auto import tqdm

    from ris_utils.models import resolve_device

    cfg = resolve_config(cfg)
    out = Path(out_dir)
    world, rank, local_rank = _ddp_setup()
    master = rank == 0
    device = resolve_device(cfg.get("device", "auto"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if cfg["batch_size"] % world:
        raise ValueError(f"ris.batch_size={cfg['batch_size']} must be divisible by the number of processes {world}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        from ris_utils.fileio import hold_folder_lock, remove_stale_temps

        lock = hold_folder_lock(out, what="ris train")  # a second training into this folder is refused
        remove_stale_temps(out, legacy=True)  # .last.pt.tmp<PID> / .log.csv.tmp<PID> of a killed run
    ckpt_path = out / "last.pt"
    ckpt = load_ris_checkpoint(ckpt_path, "checkpoint to resume") if ckpt_path.exists() else None
    if ckpt is not None:  # resume with the run's own settings (keeping overrides of epochs)
        cfg = {**ckpt["config"], "epochs": cfg["epochs"], "train_steps": cfg.get("train_steps"),
               "device": cfg.get("device", "auto")}
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # ---- data
    tok = build_tokenizer({**cfg, "tokenizer": ckpt["tokenizer"]} if ckpt else cfg)
    refer = open_refer(train_path, train_dataset, split_by)
    fallback = [cfg[k] for k in ("data_root",) if cfg.get(k)]
    common = dict(tokenizer=tok, input_size=cfg["input_size"], word_len=cfg["word_len"], cache=cfg["cache"],
                  image_fallback_roots=fallback)
    train_set = RisTrainSet(refer, "train", seed=seed, **common)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"] // world, sampler=sampler,
                                         drop_last=True, collate_fn=collate, num_workers=cfg["num_workers"])
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{train_path}: {len(train_set)} training refs < batch_size {cfg['batch_size']}")
    if cfg.get("train_steps"):  # a fixed number of optimizer steps (every training set the same compute)
        total_steps = int(cfg["train_steps"])
        cfg["epochs"] = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = steps_per_epoch * cfg["epochs"]
    val_set = None
    if val_path is not None and master:
        val_set = RisEvalSet(open_refer(val_path, val_dataset, val_split_by or split_by), cfg["val_split"], **common)
        if cfg.get("val_max_refs"):
            keep = set(range(min(len(val_set.refs), int(cfg["val_max_refs"]))))
            val_set.pairs = [p for p in val_set.pairs if p[0] in keep]

    # ---- model, optimizer
    model = make_model(cfg, tok).to(device)
    if ckpt is not None:
        load_model_state(model, ckpt, ckpt_path, "checkpoint to resume")
    stores = feature_stores(model, cfg, device)  # frozen towers: features computed once
    if world > 1:
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda"
                 else convert_dist_batchnorm(model))
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raw = model.module if world > 1 else model
    groups = raw.param_groups(cfg["lr"], cfg["backbone_lr_mult"], cfg["weight_decay"], cfg["prior_lr_mult"],
                              cfg["location_lr_mult"])
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"], eps=float(cfg["adam_eps"]))
    start_epoch, step, history, steps_log, curve = 0, 0, [], [], []
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        history, steps_log, curve = ckpt["history"], ckpt["steps_log"], ckpt.get("curve", [])
        _set_rng_state(ckpt["rng"])
        if master:
            logger.info("resuming %s from epoch %d (step %d)", out, start_epoch, step)
    resolved = {**cfg, "train": str(train_path), "val": str(val_path) if val_path else None,
                "world_size": world, "steps_per_epoch": steps_per_epoch}
    if master:
        (out / "config.json").write_text(json.dumps(resolved, indent=1, default=str))

    # ---- epochs
    every = int(cfg.get("val_every") or 0)  # the pick-vs-step curve
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        t0, losses = time.time(), []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not (progress and master),
                   leave=False, mininterval=2.0)
        for batch in bar:
            if step >= total_steps:
                break
            f = lr_factor(step, total_steps, steps_per_epoch, cfg["schedule"])
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            img, tokens, mask = (batch[k].to(device) for k in ("img", "tokens", "mask"))
            feats = stores[0].batch(train_set.image_keys(batch["index"]), img) if stores[0] else None
            text = stores[1].batch(tokens) if stores[1] else None
            logits = model(None if feats else img, tokens, feats=feats, text=text)  # (B, 1, S/4, S/4)
            loss = ris_loss(logits, mask, dice_weight=cfg["dice_weight"], target=cfg.get("loss_target", "nearest"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            lval = loss.detach()
            if world > 1:
                dist.all_reduce(lval)
                lval = lval / world
            lval = float(lval)
            losses.append(lval)
            steps_log.append([step, epoch, round(lval, 6), base_lrs[-1] * f])
            step += 1
            bar.set_postfix(loss=f"{lval:.4f}")
            if master and val_set is not None and every and (step % every == 0 or step == total_steps):
                sc = evaluate_model(raw, val_set, cfg, device, stores=stores)
                curve.append({"step": step, "pick_acc": sc["pick_acc"], "mIoU": sc["mIoU"]})
        entry = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                 "seconds": round(time.time() - t0, 2)}
        if master and val_set is not None:
            scores = evaluate_model(raw, val_set, cfg, device, stores=stores)
            entry.update({f"val_{k}": v for k, v in scores.items()})
        history.append(entry)
        if master:
            state = {"model": unwrap_state_dict(model), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                     "step": step, "history": history, "steps_log": steps_log, "curve": curve, "rng": _rng_state(),
                     "config": cfg, "tokenizer": tokenizer_spec(tok)}
            atomic_save(state, ckpt_path)
            _write_logs(out, history, steps_log)
            if curve:
                atomic_write(out / "curve.json", json.dumps(curve, indent=1))
            logger.info("epoch %d: %s", epoch + 1, entry)
        if world > 1:
            dist.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if master:
        lock.release()
    return {"out": str(out), "epochs": len(history), "history": history, "checkpoint": str(ckpt_path)}


@torch.no_grad()
def _forward_shared_images(model: nn.Module, batch: dict, data: RisEvalSet, device, stores=(None, None)
                           ) -> torch.Tensor:
    """Logits of an evaluation batch, encoding each distinct image of the batch once (consecutive sentences
    mostly share images: ~10 per image on the shapes world) when the model can take precomputed image
    features (:meth:`CRIS.encode_image`); the same logits as ``model(img, tokens)`` up to float noise.
    ``stores`` = :func:`ris_utils.ris.features.feature_stores` of a model with frozen towers."""
    img, tokens = batch["img"].to(device), batch["tokens"].to(device)
    if not hasattr(model, "encode_image"):
        return model(img, tokens)
    img_store, txt_store = stores or (None, None)
    text = txt_store.batch(tokens) if txt_store else None
    keys = data.image_keys(batch["ref_index"]) if img_store is not None else \
        [data.refs[i]["image_id"] for i in batch["ref_index"].tolist()]
    first: dict = {}
    inverse = torch.tensor([first.setdefault(k, len(first)) for k in keys], device=img.device)
    rows = [keys.index(k) for k in first]
    if img_store is not None:
        feats = img_store.batch(list(first), img[rows])
    elif len(first) == len(keys):
        return model(img, tokens, text=text)
    else:
        feats = model.encode_image(img[rows])
    return model(None, tokens, feats=feats, text=text, image_index=inverse)


def evaluate_model(model: nn.Module, data: RisEvalSet, cfg: dict, device, convention: str | None = None,
                   keep_predictions: int = 0, stores=None) -> dict:
    """mIoU / oIoU / Pr@X of ``model`` on every (ref, sentence) of ``data``, scored at the ORIGINAL image
    size: sigmoid -> :func:`unletterbox` -> ``> threshold`` (CRIS). ``keep_predictions`` > 0 also returns
    the first that many ``(ref_index, sent_index, HxW bool prediction)`` under ``"predictions"``.

    (ours, a diagnostic) ``pick_acc``: over sentences whose image has >= 2 annotated objects (``pick_n``), the
    share where the referred object gets the highest mean probability among the image's objects -- whether the
    model picks the right object at all, independent of the threshold and of mask quality (chance = 1 / the
    number of objects). A model that segments objects but cannot yet ground the words scores low mIoU AND a
    pick accuracy near chance; one that grounds but draws coarse masks scores high pick accuracy."""
    from ris_utils.metrics import RisEvaluator
    from ris_utils.ris.dataset import unletterbox

    convention = convention or cfg.get("convention", "lavt")
    was_training = model.training
    model.eval()
    ev = RisEvaluator(convention=convention)
    kept, ious = [], []
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.get("eval_batch_size", 64), shuffle=False,
                                         collate_fn=collate, num_workers=0)
    thr = float(cfg.get("threshold", 0.35))
    picks, chance, pick_records = [], [], []
    for batch in loader:
        prob = torch.sigmoid(_forward_shared_images(model, batch, data, device, stores))[:, 0].float().cpu()
        for p, i, j in zip(prob, batch["ref_index"].tolist(), batch["sent_index"].tolist()):
            full = unletterbox(p, data.geometry(i))  # (H, W) probabilities at the original size
            gt = data.gt_mask(i)
            pred = (full > thr).numpy()
            iou = ev.update(full.numpy() if convention == "cris" else pred, gt)
            ious.append(float(iou[0]))
            objs = data.image_objects(i)
            if len(objs) >= 2:
                fnp = full.numpy()
                best = max(objs, key=lambda o: float(fnp[o[1]].mean()) if o[1].any() else -1.0)[0]
                picks.append(best == data.refs[i]["ann_id"])
                chance.append(1.0 / len(objs))
                sent = data.refs[i]["sentences"][j]
                pick_records.append((sent.get("sent") or sent.get("raw") or "", picks[-1]))
            if len(kept) < keep_predictions:
                kept.append((i, j, pred))
    model.train(was_training)
    out = ev.compute()
    out["pick_acc"] = float(np.mean(picks)) if picks else None
    out["pick_chance"] = float(np.mean(chance)) if chance else None
    out["pick_n"] = len(picks)
    out.update(pick_by_attribute(pick_records))  # pick_acc_<color|shape|size|pattern|location>
    if keep_predictions:
        out["predictions"] = kept
        out["ious"] = ious
    return out


# --------------------------------------------------------------------------- CLI


def cli(argv=None) -> int:
    from ris_utils.profiles import parse_params, step_config

    ap = argparse.ArgumentParser(prog="python -m ris_utils train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="REFER folder of the training set (its 'train' split is used)")
    ap.add_argument("--val", default=None, help="REFER folder for per-epoch validation (split ris.val_split)")
    ap.add_argument("--out", required=True, help="run folder: last.pt, log.csv, history.json, config.json")
    ap.add_argument("--profile", default="shapes", help="profile name or YAML path (section 'ris')")
    ap.add_argument("--dataset", default=None, help="dataset name inside --train when it holds several")
    ap.add_argument("--val-dataset", default=None, help="dataset name inside --val when it holds several")
    ap.add_argument("--split-by", default=None, help="refs(<split_by>).p to read when several exist")
    ap.add_argument("--val-split-by", default=None, help="as --split-by, for --val (default: --split-by)")
    ap.add_argument("--param", action="append", default=[], help="override a ris setting: key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ris_utils").setLevel(logging.INFO)  # open_clip logs its model building on the root logger
    cfg = step_config(args.profile, "ris", **parse_params(args.param))
    res = train(cfg, args.train, args.out, args.val, train_dataset=args.dataset, split_by=args.split_by,
                val_dataset=args.val_dataset, val_split_by=args.val_split_by)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": res["out"], "epochs": res["epochs"], "last": res["history"][-1]}, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
