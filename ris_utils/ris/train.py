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
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ris_utils.fileio import atomic_write, hold_folder_lock, remove_stale_temps
from ris_utils.models import resolve_device, seed_everything
from ris_utils.profiles import parse_params, step_config
from ris_utils.ris.build import build_tokenizer, make_model, resolve_config, tokenizer_spec
from ris_utils.ris.checkpoint import (
    CheckpointLoadError,
    atomic_save,
    load_model_state,
    load_ris_checkpoint,
    rng_state,
    set_rng_state,
    unwrap_state_dict,
)
from ris_utils.ris.dataset import RisEvalSet, RisTrainSet, collate, open_refer
from ris_utils.ris.evaluate import evaluate_model
from ris_utils.ris.features import feature_stores
from ris_utils.ris.model import ris_loss

# names kept importable from here (tests, notebooks): the run's settings, checkpoints and evaluation
__all__ = ["train", "cli", "lr_factor", "DistBatchNorm", "convert_dist_batchnorm", "resolve_config", "make_model",
           "build_tokenizer", "evaluate_model", "CheckpointLoadError", "RisEvalSet"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- helpers


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


def _write_logs(out: Path, history: list, steps: list, curve: list) -> None:
    tmp = out / f".log.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "lr"])
        w.writerows(steps)
    os.replace(tmp, out / "log.csv")
    atomic_write(out / "history.json", json.dumps(history, indent=1))
    if curve:
        atomic_write(out / "curve.json", json.dumps(curve, indent=1))


def _ddp_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    return world, rank, int(os.environ.get("LOCAL_RANK", "0"))


# --------------------------------------------------------------------------- the loop


def _start(cfg: dict, out: Path):
    """Resolve the settings, set up DDP and the device, lock the run folder, read a checkpoint to resume."""
    cfg = resolve_config(cfg)
    world, rank, local_rank = _ddp_setup()
    device = resolve_device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if cfg["batch_size"] % world:
        raise ValueError(f"ris.batch_size={cfg['batch_size']} must be divisible by the number of processes {world}")
    lock = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock = hold_folder_lock(out, what="ris train")  # a second training into this folder is refused
        remove_stale_temps(out, legacy=True)  # .last.pt.tmp<PID> / .log.csv.tmp<PID> of a killed run
    ckpt_path = out / "last.pt"
    ckpt = load_ris_checkpoint(ckpt_path, "checkpoint to resume") if ckpt_path.exists() else None
    if ckpt is not None:  # resume with the run's own settings (keeping overrides of epochs)
        cfg = {**ckpt["config"], "epochs": cfg["epochs"], "train_steps": cfg.get("train_steps"),
               "device": cfg["device"]}
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seed_everything(int(cfg["seed"]))
    return cfg, ckpt, world, rank, device, lock


def _data(cfg: dict, tok, train_path, val_path, train_dataset, split_by, val_dataset, val_split_by, world, rank):
    """The training set, its loader (a DistributedSampler: the same global batches on any number of ranks),
    the number of optimizer steps, and the val set of the per-epoch / per-``val_every`` scores (rank 0)."""
    seed = int(cfg["seed"])
    fallback = [cfg[k] for k in ("data_root",) if cfg.get(k)]
    common = dict(tokenizer=tok, input_size=cfg["input_size"], word_len=cfg["word_len"], cache=cfg["cache"],
                  image_fallback_roots=fallback)
    train_set = RisTrainSet(open_refer(train_path, train_dataset, split_by), "train", seed=seed, **common)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"] // world, sampler=sampler,
                                         drop_last=True, collate_fn=collate, num_workers=cfg["num_workers"])
    if len(loader) == 0:
        raise ValueError(f"{train_path}: {len(train_set)} training refs < batch_size {cfg['batch_size']}")
    if cfg.get("train_steps"):  # a fixed number of optimizer steps (every training set the same compute)
        total_steps = int(cfg["train_steps"])
        cfg["epochs"] = math.ceil(total_steps / len(loader))
    else:
        total_steps = len(loader) * cfg["epochs"]
    val_set = None
    if val_path is not None and rank == 0:
        val_set = RisEvalSet(open_refer(val_path, val_dataset, val_split_by or split_by), cfg["val_split"], **common)
        if cfg.get("val_max_refs"):
            keep = set(range(min(len(val_set.refs), int(cfg["val_max_refs"]))))
            val_set.pairs = [p for p in val_set.pairs if p[0] in keep]
    return train_set, sampler, loader, total_steps, val_set


def _model(cfg: dict, tok, ckpt, ckpt_path, device, world):
    """The model (weights of ``ckpt`` when resuming), its frozen towers' feature stores, DDP wrapping, and AdamW
    over :meth:`CRIS.param_groups` (optimizer state of ``ckpt`` when resuming)."""
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
    base_lrs = [g["lr"] for g in groups]  # the schedule multiplies these (a resumed optimizer holds the last lr)
    # foreach: the multi-tensor update (CUDA's default) on the CPU too -- the same numbers, bit for bit, as the
    # per-parameter loop, in fewer dispatches (a tiny head has ~100 small tensors)
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"], eps=float(cfg["adam_eps"]),
                            foreach=True)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    return model, raw, stores, opt, base_lrs


