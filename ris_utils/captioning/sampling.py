"""Caption sampling of one image: greedy / top-k / top-p / temperature, plain or distinctive (the contrast
term of Pseudo-RIS Sec. 3.2), all masks x views x settings decoded as one batch on the KV-cached decoder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .decoder import (
    MAX_MASKS,
    MIN_MASKS,
    MIN_SEQ_LEN,
    SEQ_LEN,
    TEMPERATURE,
    CocaDecoder,
    DecodeSetting,
    TokenIds,
)
from .noise import keyed_uniform, sample_inverse_cdf
from .processors import FILTER_VALUE, DistinctiveContrast, MinLengthLogitsProcessor, SamplingSetProcessor


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
    seq_len: int = SEQ_LEN,
    min_seq_len: int = MIN_SEQ_LEN,
    temperature: float = TEMPERATURE,
    min_masks: int = MIN_MASKS,
    max_masks: int = MAX_MASKS,
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
    keys = _checked_keys(image_embs, settings, keys, seq_len, min_seq_len)
    decoder.check_length(seq_len)
    n_ = image_embs.shape[1]
    contrast = bool(distinctive) and min_masks <= n_ <= max_masks
    run = _Sampler(decoder, ids, image_embs, image_latents if contrast else None, settings, keys, seq_len,
                   min_seq_len, temperature)
    return SampleResult(run.decode(), contrast)


def _checked_keys(image_embs: torch.Tensor, settings: list[DecodeSetting], keys, seq_len: int,
                  min_seq_len: int) -> np.ndarray:
    """The (V, S, N) uint64 noise keys of a :func:`sample_captions` call, after checking its shapes and settings."""
    if image_embs.dim() != 4:
        raise ValueError(f"image_embs must be (V, N, n_tokens, W), got shape {tuple(image_embs.shape)}")
    v_, n_ = image_embs.shape[:2]
    s_ = len(settings)
    for s in settings:
        if s.kind not in ("sample", "greedy"):
            raise ValueError(f"sample_captions: setting {s.name!r} is {s.kind}; use beam_search for beams")
    keys = np.asarray(keys, dtype=np.uint64)
    if keys.shape != (v_, s_, n_):
        raise ValueError(f"keys must have shape (V, S, N) = {(v_, s_, n_)}, got {keys.shape}")
    if seq_len <= min_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
    return keys


class _Sampler:
    """One :func:`sample_captions` call: R = V*S*N rows ordered (view, setting, mask), their caches and rules.

    ``latents`` (V, N, E) given = the contrast term is on: the decoder runs each prefix under all N crops of its
    view (V*N crops x S*N queries); otherwise once per row under its own crop.
    """

    def __init__(self, decoder: CocaDecoder, ids: TokenIds, image_embs: torch.Tensor, latents: torch.Tensor | None,
                 settings: list[DecodeSetting], keys: np.ndarray, seq_len: int, min_seq_len: int,
                 temperature: float):
        v_, n_, t_, w_ = image_embs.shape
        s_ = len(settings)
        self.decoder, self.ids, self.seq_len = decoder, ids, seq_len
        self.dims, self.rows, self.dev = (v_, s_, n_, w_), v_ * s_ * n_, decoder.device
        # per-row settings, rows ordered (view, setting, mask)
        row_k = [s.top_k for s in settings for _ in range(n_)] * v_
        row_p = [s.top_p for s in settings for _ in range(n_)] * v_
        self.greedy = torch.tensor([s.kind == "greedy" for s in settings for _ in range(n_)] * v_, device=self.dev)
        self.sampling_set = SamplingSetProcessor(row_k, row_p)
        self.min_len = MinLengthLogitsProcessor(min_seq_len, ids.eot)
        self.rule = DistinctiveContrast(ids.eot, temperature)
        self.flat_keys = keys.reshape(-1)
        self.tcache = decoder.new_text_cache(self.rows, seq_len)
        self.contrast = latents is not None
        self.cross = decoder.cross_kv(image_embs.reshape(v_ * n_, t_, w_))  # crops (v, j), or (v, i) without contrast
        self.dcache = decoder.new_decoder_cache(v_ * n_ * s_ * n_ if self.contrast else self.rows, seq_len)
        self.weights = similarity_weights(latents) if self.contrast else None  # (V, N_i, N_j)

    def decode(self) -> torch.Tensor:
        """Tokens (V, S, N, seq_len): ``[sot, ..., eot, pad...]``."""
        ids, r_, dev, seq_len = self.ids, self.rows, self.dev, self.seq_len
        tokens = torch.full((r_, seq_len), ids.pad, dtype=torch.long, device=dev)
        tokens[:, 0] = ids.sot
        done = torch.zeros(r_, dtype=torch.bool, device=dev)
        for pos in range(seq_len - 1):
            if pos + 2 == seq_len:  # open_clip: the last position is always EOT (no forward pass: nothing reads it)
                nxt = torch.full((r_,), ids.eot, dtype=torch.long, device=dev)
            else:
                z, c = self.logits(tokens[:, pos], pos)
                nxt = self.choose(tokens[:, : pos + 1], z, c, pos)
            nxt = torch.where(done, torch.full_like(nxt, ids.pad), nxt)
            tokens[:, pos + 1] = nxt
            done |= (nxt == ids.eot) | (nxt == ids.pad)
            if bool(done.all()):
                break
        v_, s_, n_, _ = self.dims
        return tokens.view(v_, s_, n_, seq_len)

    def logits(self, last: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, vocab) logits ``z`` of every row's own crop and, with the contrast, the ``s_ij``-weighted mixture
        ``c`` of the other crops' (mixed before the linear output projection); ``c`` is None without it."""
        v_, s_, n_, w_ = self.dims
        decoder, r_ = self.decoder, self.rows
        e = decoder.text_step(last, pos, self.tcache)  # (R, W)
        if not self.contrast:
            x = e.view(v_, s_, n_, w_).permute(0, 2, 1, 3).reshape(v_ * n_, s_, w_)
            h = decoder.decoder_step(x, pos, self.dcache, self.cross).view(v_, n_, s_, w_).permute(0, 2, 1, 3)
            return decoder.project(h).reshape(r_, -1), None
        x = e.view(v_, 1, s_ * n_, w_).expand(v_, n_, s_ * n_, w_).reshape(v_ * n_, s_ * n_, w_)
        h = decoder.decoder_step(x, pos, self.dcache, self.cross).view(v_, n_, s_, n_, w_)  # (V, Nj, S, Ni, W)
        h = h.permute(0, 2, 3, 1, 4)  # (V, S, Ni, Nj, W)
        own = torch.diagonal(h, dim1=2, dim2=3).permute(0, 1, 3, 2)  # (V, S, N, W)
        mix = torch.einsum("vsijw,vij->vsiw", h, self.weights)  # (1/(N-1)) sum_{j!=i} s_ij h_j
        return decoder.project(own).reshape(r_, -1), decoder.project(mix).reshape(r_, -1)

    def choose(self, prefix: torch.Tensor, z: torch.Tensor, c: torch.Tensor | None, pos: int) -> torch.Tensor:
        """The next token of every row: min-length rule, top-k / top-p set, the contrast rule (when ``c`` is
        given) or a plain softmax, keyed inverse-CDF sampling (argmax for greedy rows)."""
        z = self.min_len(prefix, z.float())
        removed = self.sampling_set.removed(z)
        zf = z.masked_fill(removed, FILTER_VALUE)
        if c is not None:
            probs = self.rule(prefix, zf, c.float(), removed)
        else:
            probs = torch.softmax(zf / self.rule.temperature, dim=-1)
        nxt = sample_inverse_cdf(probs, keyed_uniform(self.flat_keys, pos).to(self.dev))
        return torch.where(self.greedy, probs.argmax(dim=-1), nxt)
