"""Decoding rules as small composable logits processors (transformers' ``LogitsProcessor`` style).

Every rule is a class with one signature ``proc(input_ids, scores) -> scores``:
``input_ids`` (B, T) LongTensor = the current prefixes (sot first), ``scores`` (B, V) float = next-token
logits. Processors never modify ``scores`` in place. Arguments are validated in ``__init__``.

Order used by the captioner (the order of open_clip's ``CoCa.generate`` and the authors' code):
min length -> top-k / top-p (the *sampling set*) -> temperature (applied inside the softmax).

Per-row settings: :class:`TopKLogitsProcessor` and :class:`TopPLogitsProcessor` accept one value per
row, so rows with different sampling settings (the paper's 10 settings) are filtered in one batch;
``top_k=0`` / ``top_p=1.0`` leave a row unfiltered.

No dependency on ``transformers``: the semantics follow its ``TopKLogitsWarper`` (ties with the k-th
score are kept), ``TopPLogitsWarper`` (remove the tokens whose ascending cumulative probability is
``<= 1 - top_p``, keep at least ``min_tokens_to_keep``) and ``MinLengthLogitsProcessor`` (EOT banned
while ``input_ids.shape[-1] < min_length``, sot included in the length), which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FILTER_VALUE = -math.inf


def _per_row(values, name: str, check, what: str) -> list:
    """Validate a scalar or a sequence of per-row values; return a list."""
    vals = list(values) if isinstance(values, (list, tuple)) else [values]
    if not vals:
        raise ValueError(f"{name} must not be empty")
    for v in vals:
        if not check(v):
            raise ValueError(f"{name} must be {what}, got {v!r}")
    return vals


def _expand(vals: list, batch: int, name: str) -> list:
    if len(vals) == 1:
        return vals * batch
    if len(vals) != batch:
        raise ValueError(f"{name} has {len(vals)} per-row values but the batch has {batch} rows")
    return vals


def _min_keep(min_tokens_to_keep) -> int:
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
    return min_tokens_to_keep


class LogitsProcessor:
    """Base class: ``__call__(input_ids (B, T) long, scores (B, V) float) -> scores (B, V)``."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class LogitsProcessorList(list):
    """Apply processors in order: ``scores = p_n(ids, ... p_1(ids, scores))``."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        for proc in self:
            scores = proc(input_ids, scores)
        return scores


class MinLengthLogitsProcessor(LogitsProcessor):
    """Ban end-of-text while the prefix (sot included) is shorter than ``min_length``.

    ``scores[:, eos] = -inf`` if ``input_ids.shape[-1] < min_length`` (open_clip's ``min_seq_len`` = 5:
    at least 4 words before EOT).
    """

    def __init__(self, min_length: int, eos_token_id: int):
        if not isinstance(min_length, int) or isinstance(min_length, bool) or min_length < 0:
            raise ValueError(f"min_length must be a non-negative int, got {min_length!r}")
        if not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"eos_token_id must be a non-negative int, got {eos_token_id!r}")
        self.min_length = min_length
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] >= self.min_length:
            return scores
        out = scores.clone()
        out[:, self.eos_token_id] = FILTER_VALUE
        return out


class TemperatureLogitsProcessor(LogitsProcessor):
    """``scores / temperature`` (temperature > 0; 1.0 = unchanged)."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        return scores if self.temperature == 1.0 else scores / self.temperature


class TopKLogitsProcessor(LogitsProcessor):
    """Keep the ``top_k`` highest scores of each row (ties with the k-th kept), set the rest to -inf.

    Arguments:
        top_k: int >= 0, or one int per row; 0 = no filtering for that row.
        min_tokens_to_keep: at least this many tokens survive.
    """

    def __init__(self, top_k: int | Sequence[int], min_tokens_to_keep: int = 1,
                 filter_value: float = FILTER_VALUE):
        self.top_k = _per_row(top_k, "top_k", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                              "an int >= 0 (0 = off) or a list of them")
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)
        self.filter_value = filter_value

    def removed(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool (B, V): True where a token falls outside the row's top-k set."""
        b, v = scores.shape
        ks = _expand(self.top_k, b, "top_k")
        k = torch.tensor([v if kk == 0 else min(max(kk, self.min_tokens_to_keep), v) for kk in ks],
                         device=scores.device)
        kmax = int(k.max())
        top = torch.topk(scores, kmax, dim=-1).values  # (B, kmax) descending
        kth = top.gather(1, (k - 1).unsqueeze(1))  # (B, 1)
        return scores < kth

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.removed(scores), self.filter_value)


