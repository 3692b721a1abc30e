"""Group (diverse) beam search on the KV-cached decoder: open_clip's ``CoCa.generate(generation_type=
"beam_search")`` without ``transformers``."""

from __future__ import annotations

import torch

from .decoder import (
    BEAM_HYPOTHESES,
    MIN_ROWS,
    MIN_SEQ_LEN,
    SEQ_LEN,
    CocaDecoder,
    RowLayout,
    TokenIds,
)
from .processors import MinLengthLogitsProcessor


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
    seq_len: int = SEQ_LEN,
    min_seq_len: int = MIN_SEQ_LEN,
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
    _check_beam_args(num_beams, num_beam_groups, seq_len, min_seq_len, diversity_penalty, hypotheses)
    decoder.check_length(seq_len)
    if diversity_penalty == 0 and hypotheses == "per_group" and getattr(decoder, "shares_rows", False):
        # the groups are the same search (same start, no penalty, their own hypotheses and done flags) and a
        # row's logits do not depend on the batch: one group gives the same beams (the best's ties included:
        # the groups' equal copies sort together and the last copy of the last best wins either way)
        # (the first group's rows keep their places in the full batch's layout of num_beams rows per crop)
        full, num_beams, num_beam_groups = num_beams, num_beams // num_beam_groups, 1
    else:
        full = num_beams
    search = _GroupBeamSearch(decoder, ids, image_embs, num_beams, num_beam_groups, seq_len, min_seq_len,
                              diversity_penalty, length_penalty, shared=hypotheses == "shared", full_beams=full)
    while not search.step():
        pass
    return search.best()


def _check_beam_args(num_beams: int, num_beam_groups: int, seq_len: int, min_seq_len: int,
                     diversity_penalty: float, hypotheses: str) -> None:
    if hypotheses not in BEAM_HYPOTHESES:
        raise ValueError(f"beam hypotheses must be one of {BEAM_HYPOTHESES}, got {hypotheses!r}")
    if num_beams < 2 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beams ({num_beams}) must be >= 2 and divisible by num_beam_groups "
                         f"({num_beam_groups})")
    if seq_len <= min_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
    if diversity_penalty < 0:
        raise ValueError(f"diversity_penalty must be >= 0, got {diversity_penalty}")


