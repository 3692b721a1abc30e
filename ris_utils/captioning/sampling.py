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
    MIN_ROWS,
    MIN_SEQ_LEN,
    SEQ_LEN,
    TEMPERATURE,
    CocaDecoder,
    DecodeSetting,
    RowLayout,
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
    sampler = _NodeSampler if getattr(decoder, "shares_rows", False) else _Sampler
    run = sampler(decoder, ids, image_embs, image_latents if contrast else None, settings, keys, seq_len,
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
    view (V*N crops x S*N queries); otherwise once per row under its own crop. Every row runs every step (the
    reference; :class:`_NodeSampler` gives the same tokens with less work where ``decoder.shares_rows``).
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
        self.keys = keys.reshape(-1)
        self.contrast = latents is not None
        self.cross = decoder.cross_kv(image_embs.reshape(v_ * n_, t_, w_))  # crops (v, j), or (v, i) without contrast
        self.weights = similarity_weights(latents) if self.contrast else None  # (V, N_i, N_j)
        self._init_caches()

    def _init_caches(self) -> None:
        """Empty text / decoder caches: one row per row (per (row, crop) pair with the contrast)."""
        v_, s_, n_, _ = self.dims
        self.tcache = self.decoder.new_text_cache(self.rows, self.seq_len)
        self.dcache = self.decoder.new_decoder_cache(v_ * n_ * s_ * n_ if self.contrast else self.rows, self.seq_len)

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
        nxt = sample_inverse_cdf(probs, keyed_uniform(self.keys, pos).to(self.dev))
        return torch.where(self.greedy, probs.argmax(dim=-1), nxt)


class _NodeSampler(_Sampler):
    """:class:`_Sampler` (the same rows, rules and tokens; its :meth:`choose`) with the model run once per *node*,
    not once per row, where ``decoder.shares_rows`` (float32 on one CPU thread).

    The rows whose captions share their prefix so far and their crop (without the contrast) or view (with it: a
    prefix is read under every crop of its view) share one node, and the text / decoder caches hold nodes; a
    finished caption leaves (:meth:`_regroup`). With the contrast, the first decoder layer's self-attention runs
    once per node, not once per (node, crop): its input is the prefix alone
    (:class:`~ris_utils.captioning.decoder.RowLayout`). Every row's numbers are those of the full batch of rows
    (see :data:`MIN_ROWS`, :meth:`CocaDecoder.query_classes` and :meth:`CocaDecoder.decoder_rows`), so its tokens are:
    the shapes profile decodes ~3x fewer decoder rows in distinctive mode, ~2x fewer in naive mode.
    """

    def _init_caches(self) -> None:
        """Instead of the row caches: the full rows' settings and noise keys kept (:meth:`_select` takes the live
        rows' subset), the full batch's decoder states for the mixture, and the nodes' caches (:meth:`_init_nodes`)."""
        v_, s_, n_, w_ = self.dims
        self.row_sets, self.row_greedy, self.row_keys = self.sampling_set, self.greedy, self.keys
        self.hidden = torch.zeros(v_ * n_ * s_ * n_, w_, device=self.dev, dtype=self.decoder.dtype) \
            if self.contrast else None  # (V, Nj, S, Ni, W) decoder states of the full batch, for the mixture
        self._init_nodes()

    def _init_nodes(self) -> None:
        """Every row alive; one node per crop (view with the contrast); empty caches."""
        v_, s_, n_, _ = self.dims
        r = torch.arange(self.rows, device=self.dev)
        self.row_v, self.row_s, self.row_i = r // (s_ * n_), (r // n_) % s_, r % n_
        self.n_queries = s_ * n_ if self.contrast else s_
        query = self.row_s * n_ + self.row_i if self.contrast else self.row_s
        # rows share a node only within a class of query positions (:meth:`CocaDecoder.query_classes`), and not at
        # all when the full batch is below MIN_ROWS rows (its matrix products ran the small-matrix path)
        self.n_keys = self.cross.keys[0].shape[2]
        self.cls = self.decoder.query_classes(self.n_queries, self.n_keys)[query] if self.rows >= MIN_ROWS \
            else 1024 + r
        # the first decoder layer once per node (contrast, and enough rows for the MIN_ROWS rule to hold)
        self.share = self.contrast and self.rows >= MIN_ROWS
        group = self.row_v if self.contrast else self.row_v * n_ + self.row_i
        self.n_groups = v_ if self.contrast else v_ * n_
        self.live, self.node, self.node_group = r, group, torch.arange(self.n_groups, device=self.dev)
        parents, tokens = self._nodes(r, torch.full_like(r, self.ids.sot))
        self.node_tok = tokens
        u = len(parents)
        self.tcache = self.decoder.new_text_cache(u, self.seq_len)
        self.dcache = self.decoder.new_decoder_cache(u * n_ if self.contrast else u, self.seq_len,
                                                     u if self.share else None)
        self._select()

    def _nodes(self, keep: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``self.live[keep]`` with next tokens ``tokens`` -> their nodes (``self.node``, ``self.live`` set);
        returns each node's parent (its rows' node so far) and last token, topped up to ``MIN_ROWS`` nodes with
        copies of the first (read by no row) when the full batch has that many rows."""
        live, parent = self.live[keep], self.node[keep]
        key = (parent * (self.ids.vocab_size + 1) + tokens) * (1024 + self.rows) + self.cls[live]
        uniq, inverse = torch.unique(key, return_inverse=True)
        member = torch.zeros(len(uniq), dtype=torch.long, device=self.dev)
        member[inverse] = torch.arange(len(keep), device=self.dev)
        parents, toks = parent[member], tokens[member]
        if len(parents) < MIN_ROWS <= self.rows:
            extra = MIN_ROWS - len(parents)
            parents, toks = torch.cat([parents, parents[:1].expand(extra)]), torch.cat([toks, toks[:1].expand(extra)])
        self.live, self.node, self.node_group = live, inverse, self.node_group[parents]
        return parents, toks

    def _select(self) -> None:
        """The live rows' settings and noise keys, and the decoder layout of the nodes."""
        v_, s_, n_, _ = self.dims
        live = self.live
        rows = live.tolist()
        self.sampling_set = self.row_sets.subset(rows)
        self.greedy = self.row_greedy[live]
        self.keys = self.row_keys[np.asarray(rows, dtype=np.int64)]
        v, s, i = self.row_v[live], self.row_s[live], self.row_i[live]
        u = len(self.node_tok)
        if not self.contrast:  # node under its crop (v, i); query s
            index, source, d = (v * n_ + i) * s_ + s, self.node, u
        else:  # node under each crop (v, j) of its view; query (s, i)
            j = torch.arange(n_, device=self.dev)
            index = ((((v * n_)[:, None] + j) * s_ + s[:, None]) * n_ + i[:, None]).reshape(-1)
            source = (self.node[:, None] * n_ + j).reshape(-1)
            d = u * n_
            self.expand = torch.arange(u, device=self.dev).repeat_interleave(n_)
            self.own = self.node * n_ + i  # the decoder row of each live row under its own crop
        share = self.expand if self.contrast and self.share else None
        self.full_index, self.full_source = index, source  # where the decoder rows sit in the full batch
        self.layout = self._compact_layout(share)
        if self.layout is None:  # the full batch's layout
            pick = torch.zeros(d, dtype=torch.long, device=self.dev)
            pick[source] = index
            self.layout = RowLayout(v_ * n_, self.n_queries, index, source, pick, share)

    def _compact_layout(self, share: torch.Tensor | None) -> RowLayout | None:
        """The cross-attention laid out over the nodes only: crop c's queries are the nodes read under it (slots
        0, 1, ... of its group), in a layout whose used positions compute as the full batch's
        (:meth:`CocaDecoder.compact_queries`); None when the live rows' positions are not all of one class."""
        cls = self.cls[self.live]
        if self.rows < MIN_ROWS or not bool((cls == cls[0]).all()):
            return None
        group, n_ = self.node_group, self.dims[2]
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=self.n_groups)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(group)
        slot[order] = torch.arange(len(group), device=self.dev) - starts[group[order]]
        q = self.decoder.compact_queries(int(counts.max()), int(cls[0]), self.n_keys)
        if q is None:
            return None
        if self.contrast:  # decoder row (node, j) under crop (view, j)
            j = torch.arange(n_, device=self.dev)
            index = ((group[:, None] * n_ + j) * q + slot[:, None]).reshape(-1)
        else:  # node under its crop
            index = group * q + slot
        return RowLayout(self.dims[0] * n_, q, index, torch.arange(len(index), device=self.dev), index, share)

    def _regroup(self, done: torch.Tensor, tokens: torch.Tensor) -> None:
        """After a step: keep the live rows not ``done`` (at least ``min(MIN_ROWS, live)``, topped up with finished
        rows, whose tokens are ignored), group them into the next nodes (node so far + this token); the caches
        follow (a node's cache rows are its parent's)."""
        keep = (~done).nonzero().flatten()
        n_min = min(MIN_ROWS, len(done))
        if len(keep) < n_min:
            keep = torch.cat([keep, done.nonzero().flatten()[: n_min - len(keep)]]).sort().values
        parents, self.node_tok = self._nodes(keep, tokens[keep])
        self.tcache.keep_rows(parents)
        if self.contrast:
            n_ = self.dims[2]
            rows = (parents[:, None] * n_ + torch.arange(n_, device=self.dev)).reshape(-1)
            self.dcache.keep_rows(rows, parents if self.share else None)
        else:
            self.dcache.keep_rows(parents)
        self._select()

    def decode(self) -> torch.Tensor:
        """Tokens (V, S, N, seq_len): ``[sot, ..., eot, pad...]``."""
        ids, r_, dev, seq_len = self.ids, self.rows, self.dev, self.seq_len
        tokens = torch.full((r_, seq_len), ids.pad, dtype=torch.long, device=dev)
        tokens[:, 0] = ids.sot
        done = torch.zeros(r_, dtype=torch.bool, device=dev)
        for pos in range(seq_len - 1):
            live = self.live
            if pos + 2 == seq_len:  # open_clip: the last position is always EOT (no forward pass: nothing reads it)
                nxt = torch.full((len(live),), ids.eot, dtype=torch.long, device=dev)
            else:
                z, c = self.node_logits(pos)
                nxt = self.choose(tokens[live, : pos + 1], z, c, pos)
            was = done[live]
            nxt = torch.where(was, torch.full_like(nxt, ids.pad), nxt)
            tokens[live, pos + 1] = nxt
            now = was | (nxt == ids.eot) | (nxt == ids.pad)
            done[live] = now
            if bool(done.all()):
                break
            self._regroup(now, nxt)
        v_, s_, n_, _ = self.dims
        return tokens.view(v_, s_, n_, seq_len)

    def node_logits(self, pos: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L, vocab) logits ``z`` of every live row under its own crop and, with the contrast, the
        ``s_ij``-weighted mixture ``c`` of the other crops' (mixed before the linear output projection, over the full
        batch's (V, S, N, N) states, as the einsum has always run); ``c`` is None without it."""
        v_, s_, n_, w_ = self.dims
        decoder = self.decoder
        e = decoder.text_step(self.node_tok, pos, self.tcache)  # (U, W): one row per node
        if not self.contrast:
            h = decoder.decoder_rows(e, pos, self.dcache, self.cross, self.layout)  # (U, W)
            return decoder.project(h).index_select(0, self.node), None
        x = e if self.share else e.index_select(0, self.expand)
        h = decoder.decoder_rows(x, pos, self.dcache, self.cross, self.layout)  # (U*N, W): (node, crop j)
        self.hidden[self.full_index] = h.index_select(0, self.full_source)
        full = self.hidden.view(v_, n_, s_, n_, w_).permute(0, 2, 3, 1, 4)  # (V, S, Ni, Nj, W)
        mix = torch.einsum("vsijw,vij->vsiw", full, self.weights)  # (1/(N-1)) sum_{j!=i} s_ij h_j
        mix = mix.reshape(self.rows, w_).index_select(0, self.live)
        return decoder.project(h.index_select(0, self.own)), decoder.project(mix)