class TopPLogitsProcessor(LogitsProcessor):
    """Nucleus filtering: keep the smallest high-probability set with cumulative probability >= top_p.

    As transformers' ``TopPLogitsWarper`` (and the authors' ``DependentTotalLogitsWarper``,
    ``coca_model.py`` l. 1344-1351 at de5d124): sort ascending, remove tokens whose cumulative probability is
    ``<= 1 - top_p``; the ``min_tokens_to_keep`` most probable tokens always survive. The threshold is
    computed as they compute it: ``1 - top_p`` in Python (float64), then compared with the scores' dtype
    (PyTorch casts a Python scalar to the tensor's dtype): for ``top_p = 0.6`` that is ``float32(0.4)``
    = 0.40000001, not ``1 - float32(0.6)`` = 0.39999998, so a cumulative probability of exactly
    ``float32(0.4)`` is removed, as there.

    Arguments:
        top_p: float in (0, 1], or one per row; 1.0 = no filtering for that row.
    """

    def __init__(self, top_p: float | Sequence[float], min_tokens_to_keep: int = 1,
                 filter_value: float = FILTER_VALUE):
        self.top_p = [float(p) for p in _per_row(
            top_p, "top_p", lambda p: isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 < p <= 1.0,
            "a float in (0, 1] or a list of them")]
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)
        self.filter_value = filter_value

    def removed(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool (B, V): True where a token falls outside the row's nucleus."""
        b, _ = scores.shape
        pl = _expand(self.top_p, b, "top_p")
        ps = torch.tensor(pl, dtype=torch.float64, device=scores.device)
        thr = torch.tensor([1 - p for p in pl], dtype=torch.float64).to(scores.dtype).to(scores.device)
        sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cum <= thr.unsqueeze(1)
        sorted_remove[:, -self.min_tokens_to_keep:] = False
        sorted_remove[ps >= 1.0] = False
        return sorted_remove.scatter(1, sorted_idx, sorted_remove)

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.removed(scores), self.filter_value)


def _checked(cls, name: str, values: list):
    """A :class:`TopKLogitsProcessor` / :class:`TopPLogitsProcessor` of per-row ``values`` already validated (by
    :class:`SamplingSetProcessor`), built without checking them one by one again."""
    out = cls.__new__(cls)
    setattr(out, name, values)
    out.min_tokens_to_keep, out.filter_value = 1, FILTER_VALUE
    return out


