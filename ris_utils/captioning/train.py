"""The captioner of step 2: the shapes-world tiny CoCa (trained here) or the paper's open_clip CoCa.

Not part of the paper: the shapes profile needs a captioner that, like a web-trained CoCa, describes an
object without knowing what else is in the image. :func:`train` fits a tiny CoCa of the SAME open_clip
architecture as ``coca_ViT-L-14`` (config ``ris_utils/model_configs/coca_shapes.json``) on the views of
shapes-world objects (the captioner's own views, :data:`ris_utils.crops.PAPER_VIEWS`) paired with
GENERIC captions (:func:`ris_utils.data.shapes.generic_caption`: a random subset of the object's
attributes, always its shape). Its training scenes come from a world generated in memory with the
training seed (``captions.train.world_seed``), not from the evaluation images.

Loss: CoCa's, ``L = clip_w * L_contrastive + caption_w * L_caption`` (``open_clip.loss.CoCaLoss``;
``L_caption`` = cross-entropy of ``out["logits"]`` vs ``out["labels"]`` with pad ignored).

:func:`load_captioner(cfg)` is what the captions step and notebook 02 call; by the profile's keys:

- ``captions.model``: open_clip model name (``coca_shapes`` / paper ``coca_ViT-L-14``);
- ``captions.pretrained``: an open_clip pretrained tag or a checkpoint path (shapes: the committed
  ``ris_utils/assets/coca_shapes.pt``, a fp16 state dict, with its card ``coca_shapes.json`` beside it);
- ``captions.tokenizer``: ``shapes`` (word-level, :mod:`ris_utils.captioning.tokenizer`) or ``open_clip``.

For ``tokenizer: shapes`` the checkpoint is used only when its card matches the current config,
vocabulary and training settings; otherwise the captioner is trained on first use and cached under
``<work_dir>/captioner/`` (``retrain=True`` forces it). CLI::

    python -m ris_utils.captioning.train --profile shapes [--out ris_utils/assets/coca_shapes.pt] [--param k=v]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ris_utils import crops, layout, profiles, settings
from ris_utils.captioning.tokenizer import build_tokenizer
from ris_utils.crops import DEFAULT_MEAN, DEFAULT_STD
from ris_utils.data import shapes
from ris_utils.models import (
    CONFIG_DIR,
    quiet_random_init,
    register_open_clip_configs,
    resolve_device,
    torch_threads,
    warmup_cosine_lr,
)
from ris_utils.profiles import is_profile_default, project_root

logger = logging.getLogger(__name__)

@dataclass
class Captioner:
    """A loaded captioner: the open_clip model (eval mode), its tokenizer and view settings."""

    model: object
    tokenizer: object
    size: int
    mean: tuple
    std: tuple
    name: str
    source: str  # where the weights came from (path / tag / "trained now")
    card: dict | None = None

    def views(self, image: np.ndarray, masks, views=crops.PAPER_VIEWS, fill=0, box: str = "exclusive"):
        """(N, V, 3, S, S) normalised views of the masks of one image (:func:`ris_utils.crops.make_views`)."""
        return crops.make_views(image, masks, views, size=self.size, fill=fill, mean=self.mean, std=self.std,
                                box=box)


# ------------------------------------------------------------------------------------------ config helpers


def train_settings(cfg: dict) -> dict:
    """The profile's ``captions.train`` over its defaults (:class:`ris_utils.settings.CaptionerTrain`; unknown
    keys rejected)."""
    return settings.group(settings.CaptionerTrain, cfg.get("train"), "captions.train")


def model_config(name: str, vocab_size: int) -> dict:
    """The open_clip JSON config of ``name`` with ``vocab_size`` set in the text and decoder towers."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"captions.model {name!r}: {path} does not exist (our configs: "
                                f"{sorted(p.stem for p in CONFIG_DIR.glob('*.json'))})")
    cfg = json.loads(path.read_text())
    cfg["text_cfg"]["vocab_size"] = int(vocab_size)
    cfg["multimodal_cfg"]["vocab_size"] = int(vocab_size)
    if not (cfg["embed_dim"] == cfg["text_cfg"]["width"] == cfg["multimodal_cfg"]["width"]):
        raise ValueError(f"{path}: CoCa needs embed_dim == text_cfg.width == multimodal_cfg.width")
    return cfg


def _resolve_path(value: str | None) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else project_root() / p


def card_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def _create(name: str, mcfg: dict | None, pretrained: str | None):
    import open_clip

    register_open_clip_configs()
    kwargs = {}
    if mcfg is not None:
        kwargs = {"text_cfg": copy.deepcopy(mcfg["text_cfg"]), "multimodal_cfg": copy.deepcopy(mcfg["multimodal_cfg"])}
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    return model


