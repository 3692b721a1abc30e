"""Train the shapes world's tiny CLIP (step 3's scorer): ``python -m ris_utils.train_clip --profile shapes``.

Not part of the paper (which uses OpenAI's CLIP RN50): a tiny CLIP built by the same open_clip factory
(``open_clip.create_model("clip_shapes")``, a ModifiedResNet vision tower -- the RN50 family -- from
``ris_utils/model_configs/clip_shapes.json``) with the shapes world's word-level tokenizer
(``ris_utils.captioning.tokenizer.shapes_tokenizer``), trained from scratch on the ground-truth objects of
an in-memory shapes world generated from ``clip.train.world_seed`` (not the evaluation world's images)
with the two pairings step 3 scores:

- masked crop of an object  <->  ``"a photo of a {shape}"`` (the noun prompt);
- crop enlarged x1.2        <->  a generic caption of the object (``shapes.generic_caption``: a random
  subset of size / colour / pattern words and the shape; no location, no comparison with other objects).

Loss: symmetric InfoNCE per pairing where every pair with the SAME text string is a positive (the target
distribution of a row is uniform over the columns whose text equals its text), since noun prompts repeat.
A fixed number of steps (not a time budget) so that the same seed gives the same weights.

Writes ``<out>`` (fp16 state dict + the resolved settings) and ``<out>.json`` beside it (a card: settings,
parameters, file size, training seconds, validation accuracies).
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

from ris_utils import settings
from ris_utils.captioning.tokenizer import shapes_tokenizer
from ris_utils.crops import make_views, model_view_settings
from ris_utils.data import shapes
from ris_utils.models import register_open_clip_configs, seed_everything, torch_threads, warmup_cosine
from ris_utils.profiles import parse_params, step_config

logger = logging.getLogger(__name__)


def object_views(world_seed: int, n_images: int, size: int, mean, std, fill=0, image_size: int = 128):
    """Crops of every object of an in-memory shapes world (``shapes.make_scene`` with ``world_seed``).

    Returns ``(views, objects, image_index)``: views float16 (N, 2, 3, S, S) (``"masked"``, ``1.2``),
    objects: list of ``ShapeObject``, image_index: (N,) int array (which scene each object is from).
    """
    import torch

    views, objs, img_idx = [], [], []
    ann = 1
    for i in range(int(n_images)):
        rng = np.random.default_rng([int(world_seed), 11, i])
        scene, img, masks = shapes.make_scene(rng, i + 1, "train", int(image_size), ann)
        ann += len(scene.objects)
        ms = [np.asarray(masks[o.obj_id]).astype(bool) for o in scene.objects]
        v = make_views(img, ms, views=("masked", 1.2), size=size, fill=fill, mean=mean, std=std)
        views.append(v.half())
        objs += list(scene.objects)
        img_idx += [i] * len(scene.objects)
    return torch.cat(views), objs, np.asarray(img_idx)


def multi_positive_loss(img, txt, texts: list[str], scale):
    """Symmetric InfoNCE with every equal-text pair a positive.

    img, txt: (B, D) L2-normalised features; texts: the B strings; scale: the logit scale (tensor).
    """
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T  # (B, B)
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    lab = torch.tensor([ids[t] for t in texts])
    pos = (lab[:, None] == lab[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    li = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (li + lt) / 2


def evaluate(model, tokenizer, views, objs, img_idx, prompt: str = settings.Filter.noun_prompt) -> dict:
    """Validation accuracies: ``noun_accuracy`` (masked crop -> the right one of the shape prompts) and
    ``caption_retrieval`` (full caption "a {size} {color} {pattern} {shape}" -> the right object among the
    objects of its image, counted over objects whose attribute combination is unique in their image)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        fm = F.normalize(model.encode_image(views[:, 0].float()), dim=-1)
        fc = F.normalize(model.encode_image(views[:, 1].float()), dim=-1)
        names = list(shapes.SHAPES)
        fp = F.normalize(model.encode_text(tokenizer([prompt.format(noun=n) for n in names])), dim=-1)
        pred = (fm @ fp.T).argmax(1).numpy()
        noun_acc = float(np.mean([names[p] == o.shape for p, o in zip(pred, objs)]))
        caps = [shapes.phrase(o, ("size", "color", "pattern"), None, None, article="a") for o in objs]
        ft = F.normalize(model.encode_text(tokenizer(caps)), dim=-1)
        hits, n = 0, 0
        for i in range(len(objs)):
            same = np.flatnonzero(img_idx == img_idx[i])
            if sum(caps[j] == caps[i] for j in same) > 1:
                continue
            s = (fc[same] @ ft[i]).numpy()
            hits += int(same[int(s.argmax())] == i)
            n += 1
    return {"noun_accuracy": round(noun_acc, 4), "caption_retrieval": round(hits / max(n, 1), 4),
            "n_objects": len(objs)}


