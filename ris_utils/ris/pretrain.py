"""Pretrain the shapes world's CLIP for the RIS model -- the analogue of CRIS's web-pretrained CLIP RN50.

    python -m ris_utils pretrain --profile shapes      # writes ris.pretrain.checkpoint + its card

Why: CRIS starts from OpenAI's CLIP, whose words are grounded already -- not only in its pooled image
embedding but also, weakly, in its dense features (the premise of MaskCLIP, Zhou et al., ECCV 2022, and of
CRIS's text-to-pixel contrast). A tiny CLIP trained on 32-px object crops (step 3's ``clip_shapes``) has
pooled embeddings that name the objects, but its dense C5 map over a whole RIS-sized scene picks the
referred object only at chance level (measured: 15-23 % against a chance of 21 %). This module trains a
CLIP of the same family whose DENSE features carry colour, shape, pattern and size at the resolution the
RIS model uses, from data that is not the RIS data:

- **images**: whole scenes of an in-memory shapes world generated from ``world_seed`` (never the
  evaluation world's images; :func:`pretrain_world`), letterboxed to the RIS input size;
- **text**: GENERIC captions only -- a random subset of an object's size / colour / pattern and its shape,
  in alt-text framings ("a red circle", "a big striped circle shape", "one dotted square"): the kind of text
  the step-2 captioner learns from; no location, no comparison with the other objects, never a referring
  expression (a RIS expression starts with "the" or an attribute, a pretraining caption with "a"/"an"/"one").
- **objective** (region-text contrast, RegionCLIP-style, over CRIS's dense C5): the C5 map is CLIP's
  attention pool run at EVERY position of ``layer4`` (:func:`dense_map`, the same function the RIS
  backbone uses); for object o, its region embedding is the mask-weighted mean of that map,
  ``r_o = sum_x w_o(x) D(x) / sum_x w_o(x)`` with ``w_o`` the share of each C5 cell covered by o's mask.
  Loss: symmetric InfoNCE between the L2-normalised ``r_o`` and caption embeddings ``t_c`` of all objects
  of the batch, where every (object, caption) pair whose caption FITS the object (each named attribute
  and the shape are the object's) is a positive -- generic captions fit several objects.

Architecture: ``clip_shapes_dense`` (``ris_utils/model_configs/clip_shapes_dense.json``): open_clip's
``ModifiedResNet`` (the RN50 family, width 16) with ``layer4`` kept at stride 16 instead of 32 (its
first block's two average pools removed by :func:`ris_utils.ris.backbone.set_c5_stride`) so that at the RIS
input of 192 px the C5 cell is 16 px of the input (10.7 px of the 128-px scene), below the smallest
object's diameter (14 px); the config's ``image_size`` (384) is 2 x the input because open_clip sizes the
attention pool's positional grid as ``image_size // 32``. Token embeddings are not weight-decayed, so
words that generic captions never contain (location words, "the") keep their random, distinct init.

Writes ``<checkpoint>`` (fp16 state dict + the resolved settings) and ``<checkpoint minus .pt>.json``
(the card: data, seed, steps, time, and the training-free pick accuracies of :func:`pick_accuracy`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ris_utils import settings
from ris_utils.captioning.tokenizer import shapes_tokenizer
from ris_utils.crops import make_views
from ris_utils.data import shapes
from ris_utils.data.refer import decode_segmentation, select_split
from ris_utils.images import load_image_rgb
from ris_utils.models import (
    quiet_random_init,
    register_open_clip_configs,
    seed_everything,
    torch_threads,
    warmup_cosine,
)
from ris_utils.profiles import parse_params, project_root, step_config
from ris_utils.ris.backbone import dense_map, set_c5_stride
from ris_utils.ris.dataset import (
    CLIP_MEAN,
    CLIP_STD,
    _image_path,
    letterbox_image,
    letterbox_mask,
    open_refer,
)
from ris_utils.ris.diagnostics import pick_by_attribute

logger = logging.getLogger(__name__)

#: alt-text framings of a generic caption (only words of the shapes vocabulary)
TEMPLATES = ("{a} {x}", "{a} {x} shape", "{a} {x} object", "one {x}")


def generic_caption(obj, rng: np.random.Generator) -> str:
    """A generic caption of one object: each of size / colour / pattern with probability 0.5 (surface forms
    varied), always the shape, in one of :data:`TEMPLATES` ("a red circle", "one big striped star shape")."""
    attrs = [a for a in ("size", "color", "pattern") if rng.random() < 0.5]
    x = shapes.phrase(obj, attrs, None, rng, article=None)
    t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return t.format(a="an" if x[0] in "aeiou" else "a", x=x)


def fits(caption: str, obj) -> bool:
    """Whether every attribute the caption names (and its shape) is ``obj``'s (the referee's reading)."""
    p = shapes.parse_expression(caption)
    if p["shape"] != {obj.shape}:
        return False
    return all(not p[k] or p[k] == {getattr(obj, k)} for k in shapes.ATTRIBUTES)


def pretrain_world(world_seed: int, n_images: int, input_size: int, scene_size: int = 128):
    """Scenes of an in-memory shapes world (``shapes.make_scene`` with generators seeded by ``world_seed``).

    Returns ``(images, objects, masks)``: images uint8 (N, 3, S, S) letterboxed to ``input_size`` as the RIS
    model's input; objects[i] = the scene's ``ShapeObject`` list; masks[i] = (n_i, S, S) bool at the input size.
    """
    imgs, objs, masks = [], [], []
    ann = 1
    for i in range(int(n_images)):
        rng = np.random.default_rng([int(world_seed), 17, i])
        scene, img, m = shapes.make_scene(rng, i + 1, "train", int(scene_size), ann)
        ann += len(scene.objects)
        lbimg, lb = letterbox_image(img, int(input_size))
        imgs.append(torch.from_numpy(lbimg).permute(2, 0, 1).contiguous())
        objs.append(list(scene.objects))
        masks.append(np.stack([letterbox_mask(m[o.obj_id], lb).astype(bool) for o in scene.objects]))
    return torch.stack(imgs), objs, masks


def cell_weights(masks: np.ndarray, grid: int):
    """(n, S, S) bool masks -> (n, grid*grid) float: the share of each C5 cell covered by each mask."""
    m = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
    return F.adaptive_avg_pool2d(m, grid).flatten(1)


def region_embeddings(dense, weights: list):
    """dense (B, D, g, g) C5 maps; weights[b] (n_b, g*g) cell weights -> (sum n_b, D) region means."""
    out = []
    for d, w in zip(dense, weights):
        w = w / w.sum(1, keepdim=True).clamp_min(1e-6)
        out.append(w @ d.flatten(1).T)  # (n_b, D)
    return torch.cat(out)


def fit_loss(regions, texts, pos, scale):
    """Symmetric InfoNCE over (object region, caption) pairs with a multi-positive target.

    regions (N, D), texts (N, D) L2-normalised; pos (N, N) bool, pos[i, j] = caption j fits object i
    (the diagonal is always True); scale: the logit scale."""
    logits = scale * regions @ texts.T
    p = pos.float()
    li = -(p / p.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(p.T / p.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


def build_clip(name: str, c5_stride: int):
    """A random-init open_clip CLIP ``name`` (our configs) with its C5 at ``c5_stride``."""
    import open_clip

    register_open_clip_configs()
    with quiet_random_init():
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    set_c5_stride(model.visual, int(c5_stride))
    return model


def pretrain(cfg: dict, out=None, progress: bool = True) -> dict:
    """Train the dense shapes CLIP with the ``ris.pretrain`` settings ``cfg``; returns the card.

    ``cfg``: ``model`` (open_clip config name), ``checkpoint`` (output path), ``c5_stride``, ``input_size``,
    ``world_seed``, ``n_images``, ``steps``, ``batch_size`` (scenes per step), ``lr``, ``weight_decay``,
    ``warmup``, ``seed``, ``threads``; ``eval`` = ``{data_root, dataset, split_by, split, max_refs}`` for the
    training-free pick accuracies written to the card (skipped when that dataset is missing).
    """
    cfg = settings.group(settings.Pretrain, cfg, "ris.pretrain")

    out = Path(out or cfg["checkpoint"])
    with torch_threads(cfg.get("threads")):
        seed_everything(int(cfg["seed"]))
        model = build_clip(cfg["model"], cfg["c5_stride"])
        tok = shapes_tokenizer(model.context_length)
        t0 = time.perf_counter()
        images, objects, masks = pretrain_world(cfg["world_seed"], cfg["n_images"], cfg["input_size"])
        grid = int(cfg["input_size"]) // int(cfg["c5_stride"])
        weights = [cell_weights(m, grid) for m in masks]
        t_data = time.perf_counter() - t0
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        no_decay = [p for n, p in model.named_parameters() if n in ("token_embedding.weight", "logit_scale")]
        nd_ids = {id(p) for p in no_decay}
        decay = [p for p in model.parameters() if id(p) not in nd_ids]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=float(cfg["lr"]))
        steps, bs, warm = int(cfg["steps"]), int(cfg["batch_size"]), int(cfg["warmup"])
        sched = warmup_cosine(opt, steps, warm)
        rng = np.random.default_rng(int(cfg["seed"]))
        model.train()
        t1, losses = time.perf_counter(), []
        for step in range(steps):
            idx = rng.choice(len(images), size=min(bs, len(images)), replace=False)
            x = (images[idx].float() / 255 - mean) / std
            objs = [o for i in idx for o in objects[i]]
            caps = [generic_caption(o, rng) for o in objs]
            pos = torch.tensor([[fits(c, o) for c in caps] for o in objs])
            dense = dense_map(model.visual, x, cfg["dense"])  # (B, D, g, g)
            reg = F.normalize(region_embeddings(dense, [weights[i] for i in idx]), dim=-1)
            txt = F.normalize(model.encode_text(tok(caps)), dim=-1)
            loss = fit_loss(reg, txt, pos, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            if progress and (step % 50 == 0 or step == steps - 1):
                logger.info("pretrain step %d/%d loss %.3f", step, steps, np.mean(losses[-50:]))
        t_train = time.perf_counter() - t1
        model.eval()
        picks = pick_accuracy(model, tok, cfg) if cfg.get("eval") else {}
    return write_asset(model, tok, cfg, out, n_objects=int(sum(len(o) for o in objects)), picks=picks,
                       seconds=(t_data, t_train), final_loss=float(np.mean(losses[-50:])))


def write_asset(model, tok, cfg: dict, out: Path, n_objects: int, picks: dict, seconds: tuple, final_loss: float
                ) -> dict:
    """Save the pretrained CLIP (float16 state dict + its settings and tokenizer) to ``out`` and its card to
    ``out.with_suffix(".json")``; returns the card."""
    import open_clip

    state = {"state_dict": {k: v.half() for k, v in model.state_dict().items()}, "model": cfg["model"],
             "settings": {k: v for k, v in cfg.items() if k != "eval"}, "tokenizer": tok.to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    card = {
        "model": cfg["model"], "config": f"ris_utils/model_configs/{cfg['model']}.json", "checkpoint": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "bytes": out.stat().st_size,
        "dtype": "float16 (loaded as float32)", "c5_stride": int(cfg["c5_stride"]),
        "input_size": int(cfg["input_size"]), "parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer": "ris_utils.captioning.tokenizer.shapes_tokenizer",
        "settings": {k: v for k, v in cfg.items() if k not in ("eval", "checkpoint")},
        "data": (f"{cfg['n_images']} scenes of an in-memory shapes world (world_seed {cfg['world_seed']}), "
                 "generic captions only (ris_utils.ris.pretrain.generic_caption); no RIS image, no referring "
                 "expression"),
        "train_objects": n_objects, "data_seconds": round(seconds[0], 1),
        "train_seconds": round(seconds[1], 1), "final_loss": round(final_loss, 4),
        "pick": picks, "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "note": "Not the paper's model: a tiny CLIP for the shapes world (paper/CRIS: OpenAI CLIP RN50).",
        "trained_with": "python -m ris_utils pretrain --profile shapes",
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def pick_accuracy(model, tok, cfg: dict) -> dict:
    """Training-free pick accuracy of a CLIP on RIS refs: for each sentence of the first ``max_refs`` refs of
    ``cfg['eval']`` (an evaluation split, images with >= 2 objects), does the referred object score highest?

    - ``dense``: cosine(sentence embedding, the object's region embedding on the dense C5 map of the whole
      letterboxed image at ``input_size``) -- what the RIS model's fusion sees;
    - ``crop``: cosine(sentence embedding, pooled embedding of the object's box enlarged x1.2, resized to
      ``input_size``) -- the crop-level grounding step 3 relies on.
    Returns ``{"dense": acc, "crop": acc, "chance": mean 1/n_objects, "n": sentences}``.
    """
    ev = cfg["eval"]
    root = Path(ev["data_root"])
    if not (root / ev["dataset"]).is_dir():
        logger.warning("pick accuracy skipped: %s/%s missing", root, ev["dataset"])
        return {}
    refer = open_refer(root, ev["dataset"], ev.get("split_by"))
    refs = [r for r in select_split(refer.refs, ev.get("split", "val")) if r["sentences"]][: int(ev.get("max_refs", 300))]
    size, grid = int(cfg["input_size"]), int(cfg["input_size"]) // int(cfg["c5_stride"])
    anns_by_image: dict = {}
    for a in refer.anns.values():
        anns_by_image.setdefault(a["image_id"], []).append(a)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    hits_d, hits_c, chance, n, records = 0, 0, [], 0, []
    with torch.no_grad():
        for r in refs:
            anns = sorted(anns_by_image[r["image_id"]], key=lambda a: a["id"])
            if len(anns) < 2:
                continue
            info = refer.imgs[r["image_id"]]
            img = load_image_rgb(_image_path(refer, r["image_id"], (root,)))
            ms = [decode_segmentation(a["segmentation"], info["height"], info["width"]).astype(bool) for a in anns]
            lbimg, lb = letterbox_image(img, size)
            x = (torch.from_numpy(lbimg).permute(2, 0, 1)[None].float() / 255 - mean) / std
            w = cell_weights(np.stack([letterbox_mask(m, lb) for m in ms]), grid)
            reg = F.normalize(region_embeddings(dense_map(model.visual, x, cfg["dense"]), [w]), dim=-1)
            crops = make_views(img, ms, views=(1.2,), size=size, fill=0, mean=CLIP_MEAN, std=CLIP_STD)[:, 0]
            pooled = F.normalize(model.encode_image(crops), dim=-1)
            t = F.normalize(model.encode_text(tok([s["sent"] for s in r["sentences"]])), dim=-1)
            target = [a["id"] for a in anns].index(r["ann_id"])
            ok = ((t @ reg.T).argmax(1) == target).tolist()
            records += [(s["sent"], o) for s, o in zip(r["sentences"], ok)]
            hits_d += sum(ok)
            hits_c += int(((t @ pooled.T).argmax(1) == target).sum())
            chance += [1 / len(anns)] * len(t)
            n += len(t)

    by_attr = {k.replace("pick_acc_", "dense_"): round(v, 4) for k, v in pick_by_attribute(records).items()
               if k.startswith("pick_acc_")}
    return {"dense": round(hits_d / max(n, 1), 4), "crop": round(hits_c / max(n, 1), 4), **by_attr,
            "chance": round(float(np.mean(chance)) if chance else 0.0, 4), "n": n,
            "eval": {k: _relative(v) for k, v in ev.items()}}


def _relative(v) -> str:
    """A setting as text, a path under the project root relative to it (cards are committed)."""
    s = str(v)
    root = str(project_root()) + "/"
    return s[len(root):] if s.startswith(root) else s


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="shapes")
    ap.add_argument("--out", default=None, help="checkpoint path (default: ris.pretrain.checkpoint)")
    ap.add_argument("--param", action="append", default=[], help="override, e.g. pretrain.steps=100")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = step_config(args.profile, "ris", **parse_params(args.param))
    pcfg = dict(cfg["pretrain"])
    if pcfg.get("eval") is not None:
        pcfg["eval"] = {"data_root": cfg["data_root"], **pcfg["eval"]}
    card = pretrain(pcfg, out=args.out)
    print(json.dumps({k: card[k] for k in ("checkpoint", "bytes", "train_seconds", "pick")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
