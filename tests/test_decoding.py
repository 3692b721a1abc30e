"""The captioner's decoding core on tiny random-init open_clip CoCa models (CPU, ~1 min)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ris_utils.captioning import (
    CocaDecoder,
    DecodeSetting,
    MinLengthLogitsProcessor,
    SamplingSetProcessor,
    TemperatureLogitsProcessor,
    TokenIds,
    TopKLogitsProcessor,
    TopPLogitsProcessor,
    beam_search,
    generate_candidates,
    keyed_uniform,
    parse_settings,
    row_key,
    sample_captions,
    sample_inverse_cdf,
)
from ris_utils.captioning.reference import full_logits, reference_sample_row
from ris_utils.captioning.tiny import random_coca

VOCAB = 40
IDS = TokenIds(sot=2, eot=3, pad=0, vocab_size=VOCAB)  # the word tokenizer's layout, not open_clip's
SAMPLE_SETTINGS = parse_settings([{"top_k": 5}, {"top_p": 0.7}, {"kind": "greedy"}])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def coca():
    model, _ = random_coca("coca_test_decoding", seed=0, vocab_size=VOCAB, width=32, layers=2, heads=4)
    return model


@pytest.fixture(scope="module")
def coca_nocls():
    model, _ = random_coca("coca_test_decoding_nocls", seed=1, vocab_size=VOCAB, width=32, layers=2, heads=4,
                           embed_cls=False)
    return model


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


# ------------------------------------------------------------------------------- KV cache exactness


@pytest.mark.parametrize("which", ["coca", "coca_nocls"])
def test_cached_logits_equal_open_clip_forward_at_every_step(which, request):
    model = request.getfixturevalue(which)
    dec = CocaDecoder(model)
    images = _images(3)
    lat, embs = dec.encode_images(images)
    steps = 12
    tcache, dcache = dec.new_text_cache(3, steps), dec.new_decoder_cache(3, steps)
    cross = dec.cross_kv(embs)
    tokens = torch.full((3, 1), IDS.sot)
    for pos in range(steps):
        e = dec.text_step(tokens[:, -1], pos, tcache)
        z = dec.project(dec.decoder_step(e.view(3, 1, -1), pos, dcache, cross))[:, 0]
        with torch.no_grad():
            if dec.embed_cls:
                ref = model(images, tokens, output_labels=False)["logits"][:, -1]
            else:  # open_clip's text tower without CLS only accepts full-length input: pad (causal mask)
                full = torch.full((3, model.text.context_length), IDS.pad)
                full[:, : pos + 1] = tokens
                ref = model(images, full, output_labels=False)["logits"][:, pos]
        assert torch.allclose(z, ref, atol=1e-4), f"step {pos}: max diff {(z - ref).abs().max():.2e}"
        tokens = torch.cat([tokens, z.argmax(-1, keepdim=True)], dim=1)  # feed the greedy token


def test_greedy_tokens_identical_to_full_recompute_loop_and_open_clip(coca):
    dec = CocaDecoder(coca)
    images = _images(4, seed=1)
    lat, embs = dec.encode_images(images)
    greedy = parse_settings([{"kind": "greedy"}])
    keys = np.zeros((1, 1, 4), dtype=np.uint64)
    ours = sample_captions(dec, IDS, embs[None], lat[None], greedy, keys, distinctive=False, seq_len=14,
                           min_seq_len=5).tokens[0, 0]
    # full-recompute reference loop (argmax over open_clip's own forward)
    for i in range(4):
        toks = [IDS.sot]
        while len(toks) < 14 and toks[-1] not in (IDS.eot, IDS.pad):
            prefix = torch.tensor([toks])
            z = full_logits(coca, embs[i: i + 1], prefix)[0]
            if len(toks) < 5:
                z[IDS.eot] = -float("inf")
            toks.append(IDS.eot if len(toks) == 13 else int(z.argmax()))
        assert ours[i, : len(toks)].tolist() == toks
        assert (ours[i, len(toks):] == IDS.pad).all()
    # open_clip's own generate: top_k=1 sampling is greedy
    with torch.no_grad():
        ref = coca.generate(images, generation_type="top_k", top_k=1, seq_len=14, min_seq_len=5,
                            sot_token_id=IDS.sot, eos_token_id=IDS.eot, pad_token_id=IDS.pad)
    for i in range(4):
        n = ref.shape[1]
        assert ours[i, :n].tolist() == ref[i].tolist()


# ------------------------------------------------------------------------------ sampling vs reference


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("distinctive", [False, True])
def test_sampling_equals_unbatched_full_recompute_reference(coca, distinctive, temperature):
    dec = CocaDecoder(coca)
    n, v = 4, 2
    settings = SAMPLE_SETTINGS
    images = _images(n * v, seed=2)
    lat, embs = dec.encode_images(images)
    lat, embs = lat.view(v, n, -1), embs.view(v, n, *embs.shape[1:])
    keys = np.array([[[row_key(7, "img", i, vv, s.name) for i in range(n)] for s in settings]
                     for vv in range(v)], dtype=np.uint64)
    res = sample_captions(dec, IDS, embs, lat, settings, keys, distinctive=distinctive, seq_len=14,
                          min_seq_len=4, temperature=temperature)
    assert res.distinctive == distinctive
    for vv in range(v):
        for si, s in enumerate(settings):
            for i in range(n):
                ref = reference_sample_row(coca, IDS, embs[vv], lat[vv], i, s, int(keys[vv, si, i]),
                                           distinctive=distinctive, seq_len=14, min_seq_len=4,
                                           temperature=temperature)
                got = res.tokens[vv, si, i]
                assert got[: len(ref)].tolist() == ref, (vv, s.name, i)
                assert (got[len(ref):] == IDS.pad).all()


def test_contrast_changes_captions_and_is_off_outside_2_to_max_masks(coca):
    dec = CocaDecoder(coca)
    n = 4
    lat, embs = dec.encode_images(_images(n, seed=3))
    keys = np.array([[[row_key(0, "x", i, 0, s.name) for i in range(n)] for s in SAMPLE_SETTINGS]],
                    dtype=np.uint64)
    kw = dict(seq_len=12, min_seq_len=4)
    naive = sample_captions(dec, IDS, embs[None], lat[None], SAMPLE_SETTINGS, keys, distinctive=False, **kw)
    dist = sample_captions(dec, IDS, embs[None], lat[None], SAMPLE_SETTINGS, keys, distinctive=True, **kw)
    assert dist.distinctive and not naive.distinctive
    assert not torch.equal(naive.tokens, dist.tokens)
    off = sample_captions(dec, IDS, embs[None], lat[None], SAMPLE_SETTINGS, keys, distinctive=True,
                          max_masks=3, **kw)
    assert not off.distinctive and torch.equal(off.tokens, naive.tokens)


def test_lengths_eot_and_padding(coca):
    dec = CocaDecoder(coca)
    lat, embs = dec.encode_images(_images(3, seed=4))
    settings = parse_settings([{"top_k": 13}, {"top_p": 0.9}])
    keys = np.arange(6, dtype=np.uint64).reshape(1, 2, 3)
    # a strong EOT bias makes EOT likely right after the min length
    coca.text_decoder.text_projection.data[:, IDS.eot] += 0.5
    try:
        toks = sample_captions(dec, IDS, embs[None], lat[None], settings, keys, distinctive=True,
                               seq_len=10, min_seq_len=5).tokens.reshape(-1, 10)
    finally:
        coca.text_decoder.text_projection.data[:, IDS.eot] -= 0.5
    n_eot = 0
    for row in toks.tolist():
        assert row[0] == IDS.sot
        # a row ends at its first EOT (or pad, which open_clip also treats as the end); EOT is forced at
        # the last position, so every row ends
        end = next(k for k, t in enumerate(row) if k > 0 and t in (IDS.eot, IDS.pad))
        if row[end] == IDS.eot:
            n_eot += 1
            assert end >= 5, "EOT banned while the prefix is shorter than min_seq_len"
        assert all(t == IDS.pad for t in row[end + 1:])
    assert n_eot > 0


# ------------------------------------------------------------------------------------- keyed noise


def test_caption_independent_of_batch_composition_and_order(coca):
    images = _images(4 * 2, seed=5).view(4, 2, 3, 32, 32)
    settings = [{"top_k": 5}, {"top_p": 0.6}, {"kind": "beam", "num_beams": 4, "num_beam_groups": 2}]
    kw = dict(distinctive=False, seed=3, image_key="im", seq_len=8, min_seq_len=4)
    together = generate_candidates(coca, IDS, images, settings, **kw)
    alone = generate_candidates(coca, IDS, images[2:3], settings, mask_indices=[2], **kw)
    assert alone[0] == together[2]
    perm = [3, 1, 0, 2]
    shuffled = generate_candidates(coca, IDS, images[perm], settings, mask_indices=perm, **kw)
    for k, m in enumerate(perm):
        assert shuffled[k] == together[m]
    # distinctive: the masks' order does not matter either; chunking over views does not matter
    kw["distinctive"] = True
    d_all = generate_candidates(coca, IDS, images, settings, **kw)
    d_shuf = generate_candidates(coca, IDS, images[perm], settings, mask_indices=perm, max_rows=1, **kw)
    for k, m in enumerate(perm):
        assert d_shuf[k] == d_all[m]
    # another seed gives other samples
    kw["seed"] = 4
    other = generate_candidates(coca, IDS, images, settings, **kw)
    assert [c["tokens"] for c in other[0]] != [c["tokens"] for c in d_all[0]]


def test_keyed_uniform_and_inverse_cdf():
    keys = np.array([row_key(0, "a", m, 0, "top_k=5") for m in range(4000)], dtype=np.uint64)
    u0, u1 = keyed_uniform(keys, 0), keyed_uniform(keys, 1)
    assert torch.equal(u0, keyed_uniform(keys, 0))
    assert 0 <= float(u0.min()) and float(u0.max()) < 1 and abs(float(u0.mean()) - 0.5) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.05
    assert row_key(0, "a", 1, 0, "s") != row_key(0, "a", 1, 1, "s") != row_key(1, "a", 1, 1, "s")
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2]).expand(4000, 4)
    tok = sample_inverse_cdf(probs * 3.0, u0)  # unnormalised input is fine
    counts = torch.bincount(tok, minlength=4).double() / 4000
    assert counts[1] == 0
    assert torch.allclose(counts, torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.double), atol=0.03)


# --------------------------------------------------------------------------------------- beam search


def test_beam_search_equals_open_clip_generate(coca):
    dec = CocaDecoder(coca)
    images = _images(3, seed=6)  # seed 6: image 1's best beam has pad tokens inside (text-tower pad mask)
    _, embs = dec.encode_images(images)
    ours = beam_search(dec, IDS, embs, num_beams=6, num_beam_groups=3, seq_len=12, min_seq_len=5)
    with torch.no_grad():
        ref = coca.generate(images, generation_type="beam_search", seq_len=12, min_seq_len=5,
                            sot_token_id=IDS.sot, eos_token_id=IDS.eot, pad_token_id=IDS.pad)
    for i in range(3):
        assert ours[i] == ref[i, : len(ours[i])].tolist()
        assert (ref[i, len(ours[i]):] == IDS.pad).all()


class _TableDecoder(CocaDecoder):
    """A decoder whose next-token logits come from a table keyed by the prefix (hand-checkable)."""

    def __init__(self, table, vocab):
        self.table, self.vocab_size, self.max_len, self.width = table, vocab, 16, 1
        self._prefix = None

    device = torch.device("cpu")
    dtype = torch.float32
    shares_rows = True

    def cross_kv(self, image_embs):
        return None

    def new_text_cache(self, rows, max_len):
        return _Rows()

    def new_decoder_cache(self, rows, max_len, first_layer_rows=None):
        return _Rows()

    def text_step(self, tokens, pos, cache):
        cache.add(tokens)
        self._prefix = cache.rows
        return torch.zeros(len(tokens), 1)

    def decoder_rows(self, x, pos, cache, cross, layout):
        return torch.zeros(x.shape[0], 1)

    def decoder_step(self, x, pos, cache, cross):
        return torch.zeros(x.shape[0], x.shape[1], 1)

    def project(self, hidden):
        default = [-9.0] * self.vocab_size
        return torch.tensor([self.table.get(tuple(p), default) for p in self._prefix]).view(*hidden.shape[:-1], -1)


class _Rows:
    def __init__(self):
        self.rows = None

    def add(self, tokens):
        t = tokens.tolist()
        self.rows = [[x] for x in t] if self.rows is None else [r + [x] for r, x in zip(self.rows, t)]

    def keep_rows(self, index, first_layer=None):
        if self.rows is not None:
            self.rows = [list(self.rows[i]) for i in index.tolist()]

    reorder = keep_rows


def test_beam_search_keeps_the_best_hypothesis_hand_checked():
    # vocab: 0 pad, 1 sot, 2 eot, 3 "a", 4 "b". Greedy would take "a" (logit 1.0 > 0.9) and end with score
    # (1.0 + 0.1) / 3; the beam keeps "b" too, whose continuation "b b eot" scores (0.9 + 2 + 2) / 4 = 1.225.
    ids = TokenIds(sot=1, eot=2, pad=0, vocab_size=5)
    ninf = -9.0
    table = {
        (1,): [ninf, ninf, ninf, 1.0, 0.9],
        (1, 3): [ninf, ninf, 0.1, -5.0, -5.0],
        (1, 4): [ninf, ninf, -5.0, -5.0, 2.0],
        (1, 4, 4): [ninf, ninf, 2.0, -5.0, -5.0],
    }
    dec = _TableDecoder(table, 5)
    out = beam_search(dec, ids, torch.zeros(1, 1, 1), num_beams=2, num_beam_groups=1, seq_len=6, min_seq_len=0)
    assert out == [[1, 4, 4, 2]]
    # with a single beam per group (num_beams 2, groups 2) the greedy path wins
    out = beam_search(dec, ids, torch.zeros(1, 1, 1), num_beams=2, num_beam_groups=2, seq_len=6, min_seq_len=0)
    assert out == [[1, 3, 2]]
    # Hamming diversity (transformers' group beam search): group 1 may not repeat group 0's "a" for free
    # (1.0 - 0.5 < 0.9), takes "b" and finds the better caption
    out = beam_search(dec, ids, torch.zeros(1, 1, 1), num_beams=2, num_beam_groups=2, seq_len=6, min_seq_len=0,
                      diversity_penalty=0.5)
    assert out == [[1, 4, 4, 2]]


def test_beam_search_legacy_shared_hypotheses_score_lengths_without_eot():
    # transformers < 4.31 (the authors' vendored beam search): length = the hypothesis without its eot.
    # "a eot": sum 2.0; "b b eot": sum 2.8. >= 4.31: 2.0 / 3 < 2.8 / 4 -> "b b"; < 4.31: 2.0 / 2 > 2.8 / 3 -> "a".
    ids = TokenIds(sot=1, eot=2, pad=0, vocab_size=5)
    ninf = -9.0
    table = {
        (1,): [ninf, ninf, ninf, 1.0, 0.9],
        (1, 3): [ninf, ninf, 1.0, -5.0, -5.0],
        (1, 4): [ninf, ninf, -5.0, -5.0, 0.2],
        (1, 4, 4): [ninf, ninf, 1.7, -5.0, -5.0],
    }
    dec = _TableDecoder(table, 5)
    kw = dict(num_beams=2, num_beam_groups=1, seq_len=6, min_seq_len=0)
    assert beam_search(dec, ids, torch.zeros(1, 1, 1), **kw) == [[1, 4, 4, 2]]
    assert beam_search(dec, ids, torch.zeros(1, 1, 1), hypotheses="shared", **kw) == [[1, 3, 2]]
    with pytest.raises(ValueError, match="hypotheses"):
        beam_search(dec, ids, torch.zeros(1, 1, 1), hypotheses="legacy", **kw)
    with pytest.raises(ValueError, match="hypotheses"):
        DecodeSetting.parse({"kind": "beam", "hypotheses": "legacy"})
    assert DecodeSetting.parse({"kind": "beam", "hypotheses": "shared"}).hypotheses == "shared"


# ---------------------------------------------------------------------------------------- processors


def test_topk_topp_minlength_match_transformers():
    tr = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 30, generator=g) * 3
    ids = torch.zeros(6, 3, dtype=torch.long)
    for k in (1, 5, 13):
        assert torch.equal(TopKLogitsProcessor(k)(ids, scores), tr.TopKLogitsWarper(k)(ids, scores))
    for p in (0.4, 0.8):
        assert torch.equal(TopPLogitsProcessor(p)(ids, scores), tr.TopPLogitsWarper(p)(ids, scores))
    # per-row values in one batch = row-wise application
    ks, ps = [5, 7, 9, 0, 0, 0], [1.0, 1.0, 1.0, 0.4, 0.5, 0.6]
    mixed = SamplingSetProcessor(ks, ps)(ids, scores)
    for r in range(6):
        want = tr.TopKLogitsWarper(ks[r])(ids[:1], scores[r: r + 1]) if ks[r] else \
            tr.TopPLogitsWarper(ps[r])(ids[:1], scores[r: r + 1])
        assert torch.equal(mixed[r: r + 1], want)
    for length in (2, 5, 6):
        ids_l = torch.zeros(6, length, dtype=torch.long)
        assert torch.equal(MinLengthLogitsProcessor(5, 3)(ids_l, scores),
                           tr.MinLengthLogitsProcessor(5, 3)(ids_l, scores))
    assert torch.equal(TemperatureLogitsProcessor(2.0)(ids, scores), scores / 2)


def test_topp_threshold_is_the_python_float_as_transformers_and_the_authors():
    # own logits: token 0 has p = 0.4 exactly in float32 once EOT (token 1) is banned; top_p = 0.6.
    # transformers' TopPLogitsWarper / the authors compare cumsum <= (1 - 0.6) with the Python float, i.e.
    # float32(0.4): token 0 (cumsum == float32(0.4)) is removed and only token 3 survives. The old
    # threshold 1 - float32(0.6) = 0.39999998 kept token 0.
    scores = torch.tensor([[-0.40546528, 0.0, -1e4, 0.0]])
    ids = torch.zeros(1, 2, dtype=torch.long)
    banned = MinLengthLogitsProcessor(5, 1)(ids, scores)  # EOT = token 1, prefix shorter than min length
    assert (banned.softmax(-1)[0, 0] == torch.tensor(0.4)).item()  # the float32 tie
    kept = torch.isfinite(TopPLogitsProcessor(0.6)(ids, banned))[0].tolist()
    assert kept == [False, False, False, True]
    assert torch.isfinite(SamplingSetProcessor([0], [0.6])(ids, banned))[0].tolist() == kept
    # float64 scores: the threshold is the float64 0.4, the cumsum 0.39999999... < 0.4 -> removed too
    kept64 = torch.isfinite(TopPLogitsProcessor(0.6)(ids, banned.double()))[0].tolist()
    assert kept64[3] and not kept64[1]


def test_processor_arguments_validated_with_names():
    with pytest.raises(ValueError, match="top_k.*-1"):
        TopKLogitsProcessor(-1)
    with pytest.raises(ValueError, match="top_p.*1.5"):
        TopPLogitsProcessor(1.5)
    with pytest.raises(ValueError, match="min_length.*-2"):
        MinLengthLogitsProcessor(-2, 3)
    with pytest.raises(ValueError, match="temperature.*0"):
        TemperatureLogitsProcessor(0)
    with pytest.raises(ValueError, match="exactly one of"):
        DecodeSetting.parse({"top_k": 5, "top_p": 0.5})
    with pytest.raises(ValueError, match="unknown keys"):
        DecodeSetting.parse({"top_q": 5})
    with pytest.raises(ValueError, match="unique names"):
        parse_settings(["top_k=5", {"top_k": 5}])
    assert [s.name for s in parse_settings(["beam", {"top_k": 5}, {"top_p": 0.4}])] == ["beam", "top_k=5", "top_p=0.4"]


def test_generate_candidates_shape_and_records(coca):
    from ris_utils.captioning.tokenizer import WordTokenizer

    tok = WordTokenizer([f"w{i}" for i in range(VOCAB - 4)])
    views = _images(2 * 4, seed=8).view(2, 4, 3, 32, 32)
    settings = ["beam", {"top_k": 5}, {"top_p": 0.5}]
    cands = generate_candidates(coca, tok, views, settings, distinctive=True, seed=0, image_key=1,
                                seq_len=10, min_seq_len=4)
    assert len(cands) == 2 and all(len(c) == 4 * 3 for c in cands)
    c = cands[1][3]
    assert (c["view"], c["setting"], c["mode"]) == (1, "beam", "distinctive")
    assert c["text"] == tok.decode(c["tokens"]) and len(c["tokens"]) >= 3
    with pytest.raises(ValueError, match="views must be"):
        generate_candidates(coca, tok, views[0], settings, distinctive=True, seed=0, image_key=1)


def test_beam_memo_reuses_beams_exactly(coca, monkeypatch):
    """A decoder reused across modes/seeds returns memoised beams equal to a fresh decode, and only beams."""
    from ris_utils.captioning import decoding

    views = _images(3 * 4, seed=9).view(3, 4, 3, 32, 32)
    settings = [{"kind": "beam", "num_beams": 4, "num_beam_groups": 2}, {"top_k": 5}, {"top_p": 0.5}]
    kw = dict(seq_len=10, min_seq_len=4, image_key=7)
    dec = CocaDecoder(coca)
    first = generate_candidates(coca, IDS, views, settings, distinctive=False, seed=0, decoder=dec, **kw)
    assert len(dec.beam_memo) == 1
    searches = []

    def counting(*a, **k):
        searches.append(a[0])
        return beam_search(*a, **k)

    monkeypatch.setattr(decoding, "beam_search", counting)
    again = generate_candidates(coca, IDS, views, settings, distinctive=True, seed=1, decoder=dec, **kw)
    assert searches == []  # the second call decoded the sampled rows only: the beams came from the memo
    fresh = generate_candidates(coca, IDS, views, settings, distinctive=True, seed=1, **kw)
    assert len(searches) == 1
    assert again == fresh  # memo hit == full decode (beams and samples)
    beams = [[c["tokens"] for c in m if c["setting"] == "beam"] for m in first]
    assert beams == [[c["tokens"] for c in m if c["setting"] == "beam"] for m in again]
    # other images (other image tokens) miss the memo
    other = _images(3 * 4, seed=10).view(3, 4, 3, 32, 32)
    generate_candidates(coca, IDS, other, settings, distinctive=False, seed=0, decoder=dec, **kw)
    assert len(dec.beam_memo) == 2
    fp = dec.weights_fingerprint()
    assert fp == CocaDecoder(coca).weights_fingerprint()
    with torch.no_grad():
        coca.text_decoder.text_projection.add_(0.0 + 1e-3)
    try:
        assert dec.weights_fingerprint() != fp
    finally:
        with torch.no_grad():
            coca.text_decoder.text_projection.sub_(1e-3)
