"""KV-cached decoding over any open_clip CoCa: sampling, beam search and distinctive caption sampling.

open_clip's ``CoCa.generate`` re-runs the whole prefix through the text tower and the multimodal
decoder at every step, cannot take the distinctive contrast term, and its beam search needs
``transformers``. This module owns the loop instead:

* :class:`CocaDecoder` runs CoCa's text tower and multimodal decoder one position at a time on top of
  the model's own weights (``nn.MultiheadAttention.in_proj_weight`` / ``out_proj``, ``ln_1``, ``ln_2``,
  ``ln_1_kv``, ``ls_1``, ``ls_2``, ``mlp``, positional embedding, ``ln_final``, ``text_projection``),
  with a key/value cache for every causal self-attention and the cross-attention keys/values of the
  image tokens computed once per crop: a step costs O(1) in the prefix length. The text tower's CLS
  token (``embed_cls``) sits after the prefix and is never attended to by it under the causal mask, so
  the cached prefix equals ``model._encode_text(prefix)[1]`` (checked in the tests).
* :func:`sample_captions` - greedy / top-k / top-p / temperature / min length / max length / EOT, and
  distinctive caption sampling (:class:`~ris_utils.captioning.processors.DistinctiveContrast`), with all
  masks x views x settings of one image decoded as one batch.
* :func:`beam_search` - open_clip's group beam search (``num_beams=6, num_beam_groups=3``, best
  hypothesis kept) re-implemented without ``transformers``.
* :func:`generate_candidates` - the paper's candidate set for the masks of one image.

Length conventions are open_clip's: a sequence is ``[sot, w1, ..., eot, pad...]`` of at most
``seq_len`` tokens (sot and eot included); EOT is banned while the prefix (sot included) is shorter than
``min_seq_len``; sampling forces EOT when the prefix reaches ``seq_len - 1`` tokens.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .noise import keyed_uniform, row_key, sample_inverse_cdf
from .processors import (
    FILTER_VALUE,
    DistinctiveContrast,
    MinLengthLogitsProcessor,
    SamplingSetProcessor,
)

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------- token ids


@dataclass(frozen=True)
class TokenIds:
    """Special token ids and vocabulary size (from the tokenizer / model, never hard-coded)."""

    sot: int
    eot: int
    pad: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer, model=None) -> TokenIds:
        """Read ``sot_token_id``, ``eot_token_id``, ``pad_token_id`` (default: ``model.pad_id``) and the
        vocabulary size (the model's output size when ``model`` is given, else ``tokenizer.vocab_size``)."""
        try:
            sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
        except AttributeError as e:
            raise ValueError(f"tokenizer {tokenizer!r} needs sot_token_id and eot_token_id attributes") from e
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(model, "pad_id", 0)
        vocab = getattr(tokenizer, "vocab_size", None)
        if model is not None:
            model_vocab = int(model.text_decoder.text_projection.shape[1])
            if vocab is not None and int(vocab) > model_vocab:
                raise ValueError(f"tokenizer vocab_size {vocab} exceeds the CoCa output size {model_vocab}: "
                                 "tokenizer and model do not belong together")
            vocab = model_vocab
        if vocab is None:
            raise ValueError("vocab_size unknown: pass the model or a tokenizer with vocab_size")
        return cls(sot=sot, eot=eot, pad=int(pad), vocab_size=int(vocab))

    def __post_init__(self):
        for name in ("sot", "eot", "pad"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"TokenIds.{name}={v} is outside the vocabulary [0, {self.vocab_size})")
        if self.sot == self.eot:
            raise ValueError(f"TokenIds: sot and eot must differ, both are {self.sot}")


# ---------------------------------------------------------------------------------------------- settings


#: Group beam search's finished-hypothesis bookkeeping: ``per_group`` (transformers >= 4.31, open_clip 3.3)
#: or ``shared`` (transformers < 4.31, which the authors' vendored beam search needs).
BEAM_HYPOTHESES = ("per_group", "shared")


@dataclass(frozen=True)
class DecodeSetting:
    """One decoding setting of the candidate set (from the profile, e.g. ``{"top_k": 5}``).

    ``kind``: ``"beam"`` (``num_beams``, ``num_beam_groups``, ``diversity_penalty``, ``length_penalty``,
    ``hypotheses``: ``"per_group"`` | ``"shared"``, see :func:`beam_search`),
    ``"sample"`` (``top_k`` > 0 or ``top_p`` in (0, 1)), or ``"greedy"``. ``name`` is what the candidate
    records carry (``"beam"``, ``"top_k=5"``, ``"top_p=0.4"``, ``"greedy"`` by default).
    """

    kind: str
    name: str
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 6
    num_beam_groups: int = 3
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    hypotheses: str = "per_group"

    @classmethod
    def parse(cls, spec) -> DecodeSetting:
        """From a dict (``{"top_k": 5}``, ``{"top_p": 0.4}``, ``{"kind": "beam", "num_beams": 6, ...}``,
        ``{"kind": "greedy"}``), or the strings ``"beam"`` / ``"greedy"`` / ``"top_k=5"`` / ``"top_p=0.4"``."""
        if isinstance(spec, DecodeSetting):
            return spec
        if isinstance(spec, str):
            if spec in ("beam", "greedy"):
                spec = {"kind": spec}
            elif "=" in spec:
                key, val = spec.split("=", 1)
                if key not in ("top_k", "top_p"):
                    raise ValueError(f"decoding setting {spec!r}: expected top_k=<int> or top_p=<float>")
                spec = {key: int(val) if key == "top_k" else float(val)}
            else:
                raise ValueError(f"decoding setting {spec!r}: expected 'beam', 'greedy', 'top_k=K' or 'top_p=P'")
        if not isinstance(spec, dict):
            raise ValueError(f"decoding setting must be a dict or a string, got {spec!r}")
        known = {"kind", "name", "top_k", "top_p", "num_beams", "num_beam_groups", "diversity_penalty",
                 "length_penalty", "hypotheses"}
        extra = set(spec) - known
        if extra:
            raise ValueError(f"decoding setting {spec!r}: unknown keys {sorted(extra)} (known: {sorted(known)})")
        kind = spec.get("kind")
        if kind is None:
            if "num_beams" in spec or "num_beam_groups" in spec:
                kind = "beam"
            elif "top_k" in spec or "top_p" in spec:
                kind = "sample"
            else:
                raise ValueError(f"decoding setting {spec!r}: give kind (beam/sample/greedy), top_k or top_p")
        if kind not in ("beam", "sample", "greedy"):
            raise ValueError(f"decoding setting {spec!r}: kind must be beam, sample or greedy, got {kind!r}")
        kw = {k: v for k, v in spec.items() if k not in ("kind", "name")}
        top_k, top_p = int(kw.get("top_k", 0)), float(kw.get("top_p", 1.0))
        if kind == "sample":
            if (top_k > 0) == (top_p < 1.0):
                raise ValueError(f"decoding setting {spec!r}: a sample setting needs exactly one of "
                                 "top_k > 0 or top_p in (0, 1)")
            if top_k < 0 or not 0.0 < top_p <= 1.0:
                raise ValueError(f"decoding setting {spec!r}: top_k must be >= 1, top_p in (0, 1)")
            default = f"top_k={top_k}" if top_k > 0 else f"top_p={top_p:g}"
        else:
            default = kind
        if kind == "beam":
            nb, ng = int(kw.get("num_beams", 6)), int(kw.get("num_beam_groups", 3))
            if nb < 2 or ng < 1 or nb % ng or nb // ng < 1:
                raise ValueError(f"decoding setting {spec!r}: num_beams ({nb}) must be >= 2 and divisible by "
                                 f"num_beam_groups ({ng})")
            if kw.get("hypotheses", "per_group") not in BEAM_HYPOTHESES:
                raise ValueError(f"decoding setting {spec!r}: hypotheses must be one of {BEAM_HYPOTHESES}")
        return cls(kind=kind, name=str(spec.get("name", default)), **kw)


def parse_settings(settings) -> list[DecodeSetting]:
    """A profile's list of settings -> :class:`DecodeSetting` list (names must be unique)."""
    out = [DecodeSetting.parse(s) for s in settings]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"decoding settings need unique names, got {names}")
    return out


