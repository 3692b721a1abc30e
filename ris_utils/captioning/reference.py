"""Slow reference implementations of the decoding rules, for tests and ``benchmarks/bench_decoding.py``.

No KV cache: every step re-runs the whole prefix through open_clip's own modules
(``model._encode_text`` then ``model.text_decoder``), as open_clip's ``generate`` and the authors'
``distinctive_caption_sampling`` do. The sampling noise is the same keyed noise as the fast path
(:mod:`~ris_utils.captioning.noise`), so the tokens can be compared one for one.

* :func:`reference_sample_row` - ONE caption, unbatched: the contrast term ``c_i`` written out directly (every
  ``z_j`` by a full recompute under crop j).
* :func:`reference_sample_image_authors` - shaped like the authors' code: one image (one view) at a time,
  all masks x settings of it as one batch, the whole prefix recomputed every step, the contrast term
  from a second decoder pass over (rows x (N-1)) repeated prefixes.

Both apply the contrast rule itself through :class:`~ris_utils.captioning.processors.DistinctiveContrast` (the
one copy of its lines; ``tests/test_distinctive_by_hand.py`` checks it against cases worked by hand from the paper's
equation), so what they check is everything around the rule: the KV cache, the batching of masks x views x
settings, the mixing of ``c_i`` before the output projection, the keyed noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .decoder import MAX_MASKS, MIN_MASKS, MIN_SEQ_LEN, SEQ_LEN, TEMPERATURE, DecodeSetting, TokenIds
from .noise import keyed_uniform, sample_inverse_cdf
from .processors import FILTER_VALUE, DistinctiveContrast, MinLengthLogitsProcessor, SamplingSetProcessor


@torch.no_grad()
def full_logits(model, image_embs: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) of prefixes (B, T) under image tokens (B, n, W), full recompute."""
    _, token_embs = model._encode_text(prefix)
    return model.text_decoder(image_embs, token_embs)[:, -1]


def _set_and_plain(z, prefix, setting: DecodeSetting, ids: TokenIds, min_seq_len: int, temperature: float):
    z = MinLengthLogitsProcessor(min_seq_len, ids.eot)(prefix, z.float())
    removed = SamplingSetProcessor([setting.top_k] * z.shape[0], [setting.top_p] * z.shape[0]).removed(z)
    zf = z.masked_fill(removed, FILTER_VALUE)
    return zf, removed, torch.softmax(zf / temperature, dim=-1)


@torch.no_grad()
def reference_sample_row(model, ids: TokenIds, image_embs: torch.Tensor, image_latents: torch.Tensor, i: int,
                         setting: DecodeSetting, key: int, *, distinctive: bool, seq_len: int = SEQ_LEN,
                         min_seq_len: int = MIN_SEQ_LEN, temperature: float = TEMPERATURE, min_masks: int = MIN_MASKS,
                         max_masks: int = MAX_MASKS) -> list[int]:
    """One caption for mask ``i`` of one view, unbatched and without cache.

    Arguments:
        image_embs: (N, n_tokens, W) image tokens of the N masks' crops (one view).
        image_latents: (N, E) their CoCa image embeddings.
    At each step t (prefix y_<t):
    ``z_k = logits(y_<t | crop k)`` for every k; ``s_ij = cos(latent_i, latent_j)``;
    ``c_i = 1/(N-1) * sum_{j != i} s_ij z_j``, then the rule (:class:`DistinctiveContrast`) on i's top-k/top-p
    set; plain ``softmax(z_i / T)`` when N < 2 or N > 30.
    """
    n = image_embs.shape[0]
    contrast = distinctive and min_masks <= n <= max_masks
    lat = F.normalize(image_latents.float(), dim=-1)
    rule = DistinctiveContrast(ids.eot, temperature)
    tokens = [ids.sot]
    for pos in range(seq_len - 1):
        prefix = torch.tensor([tokens], device=image_embs.device)
        if pos + 2 == seq_len:
            tokens.append(ids.eot)
            break
        z_i = full_logits(model, image_embs[i: i + 1], prefix)
        zf, removed, plain = _set_and_plain(z_i, prefix, setting, ids, min_seq_len, temperature)
        probs = plain
        if contrast:
            c = torch.zeros_like(zf)
            for j in range(n):
                if j == i:
                    continue
                s_ij = float(lat[i] @ lat[j])
                c = c + s_ij * full_logits(model, image_embs[j: j + 1], prefix).float()
            probs = rule(prefix, zf, c / (n - 1), removed)
        if setting.kind == "greedy":
            tok = int(probs.argmax(dim=-1))
        else:
            tok = int(sample_inverse_cdf(probs, keyed_uniform(np.array([key], dtype=np.uint64), pos))[0])
        tokens.append(tok)
        if tok in (ids.eot, ids.pad):
            break
    return tokens