def build_model(name: str, vocab_size: int, seed: int = 0):
    """A randomly initialised open_clip CoCa ``name`` with our tokenizer's vocabulary (seeded)."""
    import torch

    mcfg = model_config(name, vocab_size)
    torch.manual_seed(seed)
    return _init_decoder(_create(name, mcfg, None))


def _init_decoder(model):
    """Initialise CoCa's multimodal decoder for training from scratch.

    open_clip 3.3's ``MultimodalTransformer`` never calls its ``init_parameters`` (which would fail: it
    reads ``self.transformer``), so its ``text_projection`` stays ``torch.empty`` garbage (fine before
    loading pretrained weights; a loss of 1e29 when training from scratch). We apply the rule that method
    means: normal init with open_clip's CLIP text-tower standard deviations.
    """
    from torch import nn

    dec = getattr(model, "text_decoder", None)
    if dec is None:
        return model
    width, layers = dec.width, dec.layers
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
    for block in list(dec.resblocks) + list(dec.cross_attn):
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(dec.text_projection, std=width ** -0.5)
    return model


# ------------------------------------------------------------------------------------------ training data


def training_views(settings: dict, views=crops.PAPER_VIEWS, size: int = 32, fill=0,
                   mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """Views of every object of an in-memory shapes world.

    Returns ``(x, objects)``: x = float tensor (M, V, 3, S, S) and ``objects[m]`` = the attribute dict of
    object m (what :func:`ris_utils.data.shapes.generic_caption` needs).
    """
    import torch

    xs, objects = [], []
    ann = 1
    for i in range(int(settings["n_images"])):
        rng = np.random.default_rng([int(settings["world_seed"]), 7, i])
        scene, img, masks = shapes.make_scene(rng, i + 1, "train", int(settings["image_size"]), ann)
        ann += len(scene.objects)
        ms = [masks[o.obj_id] for o in scene.objects]
        xs.append(crops.make_views(img, ms, views, size=size, fill=fill, mean=mean, std=std))
        objects += [o.attributes() for o in scene.objects]
    return torch.cat(xs), objects


def _lr_at(step: int, tr: dict) -> float:
    return warmup_cosine_lr(step, int(tr["steps"]), int(tr["warmup_steps"]), float(tr["lr"]), after_warmup=True)


def train(cfg: dict, out: str | Path | None = None, log_every: int = 50) -> Captioner:
    """Train the shapes captioner with the profile's ``captions`` settings; save it when ``out`` is given.

    Arguments:
      cfg: ``profiles.step_config(profile, "captions")`` (keys ``model``, ``tokenizer``, ``views``,
        ``fill``, ``train``: :class:`ris_utils.settings.CaptionerTrain`).
      out: checkpoint path (``.pt``, fp16 state dict); its card ``.json`` is written beside it.
    Returns:
      the trained :class:`Captioner` (eval mode, fp32 weights rounded through fp16 like the saved ones).
    """
    import torch

    tr = train_settings(cfg)
    cfg = settings.complete("captions", cfg)
    name = cfg["model"]
    tok = build_tokenizer(cfg["tokenizer"])
    if not hasattr(tok, "to_dict"):
        raise ValueError("the captioner trainer trains only word-tokenizer captioners (captions.tokenizer: shapes)")
    mcfg = model_config(name, tok.vocab_size)
    tok.context_length = int(mcfg["text_cfg"]["context_length"])
    t0 = time.perf_counter()
    with torch_threads(int(tr["threads"]), "captions.train.threads"):
        model = build_model(name, tok.vocab_size, int(tr["seed"]))
        vs = crops.model_view_settings(model)
        views = _views_of(cfg)
        x, objects = training_views(tr, views, vs["size"], cfg["fill"], vs["mean"], vs["std"])
        t_data = time.perf_counter() - t0
        history = _fit(model, tok, x, objects, tr, log_every)
    seconds = time.perf_counter() - t0
    model.eval()
    # Keep the in-memory model identical to what a reload of the fp16 checkpoint gives.
    state = {k: t.detach().half() if t.is_floating_point() else t.detach() for k, t in model.state_dict().items()}
    model.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in state.items()})
    card = _card(model, name, mcfg, tok, views, cfg["fill"], tr, x.shape[0], history, seconds, t_data)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        card["checkpoint_bytes"] = out.stat().st_size
        card_path(out).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
        logger.info("captioner saved to %s (%.2f MB)", out, out.stat().st_size / 1e6)
    vs = crops.model_view_settings(model)
    return Captioner(model, tok, vs["size"], vs["mean"], vs["std"], name, "trained now", card)


