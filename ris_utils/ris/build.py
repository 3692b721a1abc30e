"""The ``ris`` settings resolved and checked, and what they build: the tokenizer and the model.

The defaults live once, in :class:`ris_utils.settings.Ris` (CRIS's values where CRIS gives one); a profile
overrides any of them. CRIS's own config names are accepted as aliases (:func:`resolve_config`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ris_utils import settings
from ris_utils.captioning.tokenizer import OpenClipTokenizer, WordTokenizer
from ris_utils.captioning.tokenizer import build_tokenizer as _named_tokenizer
from ris_utils.ris.model import build_model

__all__ = ["defaults", "resolve_config", "check_settings", "build_tokenizer", "tokenizer_spec", "make_model"]

#: settings.Ris fields that are CRIS aliases or belong to notebook 04 / the pretraining, not to one run
_NOT_RUN = ("clip_pretrained", "max_norm", "milestones", "lr_decay", "num_layers", "num_head", "dim_ffn",
            "dropout", "experiments", "eval_sets", "pretrain")


def defaults() -> dict:
    """The settings of one RIS run when a profile gives none: :class:`settings.Ris` (+ ``seed``, ``device``)."""
    every = settings.group(settings.Ris, {})
    out = {f.name: every[f.name] for f in dataclasses.fields(settings.Ris) if f.name not in _NOT_RUN}
    out.update(model_args={}, schedule=dict(settings.CRIS_SCHEDULE), seed=settings.Shared.seed,
               device=settings.Shared.device)
    return out


def resolve_config(cfg: dict) -> dict:
    """:func:`defaults` + ``cfg`` (``None`` values ignored), with CRIS's config names accepted as aliases
    (as ``papermill_runs/paper.yaml`` writes them): ``clip_pretrained`` -> ``pretrained``; ``milestones`` +
    ``lr_decay`` -> a multistep ``schedule``; ``max_norm`` -> ``grad_clip``; ``num_layers``, ``num_head``,
    ``dim_ffn``, ``dropout`` -> ``model_args``."""
    given = {k: v for k, v in cfg.items() if v is not None}
    out = {**defaults(), **given}
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


def build_tokenizer(cfg: dict):
    """The tokenizer named by ``cfg['tokenizer']`` (or a saved spec dict from a checkpoint)."""
    spec = cfg["tokenizer"]
    if isinstance(spec, dict):
        if spec.get("type") == "word":
            return WordTokenizer(spec["vocab"], context_length=spec.get("context_length", cfg["word_len"]))
        return OpenClipTokenizer(spec["model"], context_length=cfg["word_len"])
    return _named_tokenizer(spec, model_name=cfg.get("tokenizer_model"), context_length=cfg["word_len"])


def tokenizer_spec(tok) -> dict:
    if hasattr(tok, "to_dict"):
        return tok.to_dict()
    return {"type": "open_clip", "model": getattr(tok, "model_name", None) or "RN50"}


def make_model(cfg: dict, tok) -> nn.Module:
    pretrained = cfg["pretrained"]
    kw = dict(cfg.get("model_args") or {})
    if pretrained in (None, "none") or (pretrained == "default" and cfg["model"] == "cris_tiny"):
        # random init: the CLIP is built at the letterbox size with the tokenizer's vocabulary
        kw.update(image_size=cfg["input_size"], vocab_size=tok.vocab_size)
    model = build_model(cfg["model"], word_len=cfg["word_len"], eot_token_id=tok.eot_token_id,
                        pretrained=None if pretrained == "none" else pretrained, **kw)
    return model.freeze(cfg.get("freeze") or "none")