# ------------------------------------------------------------------------------------ cached CoCa forward


@dataclass
class KVCache:
    """Per-layer self-attention keys/values of ``rows`` sequences: each (rows, heads, max_len, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    valid: torch.Tensor | None = None  # (rows, max_len) bool key mask (text tower pad mask), None = all valid
    prev: torch.Tensor | None = None  # (rows,) previous tokens (for open_clip's legacy shifted pad mask)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): ``cache[r] <- cache[index[r]]`` (positions < ``length``: the
        others are written before they are read)."""
        n = self.length
        for kv in (self.keys, self.values):
            for t in kv:
                t[:, :, :n] = t[:, :, :n].index_select(0, index)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)
        if self.prev is not None:
            self.prev = self.prev.index_select(0, index)


@dataclass
class CrossKV:
    """Per-layer cross-attention keys/values of the image tokens: each (crops, heads, n_image_tokens, head_dim)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_crops(self) -> int:
        return self.keys[0].shape[0]


def _check_block(block, where: str) -> None:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"{where}: expected open_clip ResidualAttentionBlock with nn.MultiheadAttention, got "
                         f"{type(block).__name__}; only CoCa models with standard blocks are supported")
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or not attn.batch_first:
        raise ValueError(f"{where}: unsupported nn.MultiheadAttention variant (kdim/vdim, add_bias_kv, "
                         "or batch_first=False)")


class CocaDecoder:
    """Incremental (KV-cached) forward of an open_clip ``CoCa``'s text tower and multimodal decoder.

    Arguments:
        model: an ``open_clip.CoCa`` (any size; built by ``open_clip.create_model_and_transforms``). It is
            put in eval mode; no parameter is copied.
    """

    def __init__(self, model):
        text, dec = getattr(model, "text", None), getattr(model, "text_decoder", None)
        if text is None or dec is None or not hasattr(dec, "cross_attn"):
            raise ValueError(f"{type(model).__name__} is not an open_clip CoCa (needs .text and .text_decoder "
                             "with cross_attn)")
        if getattr(text, "attn_mask", None) is None:
            raise ValueError("CoCa text tower without a causal mask (no_causal_mask=True) cannot be decoded")
        for i, b in enumerate(text.transformer.resblocks):
            _check_block(b, f"text.transformer.resblocks[{i}]")
        for i, (b, c) in enumerate(zip(dec.resblocks, dec.cross_attn)):
            _check_block(b, f"text_decoder.resblocks[{i}]")
            _check_block(c, f"text_decoder.cross_attn[{i}]")
        model.eval()
        self.model = model
        self.text = text
        self.dec = dec
        self.embed_cls = text.cls_emb is not None
        self.width = text.token_embedding.weight.shape[1]
        if dec.text_projection.shape[0] != self.width:
            raise ValueError(f"CoCa text width {self.width} != multimodal width {dec.text_projection.shape[0]}")
        self.vocab_size = dec.text_projection.shape[1]
        self.max_len = min(text.positional_embedding.shape[0] - int(self.embed_cls), dec.attn_mask.shape[0])
        # beam captions of already-decoded crops: (hash of the image tokens, setting, lengths, ids) -> sequences.
        # Beam search has no noise, so both modes and every seed of an image give the same beams; the memo
        # returns them without decoding again (exact: same inputs, same batch). Valid while the weights stay
        # as they are (:meth:`weights_fingerprint` tells a caller holding the decoder across runs).
        self.beam_memo: dict = {}
        self.beam_memo_max = 200_000

    # --- helpers
    def weights_fingerprint(self) -> str:
        """BLAKE2b of the model's parameters and buffers (changes when the weights change)."""
        hsh = hashlib.blake2b(digest_size=16)
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            hsh.update(name.encode())
            hsh.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return hsh.hexdigest()

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embedding.weight.dtype

    def check_length(self, seq_len: int) -> None:
        if seq_len > self.max_len:
            raise ValueError(f"seq_len={seq_len} exceeds the CoCa context length {self.max_len}; "
                             "lower captions.seq_len in the profile")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``model._encode_image`` -> (image_latent (B, E) L2-normalised, image_embs (B, n_tokens, W))."""
        images = images.to(self.device, self.dtype)
        latent, embs = self.model._encode_image(images)
        return latent, embs

    def _new_cache(self, blocks, rows: int, max_len: int) -> KVCache:
        keys, values = [], []
        for b in blocks:
            h = b.attn.num_heads
            shape = (rows, h, max_len, self.width // h)
            keys.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            values.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
        return KVCache(keys, values)

    def new_text_cache(self, rows: int, max_len: int) -> KVCache:
        """Empty cache for ``rows`` prefixes of up to ``max_len`` tokens in the text tower."""
        return self._new_cache(self.text.transformer.resblocks, rows, max_len)

    def new_decoder_cache(self, rows: int, max_len: int) -> KVCache:
        """Empty self-attention cache for ``rows`` (crop, prefix) pairs in the multimodal decoder."""
        return self._new_cache(self.dec.resblocks, rows, max_len)

    @staticmethod
    def _self_attn_step(block, x: torch.Tensor, cache: KVCache, layer: int, pos: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Residual block at position ``pos`` for rows x (R, W), attending to cached positions 0..pos
        (``mask`` (R, 1, 1, pos+1) bool: False = key masked)."""
        attn = block.attn
        r, w = x.shape
        h = attn.num_heads
        d = w // h
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (R, 3W)
        q, k, v = qkv.split(w, dim=-1)
        cache.keys[layer][:, :, pos] = k.view(r, h, d)
        cache.values[layer][:, :, pos] = v.view(r, h, d)
        o = F.scaled_dot_product_attention(
            q.view(r, h, 1, d), cache.keys[layer][:, :, : pos + 1], cache.values[layer][:, :, : pos + 1],
            attn_mask=mask,
        )  # (R, H, 1, d)
        o = F.linear(o.reshape(r, w), attn.out_proj.weight, attn.out_proj.bias)
        x = x + block.ls_1(o)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    @torch.no_grad()
    def text_step(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Token embeddings (R, W) at position ``pos`` for the last tokens (R,) of R cached prefixes.

        Equals ``model._encode_text(prefix)[1][:, pos]`` (the tokens the multimodal decoder reads),
        including open_clip's pad mask of CoCa's text tower (with ``embed_cls``, keys of pad tokens are
        masked; in the legacy layout, ``correct_cls_mask=False``, the mask is shifted by one position:
        key k is masked when token k-1 is pad). Pad tokens only occur inside a prefix in beam search.
        """
        tokens = tokens.to(self.device)
        x = self.text.token_embedding(tokens) + self.text.positional_embedding[pos]
        mask = None
        if self.embed_cls:
            pad = self.text.pad_id
            if cache.valid is None:
                cache.valid = torch.ones(cache.keys[0].shape[0], cache.keys[0].shape[2], dtype=torch.bool,
                                         device=self.device)
            if getattr(self.text, "correct_cls_mask", False):
                cache.valid[:, pos] = tokens != pad
            elif pos > 0:
                cache.valid[:, pos] = cache.prev != pad
            cache.prev = tokens.clone()
            valid = cache.valid[:, : pos + 1]
            if not bool(valid.all()):
                mask = valid[:, None, None, :]
        for layer, block in enumerate(self.text.transformer.resblocks):
            x = self._self_attn_step(block, x, cache, layer, pos, mask)
        cache.length = pos + 1
        if not self.embed_cls:  # with a CLS token, open_clip returns the tokens before ln_final
            x = self.text.ln_final(x)
        return x

    @torch.no_grad()
    def cross_kv(self, image_embs: torch.Tensor) -> CrossKV:
        """Cross-attention keys/values of image tokens (C, n_tokens, W), computed once per crop."""
        c, n, w = image_embs.shape
        out = CrossKV()
        for block in self.dec.cross_attn:
            attn = block.attn
            h = attn.num_heads
            kv = block.ln_1_kv(image_embs)
            wk, wv = attn.in_proj_weight[w: 2 * w], attn.in_proj_weight[2 * w:]
            bk, bv = (attn.in_proj_bias[w: 2 * w], attn.in_proj_bias[2 * w:]) if attn.in_proj_bias is not None \
                else (None, None)
            out.keys.append(F.linear(kv, wk, bk).view(c, n, h, w // h).transpose(1, 2).contiguous())
            out.values.append(F.linear(kv, wv, bv).view(c, n, h, w // h).transpose(1, 2).contiguous())
        return out

    @torch.no_grad()
    def decoder_step(self, x: torch.Tensor, pos: int, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """Multimodal decoder at position ``pos``; returns ``ln_final`` hidden states (C, Q, W).

        Arguments:
            x: (C, Q, W) token embeddings from :meth:`text_step`; query q of crop c attends to crop c's
               image tokens (``cross`` has C crops) and to its own cached history (``cache`` has C*Q rows).
        Logits = :meth:`project` of the result (linear, so mixtures may be taken before projecting).
        """
        c, q, w = x.shape
        if cross.n_crops != c:
            raise ValueError(f"decoder_step: {c} query groups but cross keys/values for {cross.n_crops} crops")
        x = x.reshape(c * q, w)
        for layer, (block, xblock) in enumerate(zip(self.dec.resblocks, self.dec.cross_attn)):
            x = self._self_attn_step(block, x, cache, layer, pos)
            attn = xblock.attn
            h = attn.num_heads
            bq = attn.in_proj_bias[:w] if attn.in_proj_bias is not None else None
            qh = F.linear(xblock.ln_1(x), attn.in_proj_weight[:w], bq).view(c, q, h, w // h).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, cross.keys[layer], cross.values[layer])  # (C, H, Q, d)
            o = F.linear(o.transpose(1, 2).reshape(c * q, w), attn.out_proj.weight, attn.out_proj.bias)
            x = x + xblock.ls_1(o)
            x = x + xblock.ls_2(xblock.mlp(xblock.ln_2(x)))
        cache.length = pos + 1
        return self.dec.ln_final(x).view(c, q, w)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., W) -> next-token logits (..., vocab) (``@ text_decoder.text_projection``)."""
        return hidden @ self.dec.text_projection


# --------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleResult:
    """Output of :func:`sample_captions`: tokens (V, S, N, seq_len) ``[sot, ..., eot, pad...]`` and whether
    the contrast term was used (``distinctive`` asked and ``min_masks <= N <= max_masks``)."""

    tokens: torch.Tensor
    distinctive: bool


def similarity_weights(latents: torch.Tensor) -> torch.Tensor:
    """Contrast weights (..., N, N): ``w_ij = s_ij / (N - 1)`` for j != i, 0 on the diagonal.

    ``latents`` (..., N, E): CoCa image embeddings (``image_latent``, L2-normalised) of the N crops of one
    view; ``s_ij`` = their cosine similarity.
    """
    lat = F.normalize(latents.float(), dim=-1)
    s = lat @ lat.transpose(-1, -2)
    n = s.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    return (s / max(n - 1, 1)).masked_fill(eye, 0.0).to(latents.dtype)


@torch.no_grad()
def sample_captions(
    decoder: CocaDecoder,
    ids: TokenIds,
    image_embs: torch.Tensor,
    image_latents: torch.Tensor,
    settings: list[DecodeSetting],
    keys: np.ndarray,
    *,
    distinctive: bool,
    seq_len: int = 30,
    min_seq_len: int = 5,
    temperature: float = 1.0,
    min_masks: int = 2,
    max_masks: int = 30,
) -> SampleResult:
    r"""Sample one caption per (view, setting, mask) of ONE image, all rows in one batch.

    Distinctive caption sampling (Pseudo-RIS, Sec. 3.2), at every step t for mask i of N (same view):

    .. math::
        z'_i = z_i - \frac{1}{N-1} \sum_{j \ne i} s_{ij}\, z_j, \qquad
        p_i = \mathrm{softmax}(z'_i / T) \text{ on } \mathcal{V}_i, \quad
        p_i[\mathrm{eot}] \leftarrow \mathrm{softmax}(z_i / T)[\mathrm{eot}]

    ``z_i``: logits of the prefix under mask i's crop after the min-length rule, restricted to i's
    top-k / top-p set :math:`\mathcal{V}_i`; ``z_j``: logits of the SAME prefix under mask j's crop;
    ``s_ij``: cosine similarity of the crops' CoCa image embeddings; ``p_i`` renormalised before
    sampling, target-only fallback if it vanishes (:class:`~ris_utils.captioning.processors.DistinctiveContrast`).

    Arguments:
        decoder: :class:`CocaDecoder` of the captioner.
        ids: special tokens.
        image_embs: (V, N, n_tokens, W) image tokens of the N masks' crops in V views.
        image_latents: (V, N, E) CoCa image embeddings of the same crops (for ``s_ij``).
        settings: S sample/greedy settings (beam settings go to :func:`beam_search`).
        keys: (V, S, N) uint64 noise keys (:func:`~ris_utils.captioning.noise.row_key`).
        distinctive: apply the contrast rule (only when ``min_masks <= N <= max_masks``; plain otherwise).
        seq_len, min_seq_len, temperature: open_clip's meanings (sot/eot count in the length).
    Returns:
        :class:`SampleResult` with tokens (V, S, N, seq_len).

    Per step t the text tower runs once per row (R = V*S*N rows). Plain: the decoder runs once per row.
    Distinctive: the decoder runs each prefix under all N crops of its view (V*N crops x S*N queries,
    i.e. the N conditionals of a prefix share the text-tower cache); the own-crop hidden state gives
    ``z_i`` and the ``s_ij``-weighted mixture of the others gives the contrast term (mixed before the
    linear output projection). See :class:`~ris_utils.captioning.processors.DistinctiveContrast`.
    """
    if image_embs.dim() != 4:
        raise ValueError(f"image_embs must be (V, N, n_tokens, W), got shape {tuple(image_embs.shape)}")
    v_, n_, t_, w_ = image_embs.shape
    s_ = len(settings)
    for s in settings:
        if s.kind not in ("sample", "greedy"):
            raise ValueError(f"sample_captions: setting {s.name!r} is {s.kind}; use beam_search for beams")
    keys = np.asarray(keys, dtype=np.uint64)
    if keys.shape != (v_, s_, n_):
        raise ValueError(f"keys must have shape (V, S, N) = {(v_, s_, n_)}, got {keys.shape}")
    if seq_len <= min_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
    decoder.check_length(seq_len)
    contrast = bool(distinctive) and min_masks <= n_ <= max_masks
    r_ = v_ * s_ * n_
    dev = decoder.device

    # per-row settings, rows ordered (view, setting, mask)
    row_k = [s.top_k for s in settings for _ in range(n_)] * v_
    row_p = [s.top_p for s in settings for _ in range(n_)] * v_
    greedy = torch.tensor([s.kind == "greedy" for s in settings for _ in range(n_)] * v_, device=dev)
    sampling_set = SamplingSetProcessor(row_k, row_p)
    min_len = MinLengthLogitsProcessor(min_seq_len, ids.eot)
    rule = DistinctiveContrast(ids.eot, temperature)
    flat_keys = keys.reshape(-1)

    tcache = decoder.new_text_cache(r_, seq_len)
    if contrast:
        cross = decoder.cross_kv(image_embs.reshape(v_ * n_, t_, w_))  # crops (v, j)
        dcache = decoder.new_decoder_cache(v_ * n_ * s_ * n_, seq_len)
        weights = similarity_weights(image_latents)  # (V, N_i, N_j)
    else:
        cross = decoder.cross_kv(image_embs.reshape(v_ * n_, t_, w_))  # crops (v, i)
        dcache = decoder.new_decoder_cache(r_, seq_len)

    tokens = torch.full((r_, seq_len), ids.pad, dtype=torch.long, device=dev)
    tokens[:, 0] = ids.sot
    done = torch.zeros(r_, dtype=torch.bool, device=dev)
    for pos in range(seq_len - 1):
        e = decoder.text_step(tokens[:, pos], pos, tcache)  # (R, W)
        if contrast:
            x = e.view(v_, 1, s_ * n_, w_).expand(v_, n_, s_ * n_, w_).reshape(v_ * n_, s_ * n_, w_)
            h = decoder.decoder_step(x, pos, dcache, cross).view(v_, n_, s_, n_, w_)  # (V, Nj, S, Ni, W)
            h = h.permute(0, 2, 3, 1, 4)  # (V, S, Ni, Nj, W)
            own = torch.diagonal(h, dim1=2, dim2=3).permute(0, 1, 3, 2)  # (V, S, N, W)
            mix = torch.einsum("vsijw,vij->vsiw", h, weights)  # (1/(N-1)) sum_{j!=i} s_ij h_j
            z = decoder.project(own).reshape(r_, -1)
            c = decoder.project(mix).reshape(r_, -1)
        else:
            x = e.view(v_, s_, n_, w_).permute(0, 2, 1, 3).reshape(v_ * n_, s_, w_)
            h = decoder.decoder_step(x, pos, dcache, cross).view(v_, n_, s_, w_).permute(0, 2, 1, 3)
            z = decoder.project(h).reshape(r_, -1)
        prefix = tokens[:, : pos + 1]
        if pos + 2 == seq_len:  # open_clip: the last position is always EOT
            nxt = torch.full((r_,), ids.eot, dtype=torch.long, device=dev)
        else:
            z = min_len(prefix, z.float())
            removed = sampling_set.removed(z)
            zf = z.masked_fill(removed, FILTER_VALUE)
            if contrast:
                probs = rule(prefix, zf, c.float(), removed)
            else:
                probs = torch.softmax(zf / rule.temperature, dim=-1)
            nxt = sample_inverse_cdf(probs, keyed_uniform(flat_keys, pos).to(dev))
            nxt = torch.where(greedy, probs.argmax(dim=-1), nxt)
        nxt = torch.where(done, torch.full_like(nxt, ids.pad), nxt)
        tokens[:, pos + 1] = nxt
        done |= (nxt == ids.eot) | (nxt == ids.pad)
        if bool(done.all()):
            break
    return SampleResult(tokens.view(v_, s_, n_, seq_len), contrast)


# ------------------------------------------------------------------------------------------ beam search


class _Hypotheses:
    """n-best list of finished hypotheses (transformers' ``BeamHypotheses``, early_stopping=False)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, hyp: torch.Tensor, sum_scores: float, generated_len: int) -> None:
        score = sum_scores / (generated_len ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_scores: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_scores / (cur_len ** self.length_penalty)


@torch.no_grad()
def beam_search(
    decoder: CocaDecoder,
    ids: TokenIds,
    image_embs: torch.Tensor,
    *,
    num_beams: int = 6,
    num_beam_groups: int = 3,
    seq_len: int = 30,
    min_seq_len: int = 5,
    diversity_penalty: float = 0.0,
    length_penalty: float = 1.0,
    hypotheses: str = "per_group",
) -> list[list[int]]:
    """Group (diverse) beam search as open_clip's ``CoCa.generate(generation_type="beam_search")``.

    Same algorithm as transformers' group beam search with ``BeamSearchScorer`` (early_stopping=False),
    as open_clip drives it: the step scores are the model's raw next-token logits after the min-length
    rule (open_clip does not apply log-softmax), summed along the beam; a finished hypothesis scores
    ``sum / len**length_penalty`` (len counts sot and eot); the first beam of every group starts at 0,
    the others at -1e9; the best hypothesis over all groups is kept. open_clip adds no diversity
    penalty (``diversity_penalty=0``); a positive value applies transformers' Hamming diversity
    (tokens chosen by earlier groups at this step are penalised).

    ``hypotheses`` selects the ``BeamSearchScorer`` semantics: ``"per_group"`` (transformers >= 4.31, since
    PR #24407; what open_clip 3.3 + transformers 4.55 run): each beam group keeps its own ``num_beams /
    num_beam_groups`` finished hypotheses and its own "done" flag, and a hypothesis' length counts its eot.
    ``"shared"`` (transformers < 4.31, the only versions the authors' vendored ``_generate_beamsearch``,
    ``coca_model.py`` l. 430-577 at de5d124, runs on): ONE heap of ``num_beams`` finished hypotheses and ONE
    done flag per caption, shared by all groups (once set by a group, the later groups of that step and of
    every later step are padded), and lengths without the eot (``hyp.shape[-1]``; the done test uses the
    current prefix length).

    Arguments:
        image_embs: (B, n_tokens, W) image tokens of B crops.
    Returns:
        B token lists ``[sot, ..., eot]`` (eot missing when the hypothesis reached ``seq_len``).
    """
    if hypotheses not in BEAM_HYPOTHESES:
        raise ValueError(f"beam hypotheses must be one of {BEAM_HYPOTHESES}, got {hypotheses!r}")
    shared = hypotheses == "shared"
    if num_beams < 2 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beams ({num_beams}) must be >= 2 and divisible by num_beam_groups "
                         f"({num_beam_groups})")
    if seq_len <= min_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
    if diversity_penalty < 0:
        raise ValueError(f"diversity_penalty must be >= 0, got {diversity_penalty}")
    decoder.check_length(seq_len)
    b_, t_, w_ = image_embs.shape
    nb, ng = num_beams, num_beam_groups
    gs = nb // ng
    dev = decoder.device
    r_ = b_ * nb
    cross = decoder.cross_kv(image_embs)
    tcache = decoder.new_text_cache(r_, seq_len)
    dcache = decoder.new_decoder_cache(r_, seq_len)
    min_len = MinLengthLogitsProcessor(min_seq_len, ids.eot)

    input_ids = torch.full((r_, 1), ids.sot, dtype=torch.long, device=dev)
    beam_scores = torch.full((b_, nb), -1e9, dtype=torch.float, device=dev)
    beam_scores[:, ::gs] = 0
    beam_scores = beam_scores.view(-1)
    if shared:  # one heap of num_beams per caption, the same object for every group
        hyps = [[h] * ng for h in (_Hypotheses(nb, length_penalty) for _ in range(b_))]
    else:
        hyps = [[_Hypotheses(gs, length_penalty) for _ in range(ng)] for _ in range(b_)]
    add_len = 0 if shared else 1  # legacy lengths: the hypothesis without its eot
    done = [[False] * ng for _ in range(b_)]
    group_rows = [torch.tensor([b * nb + k for b in range(b_) for k in range(g * gs, (g + 1) * gs)], device=dev)
                  for g in range(ng)]
    while True:
        cur = input_ids.shape[1]
        e = decoder.text_step(input_ids[:, -1], cur - 1, tcache)
        logits = decoder.project(decoder.decoder_step(e.view(b_, nb, w_), cur - 1, dcache, cross)).view(r_, -1)
        logits = logits.float()
        vocab = logits.shape[-1]
        current_tokens = torch.zeros(r_, dtype=torch.long, device=dev)
        reorder = torch.zeros(r_, dtype=torch.long, device=dev)
        for g in range(ng):
            rows = group_rows[g]
            gids = input_ids[rows]
            scores = min_len(gids, logits[rows])
            if diversity_penalty > 0 and g > 0:
                prev = current_tokens.view(b_, nb)[:, : g * gs]  # tokens chosen by earlier groups
                freq = torch.zeros(b_, vocab, device=dev).scatter_add_(1, prev, torch.ones_like(prev, dtype=torch.float))
                scores = scores - diversity_penalty * freq.repeat_interleave(gs, dim=0)
            cand = (scores + beam_scores[rows].unsqueeze(-1)).view(b_, gs * vocab)
            top_s, top_i = torch.topk(cand, 2 * gs, dim=1, largest=True, sorted=True)
            src_beam, tok = top_i // vocab, top_i % vocab
            # next beams as Python lists (scores are float32 values, stored back into float32 exactly)
            nbs, nbt, nbi = [0.0] * (b_ * gs), [0] * (b_ * gs), [0] * (b_ * gs)
            top_s_l, tok_l, src_l = top_s.tolist(), tok.tolist(), src_beam.tolist()
            eot = ids.eot
            for b in range(b_):
                if done[b][g]:
                    nbt[b * gs: (b + 1) * gs] = [ids.pad] * gs
                    continue
                k = 0
                sb, tb, rb = top_s_l[b], tok_l[b], src_l[b]
                for rank in range(2 * gs):
                    src = b * gs + rb[rank]
                    if tb[rank] == eot:
                        if rank >= gs:
                            continue
                        hyps[b][g].add(gids[src].clone(), sb[rank], cur + add_len)
                    else:
                        j = b * gs + k
                        nbs[j], nbt[j], nbi[j] = sb[rank], tb[rank], src
                        k += 1
                    if k == gs:
                        break
                done[b][g] = done[b][g] or hyps[b][g].is_done(max(sb), cur + add_len)
                if shared and done[b][g]:  # one flag per caption
                    done[b] = [True] * ng
            nbi = torch.tensor(nbi, dtype=torch.long, device=dev)
            beam_scores[rows] = torch.tensor(nbs, dtype=beam_scores.dtype, device=dev)
            input_ids[rows] = gids[nbi]
            current_tokens[rows] = torch.tensor(nbt, dtype=torch.long, device=dev)
            reorder[rows] = rows[nbi]
        input_ids = torch.cat([input_ids, current_tokens.unsqueeze(-1)], dim=-1)
        tcache.reorder(reorder)
        dcache.reorder(reorder)
        if all(all(d) for d in done) or input_ids.shape[1] >= seq_len:
            break

    out = []
    for b in range(b_):
        for g in range(ng):
            if done[b][g]:
                continue
            for k in range(gs):
                row = b * nb + g * gs + k
                hyps[b][g].add(input_ids[row], beam_scores[row].item(), input_ids.shape[1])
        cands = hyps[b][0].beams if shared else [beam for g in range(ng) for beam in hyps[b][g].beams]
        best = sorted(cands, key=lambda x: x[0]).pop()[1].tolist()
        if len(best) < seq_len:
            best.append(ids.eot)
        out.append(best)
    return out


# ------------------------------------------------------------------------------------ candidate sets


def strip_special(tokens, ids: TokenIds) -> list[int]:
    """Word ids of a sequence: drop sot, stop at eot or pad."""
    out = []
    for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens):
        t = int(t)
        if t == ids.sot and not out:
            continue
        if t in (ids.eot, ids.pad):
            break
        out.append(t)
    return out


@torch.no_grad()
def generate_candidates(
    model,
    tokenizer,
    views: torch.Tensor,
    settings,
    *,
    distinctive: bool,
    seed: int,
    image_key,
    seq_len: int = 30,
    min_seq_len: int = 5,
    temperature: float = 1.0,
    min_masks: int = 2,
    max_masks: int = 30,
    max_rows: int = 16384,
    mask_indices=None,
    decoder: CocaDecoder | None = None,
) -> list[list[dict]]:
    """The paper's caption candidates for the N masks of one image.

    Arguments:
        model: open_clip CoCa (any size).
        tokenizer: has ``sot_token_id``, ``eot_token_id``, ``pad_token_id``, ``decode(ids) -> str``
            (``captioning.tokenizer``); or a :class:`TokenIds` (then no ``text`` in the candidates).
        views: (N, V, 3, H, W) float, the V views of each mask, preprocessed for the model.
        settings: list of setting dicts / strings (:meth:`DecodeSetting.parse`), e.g. the paper's
            ``[{"kind": "beam", "num_beams": 6, "num_beam_groups": 3}, {"top_k": 5}, ..., {"top_p": 0.8}]``.
        distinctive: contrast term on for the sample settings (beam captions are the same in both modes,
            as in the authors' code); applied only when ``min_masks <= N <= max_masks``.
        seed, image_key: key the sampling noise together with (mask index, view, setting name).
        seq_len, min_seq_len, temperature: decoding lengths (open_clip's conventions) and temperature.
        max_rows: at most this many decoder rows per batch (views, then settings, are split into chunks
            above it; results do not depend on it). Memory of the decoder's KV cache ~ max_rows * seq_len *
            width * 2 * layers * bytes: 16384 rows of coca_ViT-L-14 in fp16 at seq_len 30 ~ 18 GB.
        mask_indices: N ids used in the noise keys (default 0..N-1), e.g. the masks' indices in the record.
        decoder: a prebuilt :class:`CocaDecoder` of ``model`` (optional).
    Returns:
        per mask, ``V * len(settings)`` dicts in (view, setting) order: ``{"text", "tokens" (word ids), "view",
        "setting" (name), "mode" ("naive" | "distinctive"; beams are tagged with the call's mode)}``.
    """
    if views.dim() != 5:
        raise ValueError(f"views must be (N masks, V views, 3, H, W), got shape {tuple(views.shape)}")
    decoder = decoder or CocaDecoder(model)
    ids = tokenizer if isinstance(tokenizer, TokenIds) else TokenIds.from_tokenizer(tokenizer, model)
    decode = None if isinstance(tokenizer, TokenIds) else tokenizer.decode
    parsed = parse_settings(settings)
    n_, v_ = views.shape[:2]
    if n_ == 0:
        return []
    mask_indices = list(range(n_)) if mask_indices is None else [int(m) for m in mask_indices]
    if len(mask_indices) != n_:
        raise ValueError(f"mask_indices has {len(mask_indices)} entries for {n_} masks")
    mode = "distinctive" if distinctive else "naive"

    latents, embs = decoder.encode_images(views.reshape(n_ * v_, *views.shape[2:]))
    latents = latents.view(n_, v_, -1).transpose(0, 1)  # (V, N, E)
    embs = embs.view(n_, v_, *embs.shape[1:]).transpose(0, 1)  # (V, N, T, W)

    results: dict[tuple[int, int, int], list[int]] = {}  # (mask, view, setting) -> token ids
    beams = [(si, s) for si, s in enumerate(parsed) if s.kind == "beam"]
    samples = [(si, s) for si, s in enumerate(parsed) if s.kind != "beam"]
    embs_hash = None
    for si, s in beams:
        crops = embs.reshape(v_ * n_, *embs.shape[2:])
        if embs_hash is None:
            embs_hash = hashlib.blake2b(crops.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                                        .tobytes(), digest_size=16).hexdigest()
        memo_key = (embs_hash, tuple(crops.shape), str(crops.dtype), s.num_beams, s.num_beam_groups,
                    s.diversity_penalty, s.length_penalty, s.hypotheses, seq_len, min_seq_len, ids)
        seqs = decoder.beam_memo.get(memo_key)
        if seqs is None:
            seqs = beam_search(decoder, ids, crops, num_beams=s.num_beams, num_beam_groups=s.num_beam_groups,
                               seq_len=seq_len, min_seq_len=min_seq_len, diversity_penalty=s.diversity_penalty,
                               length_penalty=s.length_penalty, hypotheses=s.hypotheses)
            if len(decoder.beam_memo) >= decoder.beam_memo_max:
                decoder.beam_memo.clear()
            decoder.beam_memo[memo_key] = [list(q) for q in seqs]
        seqs = [list(q) for q in seqs]
        for r, seq in enumerate(seqs):
            results[(r % n_, r // n_, si)] = seq
    if samples:
        # chunks of (views x settings) with at most max_rows decoder rows (N rows per prefix with contrast)
        contrast = distinctive and min_masks <= n_ <= max_masks
        per_setting = n_ * (n_ if contrast else 1)
        s_chunk = max(1, min(len(samples), max_rows // per_setting))
        v_chunk = max(1, max_rows // (per_setting * len(samples))) if s_chunk == len(samples) else 1
        for v0 in range(0, v_, v_chunk):
            vs = list(range(v0, min(v_, v0 + v_chunk)))
            for s0 in range(0, len(samples), s_chunk):
                part = samples[s0: s0 + s_chunk]
                keys = np.array([[[row_key(seed, image_key, mask_indices[i], v, s.name) for i in range(n_)]
                                  for _, s in part] for v in vs], dtype=np.uint64)
                res = sample_captions(decoder, ids, embs[vs], latents[vs], [s for _, s in part], keys,
                                      distinctive=distinctive, seq_len=seq_len, min_seq_len=min_seq_len,
                                      temperature=temperature, min_masks=min_masks, max_masks=max_masks)
                toks = res.tokens.cpu()
                for a, v in enumerate(vs):
                    for b, (si, _) in enumerate(part):
                        for i in range(n_):
                            results[(i, v, si)] = toks[a, b, i].tolist()

    out = []
    for i in range(n_):
        cands = []
        for v in range(v_):
            for si, s in enumerate(parsed):
                words = strip_special(results[(i, v, si)], ids)
                cand = {"tokens": words, "view": v, "setting": s.name, "mode": mode}
                if decode is not None:
                    cand["text"] = decode(words)
                cands.append(cand)
        out.append(cands)
    return out


__all__ = [
    "TokenIds",
    "DecodeSetting",
    "parse_settings",
    "CocaDecoder",
    "KVCache",
    "CrossKV",
    "SampleResult",
    "similarity_weights",
    "sample_captions",
    "beam_search",
    "generate_candidates",
    "strip_special",
]
