"""Distinctive caption sampling and the DoC > 1 filter, checked against cases worked by hand from the paper's
equations (/work/shared/paper.md, steps 2 and 3). The expected numbers are literals: the arithmetic is in the
comments (exp values to 6 digits), nothing here repeats the package's softmax / filtering steps.

Step 2, for target mask i of the N masks of an image, at one decoding step:
    z'_i = z_i - 1/(N-1) * sum_{j != i} s_ij z_j   on i's own top-k / top-p set V_i (-inf elsewhere)
    p'_i = softmax(z'_i),  p'_i[eot] <- softmax(z_i on V_i)[eot],  sampled from p'_i / sum(p'_i)
Step 3: DoC(c) = product_t(c) / max_{k != t} product_k(c), product_k = noun_k * caption_k; keep DoC > 1.

The toy vocabulary: 0 "red", 1 "blue", 2 "square", 3 <eot>, 4 <sot>, 5 <pad>. Three masks of one image:
mask 0 (the target) is a red object, mask 1 a second, redder object, mask 2 a square. Next-token logits
of the same prefix under each mask's crop (sot / pad at -100, never in a sampling set):
    z_0 = [3, 2, -1, 1, -100, -100]     z_1 = [4, 0, 0, 1, -100, -100]     z_2 = [0, -1, 2, 1, -100, -100]
CoCa image embeddings (2-D, unit length): e_0 = (1, 0), e_1 = (0.6, 0.8), e_2 = (0.8, 0.6), so
    s_01 = 0.6, s_02 = 0.8, s_12 = 0.6*0.8 + 0.8*0.6 = 0.96, and with N - 1 = 2 the weights s_ij / 2 are
    w_01 = 0.3, w_02 = 0.4, w_12 = 0.48.
"""

import numpy as np
import pytest
import torch

from ris_utils.captioning.decoding import DecodeSetting, TokenIds, sample_captions, similarity_weights
from ris_utils.captioning.processors import DistinctiveContrast, SamplingSetProcessor
from ris_utils.filtering import degree_of_distinctiveness, select_survivors

RED, BLUE, SQUARE, EOT, SOT, PAD = range(6)
Z = torch.tensor([[3.0, 2.0, -1.0, 1.0, -100.0, -100.0],
                  [4.0, 0.0, 0.0, 1.0, -100.0, -100.0],
                  [0.0, -1.0, 2.0, 1.0, -100.0, -100.0]])
LATENTS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])


def test_similarity_weights_by_hand():
    w = similarity_weights(LATENTS)
    assert w.flatten().tolist() == pytest.approx([0.0, 0.3, 0.4, 0.3, 0.0, 0.48, 0.4, 0.48, 0.0], abs=1e-6)


def test_contrast_distribution_of_the_target_mask_by_hand():
    """Mask 0 with top-k = 3.

    V_0 = top-3 of z_0 = {red 3, blue 2, eot 1} ("square", -1, is out).
    contrast c_0 = 0.3 z_1 + 0.4 z_2 = [1.2, -0.4, 0.8, 0.7, ...]
    z'_0 = z_0 - c_0 on V_0 = [red 1.8, blue 2.4, square -inf, eot 0.3]
    exp: e^1.8 = 6.049647, e^2.4 = 11.023176, e^0.3 = 1.349859; sum 18.422683
      -> softmax(z'_0) = [0.328380, 0.598348, 0, 0.073272]
    plain softmax(z_0 on V_0): e^3 = 20.085537, e^2 = 7.389056, e^1 = 2.718282; sum 30.192875
      -> [0.665241, 0.244728, 0, 0.090031]; its eot probability 0.090031 replaces 0.073272
    p'_0 = [0.328380, 0.598348, 0, 0.090031], sum 1.016759
      -> normalised [0.322968, 0.588486, 0, 0.088547]
    Plain decoding prefers "red" (0.665); the contrast prefers "blue" (0.588): mask 1 is red too.
    """
    z0 = Z[:1]
    removed = SamplingSetProcessor([3], [1.0]).removed(z0)
    assert removed.tolist() == [[False, False, True, False, True, True]]
    contrast = torch.tensor([[1.2, -0.4, 0.8, 0.7, -70.0, -70.0]])  # 0.3 z_1 + 0.4 z_2, worked above
    assert (similarity_weights(LATENTS)[0] @ Z).tolist() == pytest.approx(contrast[0].tolist(), abs=1e-5)
    probs = DistinctiveContrast(EOT)(torch.tensor([[SOT]]), z0.masked_fill(removed, -np.inf), contrast, removed)
    assert probs[0].tolist() == pytest.approx([0.322968, 0.588486, 0.0, 0.088547, 0.0, 0.0], abs=2e-6)


def test_vanished_contrast_falls_back_to_the_plain_distribution():
    """Every z'_i of the set at -inf (a contrast of +inf): p'_i vanishes, so the plain distribution is sampled
    ([0.665241, 0.244728, 0, 0.090031] as worked above)."""
    z0 = Z[:1]
    removed = SamplingSetProcessor([3], [1.0]).removed(z0)
    contrast = torch.full_like(z0, float("inf"))
    probs = DistinctiveContrast(EOT)(torch.tensor([[SOT]]), z0.masked_fill(removed, -np.inf), contrast, removed)
    assert probs[0].tolist() == pytest.approx([0.665241, 0.244728, 0.0, 0.090031, 0.0, 0.0], abs=2e-6)