class _GroupBeamSearch:
    """The state of one :func:`beam_search` call over B crops: ``num_beams`` rows per crop in ``num_beam_groups``
    groups of ``gs`` beams, their scores, finished hypotheses and done flags (one per group, or one per caption
    when ``shared``)."""

    def __init__(self, decoder: CocaDecoder, ids: TokenIds, image_embs: torch.Tensor, nb: int, ng: int,
                 seq_len: int, min_seq_len: int, diversity_penalty: float, length_penalty: float, *, shared: bool,
                 full_beams: int | None = None):
        b_, _, w_ = image_embs.shape
        gs = nb // ng
        dev = decoder.device
        r_ = b_ * nb
        self.decoder, self.ids, self.seq_len, self.shared = decoder, ids, seq_len, shared
        self.b_, self.nb, self.ng, self.gs, self.w_, self.r_, self.dev = b_, nb, ng, gs, w_, r_, dev
        self.diversity_penalty = diversity_penalty
        self.cross = decoder.cross_kv(image_embs)
        self.min_len = MinLengthLogitsProcessor(min_seq_len, ids.eot)
        self.input_ids = torch.full((r_, 1), ids.sot, dtype=torch.long, device=dev)
        model = _BeamNodes if getattr(decoder, "shares_rows", False) else _BeamRows
        self.nodes = model(decoder, ids, b_, nb, seq_len, image_embs.shape[1], full_beams or nb)
        beam_scores = torch.full((b_, nb), -1e9, dtype=torch.float, device=dev)
        beam_scores[:, ::gs] = 0
        self.beam_scores = beam_scores.view(-1)
        if shared:  # one heap of num_beams per caption, the same object for every group
            self.hyps = [[h] * ng for h in (_Hypotheses(nb, length_penalty) for _ in range(b_))]
        else:
            self.hyps = [[_Hypotheses(gs, length_penalty) for _ in range(ng)] for _ in range(b_)]
        self.add_len = 0 if shared else 1  # legacy lengths: the hypothesis without its eot
        self.done = [[False] * ng for _ in range(b_)]
        self.group_rows = [torch.tensor([b * nb + k for b in range(b_) for k in range(g * gs, (g + 1) * gs)],
                                        device=dev) for g in range(ng)]

    def step(self) -> bool:
        """Extend every beam of every group by one token; True when the search is over."""
        cur = self.input_ids.shape[1]
        logits = self.nodes.logits(cur - 1, self.cross).float()
        current_tokens = torch.zeros(self.r_, dtype=torch.long, device=self.dev)
        reorder = torch.zeros(self.r_, dtype=torch.long, device=self.dev)
        for g in range(self.ng):
            self._group_step(g, logits, cur, current_tokens, reorder)
        self.input_ids = torch.cat([self.input_ids, current_tokens.unsqueeze(-1)], dim=-1)
        over = all(all(d) for d in self.done) or self.input_ids.shape[1] >= self.seq_len
        if not over:
            self.nodes.advance(reorder, current_tokens)
        return over

    def _group_step(self, g: int, logits: torch.Tensor, cur: int, current_tokens: torch.Tensor,
                    reorder: torch.Tensor) -> None:
        b_, nb, gs, dev = self.b_, self.nb, self.gs, self.dev
        vocab = logits.shape[-1]
        rows = self.group_rows[g]
        gids = self.input_ids[rows]
        scores = self.min_len(gids, logits[rows])
        if self.diversity_penalty > 0 and g > 0:
            prev = current_tokens.view(b_, nb)[:, : g * gs]  # tokens chosen by earlier groups
            freq = torch.zeros(b_, vocab, device=dev).scatter_add_(1, prev, torch.ones_like(prev, dtype=torch.float))
            scores = scores - self.diversity_penalty * freq.repeat_interleave(gs, dim=0)
        cand = (scores + self.beam_scores[rows].unsqueeze(-1)).view(b_, gs * vocab)
        top_s, top_i = torch.topk(cand, 2 * gs, dim=1, largest=True, sorted=True)
        src_beam, tok = top_i // vocab, top_i % vocab
        # next beams as Python lists (scores are float32 values, stored back into float32 exactly)
        nxt = ([0.0] * (b_ * gs), [0] * (b_ * gs), [0] * (b_ * gs))  # scores, tokens, source rows
        top_s_l, tok_l, src_l = top_s.tolist(), tok.tolist(), src_beam.tolist()
        for b in range(b_):
            self._advance(b, g, gids, cur, top_s_l[b], tok_l[b], src_l[b], nxt)
        nbs, nbt, nbi = nxt
        nbi = torch.tensor(nbi, dtype=torch.long, device=dev)
        self.beam_scores[rows] = torch.tensor(nbs, dtype=self.beam_scores.dtype, device=dev)
        self.input_ids[rows] = gids[nbi]
        current_tokens[rows] = torch.tensor(nbt, dtype=torch.long, device=dev)
        reorder[rows] = rows[nbi]

    def _advance(self, b: int, g: int, gids: torch.Tensor, cur: int, sb: list, tb: list, rb: list,
                 nxt: tuple[list, list, list]) -> None:
        """Caption ``b``, group ``g``: finished candidates (eot in the first ``gs`` ranks) go to the hypotheses,
        the best ``gs`` others become the group's next beams (written into ``nxt``)."""
        nbs, nbt, nbi = nxt
        gs, ids = self.gs, self.ids
        if self.done[b][g]:
            nbt[b * gs: (b + 1) * gs] = [ids.pad] * gs
            return
        k = 0
        for rank in range(2 * gs):
            src = b * gs + rb[rank]
            if tb[rank] == ids.eot:
                if rank >= gs:
                    continue
                self.hyps[b][g].add(gids[src].clone(), sb[rank], cur + self.add_len)
            else:
                j = b * gs + k
                nbs[j], nbt[j], nbi[j] = sb[rank], tb[rank], src
                k += 1
            if k == gs:
                break
        self.done[b][g] = self.done[b][g] or self.hyps[b][g].is_done(max(sb), cur + self.add_len)
        if self.shared and self.done[b][g]:  # one flag per caption
            self.done[b] = [True] * self.ng

    def best(self) -> list[list[int]]:
        """The best finished hypothesis of every caption (unfinished beams are added first)."""
        input_ids, beam_scores, gs = self.input_ids, self.beam_scores, self.gs
        out = []
        for b in range(self.b_):
            for g in range(self.ng):
                if self.done[b][g]:
                    continue
                for k in range(gs):
                    row = b * self.nb + g * gs + k
                    self.hyps[b][g].add(input_ids[row], beam_scores[row].item(), input_ids.shape[1])
            hyps = self.hyps[b]
            cands = hyps[0].beams if self.shared else [beam for g in range(self.ng) for beam in hyps[g].beams]
            best = sorted(cands, key=lambda x: x[0]).pop()[1].tolist()
            if len(best) < self.seq_len:
                best.append(self.ids.eot)
            out.append(best)
        return out