@torch.no_grad()
def reference_sample_image_authors(model, ids: TokenIds, images: torch.Tensor, settings: list[DecodeSetting],
                                   keys: np.ndarray, *, distinctive: bool, seq_len: int = SEQ_LEN,
                                   min_seq_len: int = MIN_SEQ_LEN, temperature: float = TEMPERATURE, min_masks: int = MIN_MASKS,
                                   max_masks: int = MAX_MASKS) -> torch.Tensor:
    """Authors-shaped sampling for the N crops of ONE view: rows (setting, mask), full recompute per step.

    Arguments:
        images: (N, 3, H, W) preprocessed crops of one view.
        settings: S sample/greedy settings; keys: (S, N) uint64 noise keys.
    Returns:
        tokens (S, N, seq_len) ``[sot, ..., eot, pad...]``.
    """
    n = images.shape[0]
    s_ = len(settings)
    contrast = distinctive and min_masks <= n <= max_masks
    latents, embs = model._encode_image(images)
    sim = latents @ latents.T
    r_ = s_ * n
    row_embs = embs.repeat(s_, 1, 1)  # rows (setting, mask)
    row_mask = torch.arange(r_) % n
    row_k = [s.top_k for s in settings for _ in range(n)]
    row_p = [s.top_p for s in settings for _ in range(n)]
    greedy = torch.tensor([s.kind == "greedy" for s in settings for _ in range(n)])
    flat_keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    rule = DistinctiveContrast(ids.eot, temperature)
    out = torch.full((r_, seq_len), ids.pad, dtype=torch.long)
    out[:, 0] = ids.sot
    done = torch.zeros(r_, dtype=torch.bool)
    for pos in range(seq_len - 1):
        live = (~done).nonzero().squeeze(1)
        x = out[live, : pos + 1]
        if pos + 2 == seq_len:
            out[live, pos + 1] = ids.eot
            break
        _, token_embs = model._encode_text(x)
        z = model.text_decoder(row_embs[live], token_embs)[:, -1].float()
        z = MinLengthLogitsProcessor(min_seq_len, ids.eot)(x, z)
        removed = SamplingSetProcessor([row_k[r] for r in live.tolist()], [row_p[r] for r in live.tolist()]).removed(z)
        zf = z.masked_fill(removed, FILTER_VALUE)
        plain = torch.softmax(zf / temperature, dim=-1)
        probs = plain
        if contrast:
            owners = row_mask[live]
            others = torch.stack([torch.arange(n)[torch.arange(n) != int(i)] for i in owners])  # (L, N-1)
            dep_embs = embs[others.reshape(-1)]
            dep_tok = token_embs.repeat_interleave(n - 1, dim=0)
            dep = model.text_decoder(dep_embs, dep_tok)[:, -1].float().view(len(live), n - 1, -1)
            w = sim[owners.unsqueeze(1), others].float()  # (L, N-1)
            probs = rule(x, zf, (dep * w.unsqueeze(-1)).mean(dim=1), removed)
        tok = sample_inverse_cdf(probs, keyed_uniform(flat_keys[live.numpy()], pos))
        tok = torch.where(greedy[live], probs.argmax(dim=-1), tok)
        out[live, pos + 1] = tok
        done[live] = (tok == ids.eot) | (tok == ids.pad)
        if bool(done.all()):
            break
    return out.view(s_, n, seq_len)


__all__ = ["full_logits", "reference_sample_row", "reference_sample_image_authors"]
