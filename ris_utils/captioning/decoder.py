"""The KV-cached CoCa decoder and what it decodes with (special token ids, decoding settings).

:class:`CocaDecoder` runs an open_clip CoCa's text tower and multimodal decoder one position at a time on top of
the model's own weights (``nn.MultiheadAttention.in_proj_weight`` / ``out_proj``, ``ln_1``, ``ln_2``,
``ln_1_kv``, ``ls_1``, ``ls_2``, ``mlp``, positional embedding, ``ln_final``, ``text_projection``), with a
key/value cache for every causal self-attention and the cross-attention keys/values of the image tokens
computed once per crop: a step costs O(1) in the prefix length. The text tower's CLS token (``embed_cls``)
sits after the prefix and is never attended to by it under the causal mask, so the cached prefix equals
``model._encode_text(prefix)[1]`` (checked in the tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import TensorMemo
from ..settings import N_RANGE, Beam, Captions

#: open_clip ``generate``'s lengths (the authors'): at most 30 tokens, at least 5 before eot; written once in
#: :class:`ris_utils.settings.Captions` (``captions.seq_len`` / ``captions.min_seq_len``)
SEQ_LEN, MIN_SEQ_LEN = Captions.seq_len, Captions.min_seq_len
#: the contrast term only for images with 2 <= N <= 30 masks (the authors'; ``captions.n_range``)
MIN_MASKS, MAX_MASKS = N_RANGE
#: softmax temperature (``captions.temperature``)
TEMPERATURE = Captions.temperature

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
    num_beams: int = Beam.num_beams
    num_beam_groups: int = Beam.num_beam_groups
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
        top_k, top_p = int(kw.get("top_k", cls.top_k)), float(kw.get("top_p", cls.top_p))
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
            nb, ng = int(kw.get("num_beams", cls.num_beams)), int(kw.get("num_beam_groups", cls.num_beam_groups))
            if nb < 2 or ng < 1 or nb % ng or nb // ng < 1:
                raise ValueError(f"decoding setting {spec!r}: num_beams ({nb}) must be >= 2 and divisible by "
                                 f"num_beam_groups ({ng})")
            if kw.get("hypotheses", cls.hypotheses) not in BEAM_HYPOTHESES:
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

    def keep_rows(self, index: torch.Tensor, first_layer: torch.Tensor | None = None) -> None:
        """Drop every row but ``index`` (finished captions leave the batch): ``cache[k] <- cache[index[k]]``, the
        cache shrinks to ``len(index)`` rows. ``first_layer``: layer 0's rows when that layer holds other rows
        than the others (the multimodal decoder's first layer, shared by the crops of a prefix)."""
        for layer in range(len(self.keys)):
            idx = first_layer if layer == 0 and first_layer is not None else index
            self.keys[layer] = self.keys[layer].index_select(0, idx)
            self.values[layer] = self.values[layer].index_select(0, idx)
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


@dataclass
class RowLayout:
    """Where the D rows of :meth:`CocaDecoder.decoder_rows` sit in :meth:`CocaDecoder.decoder_step`'s layout of
    ``n_crops`` crops x ``n_queries`` queries (a decoder row stands for the full-layout positions of every caption
    with its prefix under its crop; finished captions have none).

    ``index`` (F,): full-layout positions ``crop * n_queries + query`` to fill, ``source`` (F,): the decoder row of
    each; ``pick`` (D,): the position whose cross-attention output a decoder row takes (one of its own).
    ``share`` (D,) or None: the input row each decoder row reads when the input holds prefixes read under several
    crops (distinctive sampling: a prefix under each of the N crops of its view); the first layer's self-attention
    block and cross-attention query depend on the prefix only, so they run once per prefix. None: one input row
    per decoder row.
    """

    n_crops: int
    n_queries: int
    index: torch.Tensor
    source: torch.Tensor
    pick: torch.Tensor
    share: torch.Tensor | None = None


#: a matrix product keeps at least this many rows when the batch shrinks: MKL's small-matrix sgemm path (M <= 3)
#: rounds differently from the M >= 4 one (measured on every shape from 32 x 40 to 768 x 3072 and 512 x 49408),
#: whose row results do not depend on the other rows (nor on their number)
MIN_ROWS = 4


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
        # image tokens of already-encoded crops (the other mode / seed of an image), by the bytes of the crops
        # and the autocast state: the outputs of the first pass (same batch), up to 256 MB
        self.encode_memo = TensorMemo(256)
        self._rows_probe: bool | None = None  # :meth:`_rows_independent`, probed on first use
        self._query_classes: dict = {}  # :meth:`query_classes` by shape
        self._class_ids: dict = {}  # n_keys -> {probe output bytes: class id}
        self._compact: dict = {}  # :meth:`compact_queries`

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

    @property
    def shares_rows(self) -> bool:
        """Whether sampling and beam search run the model once per node of equal prefixes (:class:`RowLayout`):
        on a float32 decoder on the CPU with one thread, where a row's numbers do not depend on the other rows of
        a matrix product of at least :data:`MIN_ROWS` rows (MKL's sgemm: measured, probed once per decoder on its
        own weights by :meth:`_rows_independent`, checked by ``tests/test_decoding_nodes.py``). Elsewhere (CUDA,
        other dtypes, several threads) every row runs every step, as it always has."""
        return (self.device.type == "cpu" and self.dtype == torch.float32 and torch.get_num_threads() == 1
                and self._rows_independent())

    def _rows_independent(self) -> bool:
        """Probe (once): rows of the text tower's and decoder's matrix products computed in batches of 64 and of
        4 to 33 of them are equal, bit for bit (random inputs, the model's own weights, one per shape)."""
        if self._rows_probe is None:
            g = torch.Generator().manual_seed(0)
            mats = {"projection": (self.dec.text_projection.T, None)}
            for module in [*self.text.transformer.modules(), *self.dec.modules()]:
                if isinstance(module, nn.MultiheadAttention):
                    mats.setdefault(("in", *module.in_proj_weight.shape), (module.in_proj_weight, module.in_proj_bias))
                    mats.setdefault(("q", self.width), (module.in_proj_weight[: self.width], None))
                elif isinstance(module, nn.Linear):
                    mats.setdefault(tuple(module.weight.shape), (module.weight, module.bias))
            ok = True
            for weight, bias in mats.values():
                x = torch.randn(64, weight.shape[1], generator=g).to(self.device, self.dtype)
                full = F.linear(x, weight, bias)
                for m in (MIN_ROWS, 5, 7, 13, 33):
                    idx = torch.randperm(64, generator=g)[:m]
                    ok = ok and torch.equal(F.linear(x[idx], weight, bias), full[idx])
            self._rows_probe = ok
        return self._rows_probe

    def query_classes(self, n_queries: int, n_keys: int) -> torch.Tensor:
        """Long (n_queries,): which cross-attention query positions compute alike, within this layout of
        ``n_queries`` queries per crop and across layouts (probed once per shape). The attention kernel runs a
        crop's queries in blocks and may round by block size (PyTorch's CPU flash attention: blocks of 32 queries,
        smaller at the end; a block of at most 3 goes through MKL's small-matrix path, and for some head sizes other
        block sizes differ too), so equal queries at two positions give equal outputs only within a class. Probe:
        two random queries, each at every position of a crop (laid out as :meth:`decoder_rows` lays them out) over
        random keys, the same for every layout; positions whose outputs match share a class (ids < 1024)."""
        hit = self._query_classes.get((n_queries, n_keys))
        if hit is None:
            g = torch.Generator().manual_seed(0)
            attn = self.dec.cross_attn[0].attn
            h, w = attn.num_heads, self.width
            q = torch.randn(2, 1, w, generator=g).expand(2, n_queries, w).contiguous()
            k, v = (torch.randn(2, h, n_keys, w // h, generator=g) for _ in range(2))
            q, k, v = (t.to(self.device, self.dtype) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q.view(2, n_queries, h, w // h).transpose(1, 2), k, v)
            rows = out.permute(2, 0, 1, 3).reshape(n_queries, -1).cpu().contiguous()
            ids = self._class_ids.setdefault(n_keys, {})
            hit = torch.tensor([ids.setdefault(r.numpy().tobytes(), len(ids)) for r in rows], device=self.device)
            if len(ids) >= 1024:
                raise RuntimeError("query_classes: more than 1024 numeric classes of attention queries")
            self._query_classes[(n_queries, n_keys)] = hit
        return hit

    def compact_queries(self, n_used: int, cls: int, n_keys: int) -> int | None:
        """The smallest layout of at least ``n_used`` queries per crop whose first ``n_used`` positions are all of
        :meth:`query_classes` class ``cls`` (None if none up to ``n_used + 64``): the queries of class ``cls`` may be
        laid out there instead of the full batch's layout, and compute the same numbers."""
        key = (n_used, cls, n_keys)
        if key not in self._compact:
            self._compact[key] = next((n for n in range(n_used, n_used + 65)
                                       if bool((self.query_classes(n, n_keys)[:n_used] == cls).all())), None)
        return self._compact[key]

    def check_length(self, seq_len: int) -> None:
        if seq_len > self.max_len:
            raise ValueError(f"seq_len={seq_len} exceeds the CoCa context length {self.max_len}; "
                             "lower captions.seq_len in the profile")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``model._encode_image`` -> (image_latent (B, E) L2-normalised, image_embs (B, n_tokens, W)); the same
        images again (bytes, shape, dtype, autocast state): the tensors of the first pass (do not change them)."""
        images = images.to(self.device, self.dtype)
        kind = self.device.type
        key = (hashlib.blake2b(images.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data,
                               digest_size=16).hexdigest(), tuple(images.shape), str(images.dtype),
               torch.is_autocast_enabled(kind), str(torch.get_autocast_dtype(kind)))
        hit = self.encode_memo.get(key)
        if hit is not None:
            return hit
        latent, embs = self.model._encode_image(images)
        self.encode_memo.put(key, (latent, embs))
        return latent, embs

    def _new_cache(self, blocks, rows: int, max_len: int, first_layer_rows: int | None = None) -> KVCache:
        keys, values = [], []
        for layer, b in enumerate(blocks):
            h = b.attn.num_heads
            n = first_layer_rows if layer == 0 and first_layer_rows is not None else rows
            shape = (n, h, max_len, self.width // h)
            keys.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            values.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
        return KVCache(keys, values)

    def new_text_cache(self, rows: int, max_len: int) -> KVCache:
        """Empty cache for ``rows`` prefixes of up to ``max_len`` tokens in the text tower."""
        return self._new_cache(self.text.transformer.resblocks, rows, max_len)

    def new_decoder_cache(self, rows: int, max_len: int, first_layer_rows: int | None = None) -> KVCache:
        """Empty self-attention cache for ``rows`` (crop, prefix) pairs in the multimodal decoder
        (``first_layer_rows``: the first layer's rows when it runs once per prefix, :class:`RowLayout`)."""
        return self._new_cache(self.dec.resblocks, rows, max_len, first_layer_rows)

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

        def attend(layer: int, qr: torch.Tensor) -> torch.Tensor:
            h = self.dec.cross_attn[layer].attn.num_heads
            qh = qr.view(c, q, h, w // h).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, cross.keys[layer], cross.values[layer])  # (C, H, Q, d)
            return o.transpose(1, 2).reshape(c * q, w)

        return self._decoder_layers(x.reshape(c * q, w), pos, cache, attend).view(c, q, w)

    @torch.no_grad()
    def decoder_rows(self, x: torch.Tensor, pos: int, cache: KVCache, cross: CrossKV,
                     layout: RowLayout) -> torch.Tensor:
        """:meth:`decoder_step` for the D rows of ``layout`` only (flat); returns ``ln_final`` hidden states (D, W).

        ``x``: (D, W) token embeddings, or (P, W) prefixes with ``layout.share``; ``cache``: D rows (its first
        layer P rows with ``share``). The cross-attention runs in :meth:`decoder_step`'s full layout (the queries
        written into a (C*Q, W) buffer at every position they stand for): the attention kernel computes a crop's
        queries in blocks and may round by block, so a position keeps the block it has in the full batch, and a
        decoder row stands for positions of one :meth:`query_classes` class only (the caller's part). The other
        operations are row by row; with at least :data:`MIN_ROWS` rows in a matrix product a row's result does not
        depend on the other rows (the caller keeps that many where the full batch had them).
        """
        c, q, w = layout.n_crops, layout.n_queries, x.shape[-1]
        if cross.n_crops != c:
            raise ValueError(f"decoder_rows: {c} crops in the layout but cross keys/values for {cross.n_crops}")
        buf = torch.zeros(c * q, w, device=x.device, dtype=x.dtype)
        crop, query = layout.pick // q, layout.pick % q

        def attend(layer: int, qr: torch.Tensor) -> torch.Tensor:
            h = self.dec.cross_attn[layer].attn.num_heads
            buf[layout.index] = qr.index_select(0, layout.source)
            qh = buf.view(c, q, h, w // h).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, cross.keys[layer], cross.values[layer])  # (C, H, Q, d)
            return o.transpose(1, 2)[crop, query].reshape(-1, w)

        return self._decoder_layers(x, pos, cache, attend, layout.share)

    def _decoder_layers(self, x: torch.Tensor, pos: int, cache: KVCache, attend, share=None) -> torch.Tensor:
        """The decoder's layers on flat rows x (R, W): self-attention block, cross-attention (``attend(layer, q)``
        -> the attention output of the query rows), MLP; ``share`` (D,): x holds prefixes, decoder row d reads
        ``x[share[d]]`` from the first cross-attention on (see :class:`RowLayout`). Returns ``ln_final`` of the rows."""
        w = x.shape[-1]
        for layer, (block, xblock) in enumerate(zip(self.dec.resblocks, self.dec.cross_attn)):
            x = self._self_attn_step(block, x, cache, layer, pos)
            attn = xblock.attn
            bq = attn.in_proj_bias[:w] if attn.in_proj_bias is not None else None
            qr = F.linear(xblock.ln_1(x), attn.in_proj_weight[:w], bq)
            if share is not None:  # the same prefix under several crops: the same values up to here
                x, qr, share = x.index_select(0, share), qr.index_select(0, share), None
            o = F.linear(attend(layer, qr), attn.out_proj.weight, attn.out_proj.bias)
            x = x + xblock.ls_1(o)
            x = x + xblock.ls_2(xblock.mlp(xblock.ln_2(x)))
        cache.length = pos + 1
        return self.dec.ln_final(x)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., W) -> next-token logits (..., vocab) (``@ text_decoder.text_projection``)."""
        return hidden @ self.dec.text_projection