def _step(model, batch: dict, train_set, stores, opt, cfg: dict, device, world: int) -> float:
    """One optimizer step on one batch; returns the loss (averaged over the ranks)."""
    tokens, mask = batch["tokens"].to(device), batch["mask"].to(device)
    img = feats = None
    if stores[0]:  # frozen image tower: cached features (an image is normalised only when its features are missing)
        index = batch["index"].tolist()
        feats = stores[0].batch(train_set.image_keys(index), load=lambda r: train_set.image_tensor(index[r]))
    else:
        img = batch["img"].to(device)
    text = stores[1].batch(tokens) if stores[1] else None
    logits = model(img, tokens, feats=feats, text=text)  # (B, 1, S/s, S/s)
    loss = ris_loss(logits, mask, dice_weight=cfg["dice_weight"], target=cfg["loss_target"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg["grad_clip"]:
        nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"], foreach=True)
    opt.step()
    lval = loss.detach()
    if world > 1:
        dist.all_reduce(lval)
        lval = lval / world
    return float(lval)


def train(cfg: dict, train_path, out_dir, val_path=None, *, train_dataset: str | None = None,
          split_by: str | None = None, val_dataset: str | None = None, val_split_by: str | None = None,
          stop_after_epoch: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) a RIS model; returns ``{"out", "epochs", "history", "checkpoint"}``.

    Arguments:
      cfg: the ``ris`` settings (:func:`ris_utils.ris.build.defaults` filled in for missing keys).
      train_path / val_path: REFER folders (see :func:`ris_utils.ris.dataset.resolve_refer`); the ``train``
        split of ``train_path`` is used, and ``cfg['val_split']`` of ``val_path`` (first
        ``val_max_refs`` refs) for the per-epoch validation.
      stop_after_epoch: stop after this many epochs as if the process died (tests of resuming).
    """
    out = Path(out_dir)
    cfg, ckpt, world, rank, device, lock = _start(cfg, out)
    master, ckpt_path = rank == 0, out / "last.pt"
    tok = build_tokenizer({**cfg, "tokenizer": ckpt["tokenizer"]} if ckpt else cfg)
    train_set, sampler, loader, total_steps, val_set = _data(cfg, tok, train_path, val_path, train_dataset,
                                                             split_by, val_dataset, val_split_by, world, rank)
    model, raw, stores, opt, base_lrs = _model(cfg, tok, ckpt, ckpt_path, device, world)
    train_set.with_images = stores[0] is None
    start_epoch, step, history, steps_log, curve = 0, 0, [], [], []
    if ckpt is not None:
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        history, steps_log, curve = ckpt["history"], ckpt["steps_log"], ckpt.get("curve", [])
        set_rng_state(ckpt["rng"])
        if master:
            logger.info("resuming %s from epoch %d (step %d)", out, start_epoch, step)
    if master:
        (out / "config.json").write_text(json.dumps({**cfg, "train": str(train_path), "val": str(val_path) if val_path
                                                     else None, "world_size": world, "steps_per_epoch": len(loader)},
                                                    indent=1, default=str))
    every = int(cfg.get("val_every") or 0)  # the pick-vs-step curve
    scored = None  # (step, scores) of the curve's last evaluation: the same weights as the epoch's end
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
            f = lr_factor(step, total_steps, len(loader), cfg["schedule"])
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            losses.append(_step(model, batch, train_set, stores, opt, cfg, device, world))
            steps_log.append([step, epoch, round(losses[-1], 6), base_lrs[-1] * f])
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if master and val_set is not None and every and (step % every == 0 or step == total_steps):
                sc = evaluate_model(raw, val_set, cfg, device, stores=stores)
                curve.append({"step": step, "pick_acc": sc["pick_acc"], "mIoU": sc["mIoU"]})
                scored = (step, sc)
        entry = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                 "seconds": round(time.time() - t0, 2)}
        # per-epoch val scores; with val_every the curve scores the run, and only the last epoch gets them (a small
        # training set has an epoch every few steps: gt10 spent a quarter of its run in per-epoch val)
        if master and val_set is not None and (not every or step >= total_steps or epoch + 1 == cfg["epochs"]):
            sc = scored[1] if scored and scored[0] == step else evaluate_model(raw, val_set, cfg, device, stores=stores)
            entry.update({f"val_{k}": v for k, v in sc.items()})
        history.append(entry)
        if master:
            atomic_save({"model": unwrap_state_dict(model), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                         "step": step, "history": history, "steps_log": steps_log, "curve": curve,
                         "rng": rng_state(), "config": cfg, "tokenizer": tokenizer_spec(tok)}, ckpt_path)
            _write_logs(out, history, steps_log, curve)
            logger.info("epoch %d: %s", epoch + 1, entry)
        if world > 1:
            dist.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if master:
        lock.release()
    return {"out": str(out), "epochs": len(history), "history": history, "checkpoint": str(ckpt_path)}


# --------------------------------------------------------------------------- CLI


def cli(argv=None) -> int:
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