class SamplingSetProcessor(LogitsProcessor):
    """Per-row top-k or top-p filter for a batch mixing the two (one ``(top_k, top_p)`` pair per row).

    Row r is filtered by top-k when ``top_k[r] > 0``, else by top-p when ``top_p[r] < 1``, else not at all
    (the paper's settings use one of the two per caption).
    """

    def __init__(self, top_k: Sequence[int], top_p: Sequence[float]):
        if len(top_k) != len(top_p):
            raise ValueError(f"top_k and top_p need one value per row each, got {len(top_k)} and {len(top_p)}")
        top_k, top_p = list(top_k), list(top_p)
        TopKLogitsProcessor(top_k), TopPLogitsProcessor(top_p)  # validate
        self._build(top_k, top_p)

    def _build(self, top_k: list, top_p: list) -> None:
        self.top_k, self.top_p = top_k, top_p
        self.rows_k = [r for r, k in enumerate(top_k) if k > 0]
        self.rows_p = [r for r, (k, p) in enumerate(zip(top_k, top_p)) if k == 0 and p < 1.0]
        self.k = _checked(TopKLogitsProcessor, "top_k", [top_k[r] for r in self.rows_k]) if self.rows_k else None
        self.p = _checked(TopPLogitsProcessor, "top_p", [float(top_p[r]) for r in self.rows_p]) if self.rows_p else None
        self.n_rows = len(top_k)

    def subset(self, rows: Sequence[int]) -> SamplingSetProcessor:
        """The processor of rows ``rows`` of this batch (the same filters; its values are not checked again:
        a decoding loop takes the rows still decoding at every step)."""
        out = SamplingSetProcessor.__new__(SamplingSetProcessor)
        out._build([self.top_k[r] for r in rows], [self.top_p[r] for r in rows])
        return out

    def removed(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool (B, V): True outside each row's sampling set (each filter runs on its own rows only)."""
        if scores.shape[0] != self.n_rows:
            raise ValueError(f"SamplingSetProcessor built for {self.n_rows} rows, got scores for {scores.shape[0]}")
        out = torch.zeros_like(scores, dtype=torch.bool)
        for rows, proc in ((self.rows_k, self.k), (self.rows_p, self.p)):
            if rows:
                idx = torch.tensor(rows, device=scores.device)
                out[idx] = proc.removed(scores[idx])
        return out

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.removed(scores), FILTER_VALUE)


class DistinctiveContrast:
    r"""Distinctive caption sampling's contrast rule (Pseudo-RIS, ECCV 2024, Sec. 3.2).

    For target mask i, with ``z_i`` its next-token logits after the min-length rule and restricted to its
    own sampling set :math:`\mathcal{V}_i` (top-k / top-p), and the contrast term
    :math:`c_i = \frac{1}{N-1}\sum_{j \ne i} s_{ij}\, z_j` (``z_j`` = the raw logits of the SAME prefix
    conditioned on mask j's crop, ``s_ij`` the cosine similarity of the crops' CoCa image embeddings):

    .. math::
        z'_i = z_i - \frac{1}{N-1} \sum_{j \ne i} s_{ij}\, z_j \quad \text{on } \mathcal{V}_i,\ -\infty \text{ elsewhere}

        p'_i = \mathrm{softmax}(z'_i / T), \qquad p'_i[\mathrm{eot}] \leftarrow \mathrm{softmax}(z_i / T)[\mathrm{eot}]

    The sampling distribution is ``p'_i / sum(p'_i)`` (the authors pass the un-normalised ``p'_i`` to
    ``torch.multinomial``, which normalises). Rows whose ``p'_i`` vanishes or is not finite fall back to
    the target-only distribution ``softmax(z_i / T)`` (the authors check this over the whole batch; we
    check per row so that a caption does not depend on its batch).

    ``__call__(input_ids (B, T), scores (B, V), contrast (B, V), removed (B, V) bool) -> probs (B, V)``:
    ``scores`` = ``z_i`` already filtered (``-inf`` outside the set), ``contrast`` = ``c_i``.
    """

    def __init__(self, eos_token_id: int, temperature: float = 1.0):
        if not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"eos_token_id must be a non-negative int, got {eos_token_id!r}")
        self.eos_token_id = eos_token_id
        self.temperature = TemperatureLogitsProcessor(temperature).temperature

    def __call__(self, input_ids, scores, contrast, removed):
        t = self.temperature
        plain = torch.softmax(scores / t, dim=-1)
        zc = (scores - contrast).masked_fill(removed, FILTER_VALUE)
        probs = torch.softmax(zc / t, dim=-1)
        probs[:, self.eos_token_id] = plain[:, self.eos_token_id]
        total = probs.sum(dim=-1, keepdim=True)
        bad = ~torch.isfinite(total) | (total <= 0) | ~torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(bad, plain, probs / total.clamp_min(1e-30))
        return probs


__all__ = [
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinLengthLogitsProcessor",
    "TemperatureLogitsProcessor",
    "TopKLogitsProcessor",
    "TopPLogitsProcessor",
    "SamplingSetProcessor",
    "DistinctiveContrast",
    "FILTER_VALUE",
]