class _BeamRows:
    """The model side of a beam search: every row (crop b, beam k) of the B*num_beams runs every step (the
    reference; :class:`_BeamNodes` gives the same logits with less work where ``decoder.shares_rows``)."""

    def __init__(self, decoder: CocaDecoder, ids: TokenIds, b_: int, nb: int, seq_len: int, n_keys: int,
                 full_beams: int):
        self.decoder, self.b_, self.nb = decoder, b_, nb
        self.tcache = decoder.new_text_cache(b_ * nb, seq_len)
        self.dcache = decoder.new_decoder_cache(b_ * nb, seq_len)
        self.last = torch.full((b_ * nb,), ids.sot, dtype=torch.long, device=decoder.device)

    def logits(self, pos: int, cross) -> torch.Tensor:
        """(rows, vocab) next-token logits at position ``pos``."""
        e = self.decoder.text_step(self.last, pos, self.tcache)
        hidden = self.decoder.decoder_step(e.view(self.b_, self.nb, -1), pos, self.dcache, cross)
        return self.decoder.project(hidden).view(self.b_ * self.nb, -1)

    def advance(self, reorder: torch.Tensor, tokens: torch.Tensor) -> None:
        """Row r becomes row ``reorder[r]`` + ``tokens[r]``."""
        self.last = tokens
        self.tcache.reorder(reorder)
        self.dcache.reorder(reorder)


class _BeamNodes:
    """The model side of a beam search: the B*num_beams rows (crop b, beam k) run the model once per *node*, the rows
    of a crop whose prefixes are equal (every beam at the first step; the beam groups' identical searches when
    there is no diversity penalty), with the text / decoder caches holding nodes. Each row's logits are those of
    the full batch (:class:`~ris_utils.captioning.decoder.RowLayout`, :data:`~ris_utils.captioning.decoder.MIN_ROWS`)."""

    def __init__(self, decoder: CocaDecoder, ids: TokenIds, b_: int, nb: int, seq_len: int, n_keys: int,
                 full_beams: int):
        self.decoder, self.ids, self.b_, self.nb, self.full_beams = decoder, ids, b_, nb, full_beams
        r_, dev = b_ * nb, decoder.device
        self.rows, self.full_rows = r_, b_ * full_beams
        r = torch.arange(r_, device=dev)
        # rows share a node only within a class of query positions (:meth:`CocaDecoder.query_classes`) of the full
        # batch's layout, and not at all when the full batch is below MIN_ROWS rows (the small-matrix path)
        self.cls = decoder.query_classes(full_beams, n_keys)[r % nb] if self.full_rows >= MIN_ROWS else 1024 + r
        self.node = r // nb  # one node per crop: every prefix is [sot]
        parents = self._regroup(r, torch.full((r_,), ids.sot, dtype=torch.long, device=dev))
        self.tcache = decoder.new_text_cache(len(parents), seq_len)
        self.dcache = decoder.new_decoder_cache(len(parents), seq_len)

    def _regroup(self, parent_rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Row r continues row ``parent_rows[r]`` with ``tokens[r]``: the new nodes (``self.node``, the nodes' last
        tokens and layout set); returns each node's parent node (topped up to ``MIN_ROWS`` with copies of the
        first, read by no row, when the batch has that many rows)."""
        parent = self.node[parent_rows]
        # the crop in the key too: a finished group's rows all continue the first row of the batch (padding)
        crop = torch.arange(self.rows, device=parent.device) // self.nb
        key = ((parent * (self.ids.vocab_size + 1) + tokens) * self.b_ + crop) * (1024 + self.rows) + self.cls
        uniq, inverse = torch.unique(key, return_inverse=True)
        member = torch.zeros(len(uniq), dtype=torch.long, device=key.device)
        member[inverse] = torch.arange(self.rows, device=key.device)
        parents, toks = parent[member], tokens[member]
        if len(parents) < MIN_ROWS <= self.full_rows:
            extra = MIN_ROWS - len(parents)
            parents, toks = torch.cat([parents, parents[:1].expand(extra)]), torch.cat([toks, toks[:1].expand(extra)])
        self.node, self.node_tok = inverse, toks
        index = crop * self.full_beams + torch.arange(self.rows, device=key.device) % self.nb  # place in the full batch
        pick = torch.zeros(len(parents), dtype=torch.long, device=key.device)
        pick[inverse] = index
        self.layout = RowLayout(self.b_, self.full_beams, index, inverse, pick)
        return parents

    def logits(self, pos: int, cross) -> torch.Tensor:
        """(rows, vocab) next-token logits at position ``pos`` (the last tokens are the nodes')."""
        e = self.decoder.text_step(self.node_tok, pos, self.tcache)
        h = self.decoder.decoder_rows(e, pos, self.dcache, cross, self.layout)
        return self.decoder.project(h).index_select(0, self.node)

    def advance(self, reorder: torch.Tensor, tokens: torch.Tensor) -> None:
        """Row r becomes row ``reorder[r]`` + ``tokens[r]``; the caches follow (a node's rows are its parent's)."""
        parents = self._regroup(reorder, tokens)
        self.tcache.keep_rows(parents)
        self.dcache.keep_rows(parents)