def _fit(model, tok, x, objects, tr: dict, log_every: int) -> list[tuple[float, float]]:
    """CoCa's loss over ``tr["steps"]`` batches of (view, generic caption); returns the loss history."""
    import open_clip
    import torch

    rng = np.random.default_rng([int(tr["seed"]), 11])
    loss_fn = open_clip.loss.CoCaLoss(caption_loss_weight=float(tr["caption_loss_weight"]),
                                      clip_loss_weight=float(tr["clip_loss_weight"]), pad_id=tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    model.train()
    m, v = x.shape[0], x.shape[1]
    history = []
    bs = int(tr["batch_size"])
    for step in range(int(tr["steps"])):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tr)
        oi = rng.integers(0, m, size=bs)
        vi = rng.integers(0, v, size=bs)
        images = x[torch.from_numpy(oi), torch.from_numpy(vi)]  # (B, 3, S, S)
        texts = tok([shapes.generic_caption(objects[k], rng) for k in oi])  # (B, ctx)
        res = model(images, texts)
        clip_l, cap_l = loss_fn(res["image_features"], res["text_features"], res["logits"], res["labels"],
                                res["logit_scale"])
        loss = clip_l + cap_l
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((float(clip_l.detach()), float(cap_l.detach())))
        if log_every and (step % log_every == 0 or step == int(tr["steps"]) - 1):
            logger.info("captioner step %d: contrastive %.3f caption %.3f", step, *history[-1])
    return history


def _card(model, name, mcfg, tok, views, fill, tr, m, history, seconds, t_data) -> dict:
    import open_clip
    import torch

    tail = history[-20:]
    return {
        "model": name,
        "config": mcfg,
        "tokenizer": tok.to_dict(),
        "views": [str(w) for w in views],
        "fill": fill,
        "train": tr,
        "seed": int(tr["seed"]),
        "n_training_objects": int(m),
        "final_loss": {"contrastive": round(float(np.mean([a for a, _ in tail])), 4),
                       "caption": round(float(np.mean([b for _, b in tail])), 4)},
        "initial_loss": {"contrastive": round(history[0][0], 4), "caption": round(history[0][1], 4)},
        "loss_curve": [[i, round(a, 4), round(b, 4)] for i, (a, b) in enumerate(history)
                       if i % max(1, len(history) // 20) == 0],
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": round(seconds, 1),
        "data_seconds": round(t_data, 1),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "produced_by": "python -m ris_utils.captioning.train",
    }


def _views_of(cfg: dict) -> tuple:
    views = settings.complete("captions", cfg)["views"]
    return tuple(v if isinstance(v, str) else float(v) for v in views)


# ------------------------------------------------------------------------------------------ loading


def card_matches(card: dict, cfg: dict) -> tuple[bool, str]:
    """Whether a checkpoint card was made with the current config, vocabulary and training settings."""
    cfg = settings.complete("captions", cfg)
    tok = build_tokenizer(cfg["tokenizer"])
    name = cfg["model"]
    checks = {
        "model": (card.get("model"), name),
        "config": (card.get("config"), model_config(name, tok.vocab_size)),
        "vocabulary": ((card.get("tokenizer") or {}).get("vocab"), tok.to_dict()["vocab"]),
        "views": (card.get("views"), [str(v) for v in _views_of(cfg)]),
        "fill": (card.get("fill"), cfg["fill"]),
        "train": (card.get("train"), train_settings(cfg)),
    }
    for what, (a, b) in checks.items():
        if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            return False, what
    return True, ""


def _load_word_checkpoint(path: Path, card: dict, cfg: dict) -> Captioner:
    import torch

    cfg = settings.complete("captions", cfg)
    tok = build_tokenizer(cfg["tokenizer"])
    name = cfg["model"]
    mcfg = model_config(name, tok.vocab_size)
    tok.context_length = int(mcfg["text_cfg"]["context_length"])
    with quiet_random_init():  # the checkpoint is loaded just below
        model = _create(name, mcfg, None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in state.items()})
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"captioner checkpoint {path} could not be loaded ({e}); delete it or retrain "
                           f"(python -m ris_utils.captioning.train)") from e
    model.eval()
    vs = crops.model_view_settings(model)
    return Captioner(model, tok, vs["size"], vs["mean"], vs["std"], name, str(path), card)


