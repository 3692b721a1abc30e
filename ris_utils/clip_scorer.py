"""The CLIP scorer of step 3: CLIP logits of mask views against noun prompts and captions.

:class:`ClipScorer` computes, per image, the noun scores (masked crop vs "a photo of a {noun}") and caption
scores (box x1.2 crop vs the caption) of every candidate against every mask, features once per image
(:mod:`ris_utils.filtering` turns them into DoC). :func:`build_clip` builds the profile's ``filter.clip``
model (the paper's OpenAI RN50, or our shapes CLIP, trained on first use when ``clip.train_if_missing``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ris_utils import settings, train_clip
from ris_utils.captioning.tokenizer import build_tokenizer
from ris_utils.crops import BOX_MODES, make_views, model_view_settings
from ris_utils.models import (
    TensorMemo,
    quiet_random_init,
    register_open_clip_configs,
    resolve_device,
    seed_everything,
)
from ris_utils.profiles import is_profile_default, project_root

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
ARTICLES = ("a", "an", "the")
DEFAULT_PROMPT = settings.Filter.noun_prompt


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

    Inside :meth:`keeping_image_features` (what :func:`ris_utils.filtering.run_filter` opens), image features
    are kept (up to :attr:`image_memo_mb`) by the bytes of the image and its masks: the same image with the
    same masks (another caption mode or seed of a split) gets the features of its first pass.
    """

    image_memo_mb = 256  #: memory of the kept image features (cleared when full)

    def __init__(self, model, tokenizer, size: int, mean, std, fill=0, prompt: str = DEFAULT_PROMPT,
                 logit_scale: float | None = None, batch_size: int = 256, device=None, precision: str = "fp32",
                 box: str = "exclusive"):
        import torch

        if "{noun}" not in prompt:
            raise ValueError(f"filter.noun_prompt must contain '{{noun}}', got {prompt!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"filter.precision must be one of {PRECISIONS}, got {precision!r}")
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
        self._image_memo = TensorMemo(self.image_memo_mb)
        self._image_memo_key: str | None = None  # weights + preprocessing the kept features were computed with
        self._image_memo_on = False

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

        Arguments: image HxWx3 uint8 RGB; masks KxHxW bool. Within :meth:`keeping_image_features` the same
        image and masks again get the features of the first pass (the same tensors: do not change them).
        """
        key = _array_key(image, masks) if self._image_memo_on else None
        feats = self._image_memo.get(key) if key is not None else None
        if feats is not None:
            return feats
        feats = {}
        for view in ("masked", 1.2):
            x = make_views(image, masks, views=(view,), size=self.size, fill=self.fill, mean=self.mean,
                           std=self.std, box=self.box)[:, 0]  # (K, 3, S, S)
            feats[view] = self._encode(self.model.encode_image, x)
        if key is not None:
            self._image_memo.put(key, feats)
        return feats

    @contextlib.contextmanager
    def keeping_image_features(self):
        """A scope in which :meth:`image_features` keeps its results (see the class docstring). The kept features
        last from one scope to the next while the weights and the preprocessing stay as they are."""
        import torch

        h = hashlib.blake2b(repr((self.precision, self.size, self.mean, self.std, self.fill, self.box)).encode(),
                            digest_size=16)
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            h.update(name.encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        if h.hexdigest() != self._image_memo_key:
            self._image_memo.clear()
            self._image_memo_key = h.hexdigest()
        self._image_memo_on = True
        try:
            yield self
        finally:
            self._image_memo_on = False

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


def _array_key(*arrays) -> tuple:
    """A key of numpy arrays' contents: their dtypes, shapes and a BLAKE2b of their bytes."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return tuple((str(np.asarray(a).dtype), np.shape(a)) for a in arrays) + (h.hexdigest(),)


def build_clip(cfg: dict, device=None):
    """``(model, tokenizer, view_settings)`` of the profile's ``filter.clip`` section.

    ``clip: {model: RN50, pretrained: openai, tokenizer: open_clip}`` (the paper) or
    ``{model: clip_shapes, checkpoint: PATH, tokenizer: shapes}`` (our configs in ``model_configs/``,
    weights from ``checkpoint``; ``train_if_missing: true`` trains the shapes CLIP on first use), or
    ``{model: rn50_tiny, pretrained: null}`` (random init, tests).
    """
    import open_clip
    import torch

    ccfg = settings.group(settings.Clip, cfg.get("clip"), "filter.clip")
    name = ccfg["model"]
    if not name:
        raise ValueError("filter.clip.model is not set: name an open_clip model (RN50) or one of our configs")
    register_open_clip_configs()
    device = resolve_device(device or cfg.get("device") or "auto")
    ckpt = ccfg.get("checkpoint")
    if ckpt:
        ckpt = Path(ckpt)
        if not ckpt.is_absolute():
            ckpt = project_root() / ckpt
        if not ckpt.is_file():
            check_clip_checkpoint(cfg)  # a path the user named must exist
            logger.warning("filter: %s (the profile's own CLIP checkpoint) is missing: training the shapes CLIP "
                           "now (clip.train_if_missing; a few minutes on CPU)", ckpt)
            train_clip.train_clip(cfg, out=ckpt)
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
    tok_spec = ccfg["tokenizer"]
    ctx = getattr(model, "context_length", None)
    tokenizer = build_tokenizer(tok_spec, model_name=name, context_length=ctx)
    return model, tokenizer, model_view_settings(model)


def check_clip_checkpoint(cfg: dict) -> None:
    """Fail before any work when ``filter.clip.checkpoint`` names a file that does not exist, unless it is the
    profile's own default asset and ``clip.train_if_missing`` is set (then it is trained on first use)."""
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


def make_scorer(cfg: dict, device=None) -> ClipScorer:
    """:class:`ClipScorer` of the profile's ``filter`` settings (seeded first: random-init models are
    reproducible)."""
    cfg = settings.complete("filter", cfg)
    seed_everything(int(cfg["seed"]))
    model, tok, vs = build_clip(cfg, device)
    return ClipScorer(model, tok, vs["size"], vs["mean"], vs["std"], fill=cfg["fill"], prompt=cfg["noun_prompt"],
                      logit_scale=cfg["logit_scale"], batch_size=int(cfg["batch_size"]), precision=cfg["precision"],
                      box=cfg["box"])