class FixedLogitsDecoder:
    """A CoCa stand-in for :func:`sample_captions`: whatever the prefix, the decoder's hidden state under crop j
    is z_j (the crop's first image token) and the output projection is the identity."""

    device = torch.device("cpu")

    def check_length(self, seq_len):
        pass

    def new_text_cache(self, rows, max_len):
        return None

    def new_decoder_cache(self, rows, max_len):
        return None

    def cross_kv(self, image_embs):  # (crops, n_tokens, W)
        return image_embs

    def text_step(self, tokens, pos, cache):
        return torch.zeros(tokens.shape[0], Z.shape[1])

    def decoder_step(self, x, pos, cache, cross):  # x: (crops, queries, W) -> the crop's z for every query
        return cross[:, :1, :].expand(-1, x.shape[1], -1).clone()

    def project(self, hidden):
        return hidden


@pytest.mark.parametrize("distinctive, expected", [
    # plain (top-3 each, greedy = argmax): mask 0 "red" (3), mask 1 "red" (4), mask 2 "square" (2)
    (False, [RED, RED, SQUARE]),
    # contrast: mask 0 "blue" (0.588 above); mask 1: V_1 = {red 4, blue 0, square 0, eot 1} (ties with the
    # 3rd kept), c_1 = 0.3 z_0 + 0.48 z_2 = [0.9, 0.12, 0.66, 0.78], z'_1 = [3.1, -0.12, -0.66, 0.22] -> "red";
    # mask 2: V_2 = {red 0, square 2, eot 1}, c_2 = 0.4 z_0 + 0.48 z_1 = [3.12, 0.8, -0.4, 0.88],
    # z'_2 = [-3.12, -inf, 2.4, 0.12] -> "square" (eot gets its plain probability e^1/(e^0+e^2+e^1) = 0.245,
    # below square's e^2.4 / (e^-3.12 + e^2.4 + e^0.12) = 11.0232 / 12.1948 = 0.904)
    (True, [BLUE, RED, SQUARE]),
])
def test_sample_captions_token_choice_by_hand(distinctive, expected):
    """The decoding loop itself (one view, one greedy top-3 setting, 3 masks): the first word of each mask."""
    ids = TokenIds(sot=SOT, eot=EOT, pad=PAD, vocab_size=6)
    image_embs = Z.view(1, 3, 1, 6)  # (V, N, n_tokens, W)
    out = sample_captions(FixedLogitsDecoder(), ids, image_embs, LATENTS.view(1, 3, 2),
                          [DecodeSetting.parse({"kind": "greedy", "top_k": 3})], np.zeros((1, 1, 3), np.uint64),
                          distinctive=distinctive, seq_len=3, min_seq_len=1)
    assert out.distinctive is distinctive
    assert out.tokens[0, 0].tolist() == [[SOT, w, EOT] for w in expected]


def test_doc_and_the_strict_filter_by_hand():
    """Target mask t = 0 of K = 3 masks; CLIP logits per candidate (rows) and mask (columns).

    c0: noun [25, 20, 22] x caption [30, 28, 20] = products [750, 560, 440] -> DoC 750 / 560 = 1.339286: kept
    c1: noun [24, 24, 10] x caption [20, 25, 30] = [480, 600, 300]          -> DoC 480 / 600 = 0.8: dropped
    c2: noun [20, 25, 10] x caption [30, 24, 10] = [600, 600, 100]          -> DoC 1.0, a tie: dropped (> 1)
    c3: noun [22, -3, 5] x caption [25, 30, -2], clamped at 0 = [550, 0, 0] -> DoC 550 / 0 = inf: kept
    c4: noun [-1, 20, 20] x caption [30, 20, 20] = [0, 400, 400]            -> DoC 0 / 400 = 0: dropped
    """
    noun = [[25, 20, 22], [24, 24, 10], [20, 25, 10], [22, -3, 5], [-1, 20, 20]]
    cap = [[30, 28, 20], [20, 25, 30], [30, 24, 10], [25, 30, -2], [30, 20, 20]]
    doc = degree_of_distinctiveness(noun, cap, target=0)
    assert doc.tolist() == pytest.approx([1.339286, 0.8, 1.0, np.inf, 0.0], abs=1e-6)
    assert select_survivors(doc, n_masks=3).tolist() == [True, False, False, True, False]


def test_single_mask_keeps_the_top_half_by_noun_score_by_hand():
    """K = 1: DoC = the noun score; C = 5 candidates keep the top C // 2 = 2: nouns 30 and 25."""
    doc = degree_of_distinctiveness([[30], [10], [20], [25], [5]], [[1], [1], [1], [1], [1]], target=0)
    assert doc.tolist() == [30, 10, 20, 25, 5]
    assert select_survivors(doc, n_masks=1).tolist() == [True, False, False, True, False]
