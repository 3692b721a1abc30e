"""Node sharing in the decoding loops (``CocaDecoder.shares_rows``): the same tokens, bit for bit, as running every
row every step, and the two kernel facts it rests on (tiny random-init CoCa, CPU, one thread, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ris_utils.captioning import (
    CocaDecoder,
    TokenIds,
    beam,
    beam_search,
    parse_settings,
    row_key,
    sample_captions,
    sampling,
)
from ris_utils.captioning.decoder import MIN_ROWS
from ris_utils.captioning.tiny import random_coca

VOCAB = 40
IDS = TokenIds(sot=2, eot=3, pad=0, vocab_size=VOCAB)
#: the shapes profile's 10 sample settings: 10 x 13 masks = 130 queries per crop with the contrast, whose last 2
#: fall in a flash-attention block of 2
SETTINGS = parse_settings([{"top_k": k} for k in (5, 7, 9, 11, 13)] + [{"top_p": p} for p in (0.4, 0.5, 0.6, 0.7, 0.8)])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _nodes_or_skip(model) -> CocaDecoder:
    """A decoder that shares rows; skip where this machine's kernels do not allow it (the decoder's own probe:
    there every row runs every step, as on CUDA, and nothing below applies)."""
    dec = CocaDecoder(model)
    if not dec.shares_rows:
        pytest.skip("on this CPU a matrix-product row depends on its batch (CocaDecoder's probe): node sharing is "
                    "off here and every row runs every step")
    return dec


class _EveryRow(CocaDecoder):
    """The decoder with node sharing off: every row runs every step (what CUDA decoders do)."""

    shares_rows = False


@pytest.fixture(scope="module")
def coca():
    model, _ = random_coca("coca_test_nodes", seed=3, vocab_size=VOCAB, width=32, layers=2, heads=4)
    with torch.no_grad():  # captions of every length: end-of-text likely from the second word on
        model.text_decoder.text_projection[:, IDS.eot] += 0.4
    return model


@pytest.fixture(scope="module")
def coca64():
    """Head size 32 over 15 image tokens (the shapes captioner's): a block of 2 or 3 queries rounds differently
    from a block of 4 or more in the CPU flash attention (with coca's head size 8 over 8 tokens it does not)."""
    model, _ = random_coca("coca_test_nodes_64", seed=4, vocab_size=VOCAB, width=64, layers=2, heads=2,
                           n_queries=16)
    with torch.no_grad():
        model.text_decoder.text_projection[:, IDS.eot] += 0.4
    return model


def _embeddings(dec, v, n, seed):
    g = torch.Generator().manual_seed(seed)
    lat, embs = dec.encode_images(torch.randn(v * n, 3, 32, 32, generator=g))
    return lat.view(v, n, -1), embs.view(v, n, *embs.shape[1:])


def test_matrix_product_rows_do_not_depend_on_the_other_rows_from_min_rows(coca):
    """MKL's sgemm (one thread): a row's result is the same in any batch of >= MIN_ROWS rows -- on a CPU where
    the decoder's probe finds it so (elsewhere node sharing is off)."""
    _nodes_or_skip(coca)
    g = torch.Generator().manual_seed(0)
    for k, n in [(32, 96), (32, 128), (128, 32), (32, 40), (64, 192), (64, 256), (256, 64), (64, 64)]:
        w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(300, k, generator=g)
        full = F.linear(x, w, b)
        for m in [*range(MIN_ROWS, 20), 33, 150]:
            idx = torch.randperm(300, generator=g)[:m]
            assert torch.equal(F.linear(x[idx], w, b), full[idx]), (k, n, m)
            assert torch.equal(x[idx] @ w.T, (x @ w.T)[idx]), (k, n, m)


@pytest.mark.parametrize("which", ["coca", "shapes_like"])
def test_query_classes_compute_alike(coca, which):
    """Equal queries at positions of one query_classes class give equal outputs (other inputs than the probe's),
    and the class of a position is the same in any crop."""
    model = coca if which == "coca" else random_coca("coca_test_nodes_w64", seed=0, vocab_size=VOCAB, width=64,
                                                      layers=1, heads=2, n_queries=15)[0]
    dec = _nodes_or_skip(model)
    h = dec.dec.cross_attn[0].attn.num_heads
    d = dec.width // h
    g = torch.Generator().manual_seed(2)
    for n_q in [1, 2, 3, 5, 10, 33, 35, 67, 130, 200, 203]:
        n_k = 8 if which == "coca" else 15
        cls = dec.query_classes(n_q, n_k)
        q = torch.randn(3, 1, dec.width, generator=g).expand(3, n_q, dec.width).contiguous()
        k, v = torch.randn(3, h, n_k, d, generator=g), torch.randn(3, h, n_k, d, generator=g)
        out = F.scaled_dot_product_attention(q.view(3, n_q, h, d).transpose(1, 2), k, v).transpose(1, 2)
        for c in cls.unique().tolist():
            rows = out[:, cls == c]  # (crops, positions of class c, H, d)
            assert torch.equal(rows, rows[:, :1].expand_as(rows)), (which, n_q, c)
    assert dec.query_classes(130, 15 if which != "coca" else 8) is dec.query_classes(130, 15 if which != "coca" else 8)


@pytest.mark.parametrize("v, n, settings", [(2, 13, SETTINGS), (1, 3, SETTINGS[::3]), (1, 2, SETTINGS[:1]),
                                            (2, 1, SETTINGS[4:6])])
@pytest.mark.parametrize("distinctive", [False, True])
def test_node_sampling_gives_the_tokens_of_every_row_every_step(coca, v, n, settings, distinctive):
    every, nodes = _EveryRow(coca), _nodes_or_skip(coca)
    assert not every.shares_rows
    lat, embs = _embeddings(nodes, v, n, seed=v * 100 + n)
    keys = np.array([[[row_key(5, "im", i, vv, s.name) for i in range(n)] for s in settings] for vv in range(v)],
                    dtype=np.uint64)
    kw = dict(distinctive=distinctive, seq_len=8, min_seq_len=2)
    ref = sample_captions(every, IDS, embs, lat, settings, keys, **kw).tokens
    got = sample_captions(nodes, IDS, embs, lat, settings, keys, **kw).tokens
    assert torch.equal(got, ref)
    lengths = (ref != IDS.pad).sum(-1).flatten()
    assert len(set(lengths.tolist())) > 1 or ref.numel() < 40  # captions ended at different steps


@pytest.mark.parametrize("b, nb, ng", [(9, 6, 3), (2, 4, 2), (1, 2, 1)])
def test_node_beam_search_gives_the_beams_of_every_row_every_step(coca, b, nb, ng):
    every, nodes = _EveryRow(coca), _nodes_or_skip(coca)
    _, embs = _embeddings(nodes, 1, b, seed=b)
    kw = dict(num_beams=nb, num_beam_groups=ng, seq_len=8, min_seq_len=2)
    assert beam_search(nodes, IDS, embs[0], **kw) == beam_search(every, IDS, embs[0], **kw)


def _recording(monkeypatch, cls, name, log):
    real = getattr(cls, name)

    def rec(self, *a, **k):
        out = real(self, *a, **k)
        log.append((getattr(self, "live", None), out))
        return out

    monkeypatch.setattr(cls, name, rec)


@pytest.mark.parametrize("which", ["coca", "coca64"])
@pytest.mark.parametrize("distinctive", [False, True])
@pytest.mark.parametrize("n", [5, 13])
def test_node_sampling_logits_are_the_full_batch_logits(request, monkeypatch, which, distinctive, n):
    """Stronger than equal tokens: every step's logits (and contrast mixtures) of every live row, bit for bit
    (13 masks x 10 settings: the full batch's layout for the cross-attention, 5: the nodes' own)."""
    model = request.getfixturevalue(which)
    every, nodes = _EveryRow(model), _nodes_or_skip(model)
    lat, embs = _embeddings(nodes, 2, n, seed=7)
    keys = np.arange(2 * 10 * n, dtype=np.uint64).reshape(2, 10, n)
    full, node = [], []
    _recording(monkeypatch, sampling._Sampler, "logits", full)
    _recording(monkeypatch, sampling._NodeSampler, "node_logits", node)
    kw = dict(distinctive=distinctive, seq_len=8, min_seq_len=2)
    sample_captions(every, IDS, embs, lat, SETTINGS, keys, **kw)
    sample_captions(nodes, IDS, embs, lat, SETTINGS, keys, **kw)
    assert len(full) == len(node) > 2
    for (_, (z, c)), (live, (zn, cn)) in zip(full, node):
        assert torch.equal(zn, z[live])
        assert (c is None and cn is None) or torch.equal(cn, c[live])


@pytest.mark.parametrize("which", ["coca", "coca64"])
def test_node_beam_logits_are_the_full_batch_logits(request, monkeypatch, which):
    """One group instead of 3 identical ones, nodes instead of rows: the first group's logits, bit for bit."""
    model = request.getfixturevalue(which)
    every, nodes = _EveryRow(model), _nodes_or_skip(model)
    _, embs = _embeddings(nodes, 1, 7, seed=11)
    full, node = [], []
    _recording(monkeypatch, beam._BeamRows, "logits", full)
    _recording(monkeypatch, beam._BeamNodes, "logits", node)
    kw = dict(num_beams=6, num_beam_groups=3, seq_len=8, min_seq_len=2)
    assert beam_search(nodes, IDS, embs[0], **kw) == beam_search(every, IDS, embs[0], **kw)
    assert len(full) == len(node) > 2
    for (_, z), (_, zn) in zip(full, node):
        assert zn.shape[0] == 7 * 2
        assert torch.equal(zn, z.view(7, 6, -1)[:, :2].reshape(14, -1))