def train_clip(cfg: dict, out=None, progress: bool = True) -> dict:
    """Train the shapes CLIP with ``cfg["clip"]`` (``model``, ``train`` settings: :class:`ris_utils.settings.ClipTrain`).

    Returns the card (also written to ``<out>.json``); the weights go to ``out`` (default
    ``cfg["clip"]["checkpoint"]``).
    """
    ccfg = dict(cfg.get("clip") or {})
    name = ccfg.get("model") or "clip_shapes"
    tr = settings.group(settings.ClipTrain, ccfg.get("train"), "filter.clip.train")
    out = Path(out or ccfg.get("checkpoint") or "clip_shapes.pt")
    register_open_clip_configs()
    # one thread: ~10x faster than 2 threads on a shared 2-core machine (measured)
    with torch_threads(tr["threads"], "filter.clip.train.threads"):
        return _train(cfg, ccfg, name, tr, out, progress)


def _train(cfg, ccfg, name, tr, out, progress):
    import open_clip
    import torch

    seed_everything(int(tr["seed"]))
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    ctx = model.context_length
    tok = shapes_tokenizer(ctx)
    vocab = model.vocab_size if hasattr(model, "vocab_size") else None
    if vocab is not None and tok.vocab_size > vocab:
        raise ValueError(f"{name}: text vocab_size {vocab} < the shapes tokenizer's {tok.vocab_size}")
    vs = model_view_settings(model)
    t0 = time.perf_counter()
    views, objs, img_idx = object_views(tr["world_seed"], tr["n_images"], vs["size"], vs["mean"], vs["std"],
                                        tr["fill"], tr["image_size"])
    val = object_views(int(tr["world_seed"]) + 1, tr["val_images"], vs["size"], vs["mean"], vs["std"], tr["fill"],
                       tr["image_size"])
    t_data = time.perf_counter() - t0
    rng = np.random.default_rng(int(tr["seed"]))
    prompt = ccfg.get("noun_prompt") or cfg.get("noun_prompt") or settings.Filter.noun_prompt
    opt = torch.optim.AdamW(model.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    steps, bs, warm = int(tr["steps"]), int(tr["batch_size"]), int(tr["warmup"])
    sched = warmup_cosine(opt, steps, warm)
    model.train()
    t1 = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = rng.choice(len(objs), size=min(bs, len(objs)), replace=False)
        nouns = [prompt.format(noun=objs[i].shape) for i in idx]
        caps = [shapes.generic_caption(objs[i], rng) for i in idx]
        x = views[idx].float()  # (B, 2, 3, S, S)
        img = torch.nn.functional.normalize(model.encode_image(x.flatten(0, 1)), dim=-1).view(len(idx), 2, -1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(nouns + caps)), dim=-1)
        scale = model.logit_scale.exp()
        loss = multi_positive_loss(img[:, 0], txt[: len(idx)], nouns, scale) \
            + multi_positive_loss(img[:, 1], txt[len(idx):], caps, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if progress and (step % 50 == 0 or step == steps - 1):
            logger.info("train_clip step %d/%d loss %.3f", step, steps, losses[-1])
    t_train = time.perf_counter() - t1
    metrics = evaluate(model, tok, *val, prompt=prompt)
    state = {"state_dict": {k: v.half() for k, v in model.state_dict().items()}, "model": name,
             "settings": {**tr, "noun_prompt": prompt}, "tokenizer": tok.to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    card = {
        "model": name, "config": f"ris_utils/model_configs/{name}.json", "checkpoint": out.name,
        "sha256": digest, "bytes": out.stat().st_size, "dtype": "float16 (loaded as float32)",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer": "ris_utils.captioning.tokenizer.shapes_tokenizer", "train": tr, "noun_prompt": prompt,
        "train_objects": len(objs), "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "final_loss": round(float(np.mean(losses[-20:])), 4), "val": metrics,
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "data": "in-memory shapes world (shapes.make_scene) of train.world_seed, NOT the evaluation world",
        "note": "Not the paper's model: a tiny CLIP for the shapes world (paper: OpenAI CLIP RN50).",
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils.train_clip", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="shapes")
    ap.add_argument("--out", default=None, help="checkpoint path (default: filter.clip.checkpoint)")
    ap.add_argument("--param", action="append", default=[], help="override, e.g. clip.train.steps=100")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = step_config(args.profile, "filter", **parse_params(args.param))
    card = train_clip(cfg, out=args.out)
    print(json.dumps({k: card[k] for k in ("checkpoint", "bytes", "train_seconds", "val")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
