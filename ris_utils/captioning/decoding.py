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

On a float32 CPU decoder with one thread (``CocaDecoder.shares_rows``) sampling and beam search run the model
once per node of equal prefixes (the captions that share their prefix and crop / view), finished captions leave
the batch, and beam search runs one of its identical groups: the same tokens, bit for bit, with ~2-3x less work
(``tests/test_decoding_nodes.py`` checks every step's logits against the full batch's).

Files along these seams: :mod:`.decoder` (the KV-cached decoder, token ids, settings), :mod:`.sampling`,
:mod:`.beam`, and this module (the candidate set; it re-exports the others' public names).

Length conventions are open_clip's: a sequence is ``[sot, w1, ..., eot, pad...]`` of at most
``seq_len`` tokens (sot and eot included); EOT is banned while the prefix (sot included) is shorter than
``min_seq_len``; sampling forces EOT when the prefix reaches ``seq_len - 1`` tokens.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .beam import beam_search
from .decoder import (
    MAX_MASKS,
    MIN_MASKS,
    MIN_SEQ_LEN,
    SEQ_LEN,
    TEMPERATURE,
    CocaDecoder,
    CrossKV,
    DecodeSetting,
    KVCache,
    TokenIds,
    parse_settings,
)
from .noise import row_key
from .sampling import SampleResult, sample_captions, similarity_weights


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
    seq_len: int = SEQ_LEN,
    min_seq_len: int = MIN_SEQ_LEN,
    temperature: float = TEMPERATURE,
    min_masks: int = MIN_MASKS,
    max_masks: int = MAX_MASKS,
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
    results = _beam_rows(decoder, ids, embs, parsed, seq_len, min_seq_len)  # (mask, view, setting) -> token ids
    samples = [(si, s) for si, s in enumerate(parsed) if s.kind != "beam"]
    if samples:
        decode_kw = {"seq_len": seq_len, "min_seq_len": min_seq_len, "temperature": temperature,
                     "min_masks": min_masks, "max_masks": max_masks}
        results.update(_sample_rows(decoder, ids, embs, latents, samples, (seed, image_key, mask_indices),
                                    distinctive, decode_kw, max_rows))
    return [[_candidate(results[(i, v, si)], v, s.name, ids, decode, mode) for v in range(v_)
             for si, s in enumerate(parsed)] for i in range(n_)]


def _beam_rows(decoder: CocaDecoder, ids: TokenIds, embs: torch.Tensor, parsed: list[DecodeSetting], seq_len: int,
               min_seq_len: int) -> dict[tuple[int, int, int], list[int]]:
    """Token ids of the beam settings of (V, N, T, W) image tokens, keyed (mask, view, setting index), through the
    decoder's beam memo (beam search has no noise: both modes and every seed of an image give the same beams)."""
    v_, n_ = embs.shape[:2]
    results: dict[tuple[int, int, int], list[int]] = {}
    embs_hash = None
    for si, s in enumerate(parsed):
        if s.kind != "beam":
            continue
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
    return results


def _sample_rows(decoder: CocaDecoder, ids: TokenIds, embs: torch.Tensor, latents: torch.Tensor,
                 samples: list[tuple[int, DecodeSetting]], noise: tuple, distinctive: bool, decode_kw: dict,
                 max_rows: int) -> dict[tuple[int, int, int], list[int]]:
    """Token ids of the sample / greedy settings, keyed (mask, view, setting index), decoded in chunks of
    (views x settings) with at most ``max_rows`` decoder rows (N rows per prefix with the contrast).
    ``noise`` = (seed, image_key, mask_indices) of the rows' noise keys."""
    seed, image_key, mask_indices = noise
    v_, n_ = embs.shape[:2]
    contrast = distinctive and decode_kw["min_masks"] <= n_ <= decode_kw["max_masks"]
    per_setting = n_ * (n_ if contrast else 1)
    s_chunk = max(1, min(len(samples), max_rows // per_setting))
    v_chunk = max(1, max_rows // (per_setting * len(samples))) if s_chunk == len(samples) else 1
    results: dict[tuple[int, int, int], list[int]] = {}
    for v0 in range(0, v_, v_chunk):
        vs = list(range(v0, min(v_, v0 + v_chunk)))
        for s0 in range(0, len(samples), s_chunk):
            part = samples[s0: s0 + s_chunk]
            keys = np.array([[[row_key(seed, image_key, mask_indices[i], v, s.name) for i in range(n_)]
                              for _, s in part] for v in vs], dtype=np.uint64)
            res = sample_captions(decoder, ids, embs[vs], latents[vs], [s for _, s in part], keys,
                                  distinctive=distinctive, **decode_kw)
            toks = res.tokens.cpu()
            for a, v in enumerate(vs):
                for b, (si, _) in enumerate(part):
                    for i in range(n_):
                        results[(i, v, si)] = toks[a, b, i].tolist()
    return results


def _candidate(tokens: list[int], view: int, setting: str, ids: TokenIds, decode, mode: str) -> dict:
    """One candidate record: word ids, view, setting name, mode, and the text when a tokenizer decodes."""
    words = strip_special(tokens, ids)
    cand = {"tokens": words, "view": view, "setting": setting, "mode": mode}
    if decode is not None:
        cand["text"] = decode(words)
    return cand


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