def looks_like_path(value) -> bool:
    """Whether a ``pretrained`` value names a file (not an open_clip tag such as ``openai``)."""
    text = str(value or "")
    if text.startswith("hf-hub:"):  # open_clip's Hugging Face hub tags ("hf-hub:org/name") are not files
        return False
    return "/" in text or os.sep in text or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def check_captioner_checkpoint(cfg: dict) -> None:
    """Fail before any work when ``captions.pretrained`` names a file that does not exist, unless it is the
    profile's own default asset (a shapes captioner is then trained on first use, announced)."""
    pre = cfg.get("pretrained")
    if not looks_like_path(pre):
        return
    path = _resolve_path(pre)
    if path.exists():
        return
    if settings.complete("captions", cfg)["tokenizer"] == "open_clip":
        raise FileNotFoundError(f"captions.pretrained {path} does not exist: the authors' CoCa (the paper's "
                                f"default) comes with `python -m ris_utils download --what coca-cc3m --data-root "
                                f"<data_root>`; or name an open_clip tag such as mscoco_finetuned_laion2B-s13B-b90k")
    if not is_profile_default(cfg, "captions", "pretrained", pre):
        raise FileNotFoundError(f"captions.pretrained {path} does not exist: check the path (a missing captioner "
                                f"is trained only when it is the profile's own default checkpoint)")


def cache_checkpoint(cfg: dict) -> Path:
    """Where a captioner trained on first use is cached: ``<work_dir>/captioner/<model>.pt``."""
    cfg = settings.complete("captions", cfg)
    return layout.captioner_cache(cfg["work_dir"] or "papermill_runs/output/shapes/work", cfg["model"])


def load_captioner(cfg: dict, retrain: bool = False, device=None) -> Captioner:
    """The captioner named by the profile's ``captions`` section (see the module docstring).

    shapes (``tokenizer: shapes``): the committed checkpoint if its card matches, else the cached one
    under ``<work_dir>/captioner/`` if it matches, else trains now (:func:`train`) and caches.
    ``retrain=True`` always trains (and overwrites the cache). Paper (``tokenizer: open_clip``):
    ``open_clip.create_model_and_transforms(model, pretrained=pretrained)``.
    """
    cfg = settings.complete("captions", cfg)
    dev = resolve_device(device or cfg["device"])
    spec = cfg["tokenizer"]
    name = cfg["model"]
    check_captioner_checkpoint(cfg)
    if spec == "open_clip":
        pre = cfg.get("pretrained")
        path = _resolve_path(pre)
        pretrained = str(path) if path is not None and path.exists() else pre
        model = _create(name, None, pretrained).eval().to(dev)
        vs = crops.model_view_settings(model)
        tok = build_tokenizer("open_clip", name, getattr(model, "context_length", None))
        return Captioner(model, tok, vs["size"], vs["mean"], vs["std"], name, str(pretrained), None)

    candidates = [] if retrain else [_resolve_path(cfg.get("pretrained")), cache_checkpoint(cfg)]
    for ckpt in candidates:
        if ckpt is None or not ckpt.is_file() or not card_path(ckpt).is_file():
            continue
        card = json.loads(card_path(ckpt).read_text())
        ok, why = card_matches(card, cfg)
        if ok:
            cap = _load_word_checkpoint(ckpt, card, cfg)
            cap.model.to(dev)
            return cap
        logger.warning("captioner checkpoint %s does not match the profile (%s differs); not used", ckpt, why)
    out = cache_checkpoint(cfg)
    logger.warning("training the shapes captioner now (no checkpoint matching the profile; a few minutes on CPU; "
                   "cached at %s)", out)
    cap = train(cfg, out=out)
    cap.model.to(dev)
    return cap


# ------------------------------------------------------------------------------------------ CLI


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ris_utils.captioning.train",
                                 description="Train the shapes-world CoCa captioner (tiny open_clip CoCa).")
    ap.add_argument("--profile", default="shapes", help="profile name or YAML path (default: shapes)")
    ap.add_argument("--out", default=None,
                    help="checkpoint path (default: the profile's captions.pretrained, i.e. the committed asset)")
    ap.add_argument("--param", action="append", default=[], help="override, e.g. train.steps=300 (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = profiles.step_config(args.profile, "captions", **profiles.parse_params(args.param))
    out = Path(args.out) if args.out else _resolve_path(cfg.get("pretrained"))
    if out is None:
        raise SystemExit("no --out given and the profile has no captions.pretrained path")
    cap = train(cfg, out=out)
    c = cap.card
    print(f"trained {c['model']} ({c['n_params']} params) in {c['train_seconds']} s; final loss "
          f"contrastive {c['final_loss']['contrastive']}, caption {c['final_loss']['caption']}; "
          f"saved {out} ({c['checkpoint_bytes'] / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
