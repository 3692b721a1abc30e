"""CRIS-style RIS model: shapes through forward/backward, letterbox round trip, evaluation at original size."""

import numpy as np
import pytest
import torch

from ris_utils.ris.dataset import letterbox_image, letterbox_mask, letterbox_params, unletterbox
from ris_utils.ris.model import MODEL_REGISTRY, build_model, ris_loss


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12)


def _tokens(b, L=8):
    t = torch.zeros(b, L, dtype=torch.long)
    t[:, 0], t[:, 1:4], t[:, 4] = 2, torch.randint(4, 12, (b, 3)), 3
    return t


def test_registry_names():
    assert {"cris_rn50", "cris_rn101", "cris_tiny"} <= set(MODEL_REGISTRY)
    with pytest.raises(ValueError, match="unknown RIS model"):
        build_model("cris_vit")


def test_forward_backward_shapes(tiny):
    img = torch.randn(3, 3, 64, 64)
    tokens = _tokens(3)
    c3, c4, c5 = tiny.backbone.encode_image(img)
    assert c3.shape == (3, tiny.backbone.channels[0], 8, 8)
    assert c4.shape == (3, tiny.backbone.channels[1], 4, 4)
    assert c5.shape == (3, tiny.backbone.channels[2], 2, 2)
    words, state = tiny.backbone.encode_text(tokens)
    assert words.shape == (3, 8, tiny.backbone.text_width) and state.shape == (3, tiny.backbone.embed_dim)
    logits = tiny(img, tokens)
    assert logits.shape == (3, 1, 16, 16)  # stride 4
    loss = ris_loss(logits, (torch.rand(3, 64, 64) > 0.7).float())
    tiny.zero_grad()
    loss.backward()
    for name in ("proj.txt.weight", "decoder.layers.0.cross_attn.in_proj_weight", "neck.txt_proj.0.weight",
                 "backbone.token_embedding.weight", "backbone.visual.conv1.weight"):
        g = dict(tiny.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


@pytest.mark.parametrize("k,channels_last", [(3, False), (3, True), (1, False), (5, True)])
def test_dynamic_conv_is_the_grouped_convolution_of_cris(k, channels_last):
    from ris_utils.ris.model import dynamic_conv

    g = torch.Generator().manual_seed(k)
    x = torch.randn(4, 6, 7, 9, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight, bias = torch.randn(4, 6 * k * k, generator=g), torch.randn(4, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref = torch.nn.functional.conv2d(leaves[0].reshape(1, 24, 7, 9), leaves[1].reshape(4, 6, k, k), leaves[2],
                                     padding=k // 2, groups=4).transpose(0, 1)  # CRIS's form
    got_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    got = dynamic_conv(*got_leaves, k)
    assert got.shape == ref.shape == (4, 1, 7, 9) and torch.allclose(got, ref, atol=1e-5)
    (ref * torch.arange(63.0).reshape(7, 9)).sum().backward()
    (got * torch.arange(63.0).reshape(7, 9)).sum().backward()
    for a, b in zip(leaves, got_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-4)


def test_words_change_the_prediction(tiny):
    tiny.eval()
    img = torch.randn(1, 3, 64, 64)
    a, b = _tokens(1), _tokens(1)
    b[0, 1:4] = (a[0, 1:4] - 4 + 1) % 8 + 4
    with torch.no_grad():
        assert not torch.allclose(tiny(img, a), tiny(img, b))
    tiny.train()


def test_padding_tokens_are_ignored(tiny):
    """Pad tokens after end-of-text do not change the output (key padding mask + causal text mask)."""
    tiny.eval()
    img = torch.randn(1, 3, 64, 64)
    t = _tokens(1)
    with torch.no_grad():
        base = tiny(img, t)
        t2 = t.clone()
        t2[0, 5:] = 0
        assert torch.allclose(base, tiny(img, t2))
    tiny.train()


@pytest.mark.parametrize("hw", [(40, 56), (90, 30), (64, 64)])
def test_a_batch_warped_back_holds_each_map_warped_alone(hw):
    from ris_utils.ris.dataset import unletterbox_batch

    lb = letterbox_params(*hw, 64)
    probs = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(1))
    together = unletterbox_batch(probs, lb)
    assert together.shape == (5, *hw)
    for p, t in zip(probs, together):
        assert torch.equal(unletterbox(p, lb), t)  # bit for bit: the scores do not depend on the batching


def test_object_pixels_index_the_object_masks(tmp_path):
    from ris_utils.ris.dataset import RisEvalSet, open_refer
    from ris_utils.ris.toy import make_toy_refer, toy_tokenizer_spec
    from ris_utils.ris.train import build_tokenizer

    toy = make_toy_refer(tmp_path / "toy", n_images=2, height=40, width=56)
    data = RisEvalSet(open_refer(toy), "val", build_tokenizer({"tokenizer": toy_tokenizer_spec(), "word_len": 8}), 32, 8)
    full = np.random.default_rng(0).random((40, 56), dtype=np.float32)
    objs, pix = data.image_objects(0), data.object_pixels(0)
    assert len(objs) >= 2 and [a for a, _ in objs] == [a for a, _ in pix]
    for (_, m), (_, idx) in zip(objs, pix):
        assert full[m].mean() == full.ravel()[idx].mean()  # the same values in the same order


def test_a_refer_set_is_read_and_tokenized_once_while_its_files_are_unchanged(tmp_path):
    from ris_utils.data import refer
    from ris_utils.ris.dataset import RisEvalSet, open_refer
    from ris_utils.ris.toy import make_toy_refer, toy_tokenizer_spec
    from ris_utils.ris.train import build_tokenizer

    toy = make_toy_refer(tmp_path / "toy", n_images=3, height=40, width=56)
    tok = build_tokenizer({"tokenizer": toy_tokenizer_spec(), "word_len": 8})
    a = open_refer(toy)
    assert open_refer(toy) is a
    e1, e2 = RisEvalSet(a, "val", tok, 32, 8), RisEvalSet(a, "val", tok, 32, 8)
    assert e1.tokens is e2.tokens and RisEvalSet(a, "val", tok, 32, 6).tokens[0].shape[-1] == 6
    # a rewritten file is read again
    refs = [dict(r, sentences=[dict(s, sent="a red box") for s in r["sentences"]]) for r in a.refs]
    refer.write_refer(toy, a.dataset, a.split_by, refs, list(a.imgs.values()), list(a.anns.values()),
                      [{"id": i, "name": n} for i, n in a.cats.items()])
    b = open_refer(toy)
    assert b is not a and b.refs[0]["sentences"][0]["sent"] == "a red box"
    assert RisEvalSet(b, "val", tok, 32, 8).tokens is not e1.tokens  # tokenized from the new sentences


@pytest.mark.parametrize("hw", [(40, 56), (90, 30), (64, 64)])
def test_letterbox_round_trip_non_square(hw):
    h, w = hw
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 5: w // 2] = 1
    lbimg, lb = letterbox_image(img, 64)
    assert lbimg.shape == (64, 64, 3) and lb == letterbox_params(h, w, 64)
    assert max(lb.new_h, lb.new_w) == 64
    lbm = letterbox_mask(mask, lb)
    # the padding holds no foreground; warping the letterboxed mask back recovers the original
    back = unletterbox(torch.from_numpy(lbm).float(), lb).numpy() > 0.5
    assert back.shape == (h, w)
    iou = (back & (mask > 0)).sum() / (back | (mask > 0)).sum()
    assert iou > 0.85
    # from a stride-4 map too (what the model outputs)
    small = torch.nn.functional.interpolate(torch.from_numpy(lbm).float()[None, None], size=(16, 16),
                                            mode="area")[0, 0]
    assert unletterbox(small, lb).shape == (h, w)


def test_unletterbox_crops_padding():
    """A prediction that is 1 only on the padding warps back to an all-zero mask."""
    lb = letterbox_params(32, 64, 64)  # content rows 16:48
    assert (lb.top, lb.new_h, lb.left, lb.new_w) == (16, 32, 0, 64)
    p = torch.zeros(64, 64)
    p[:16], p[48:] = 1.0, 1.0
    assert unletterbox(p, lb).max() == 0


def test_evaluate_checkpoint_non_square(tmp_path):
    """The evaluator scores every sentence at the original (non-square) size."""
    from ris_utils.ris.evaluate import evaluate_checkpoint, load_checkpoint
    from ris_utils.ris.toy import make_toy_refer, toy_tokenizer_spec
    from ris_utils.ris.train import train

    root = make_toy_refer(tmp_path / "toy", n_images=6, height=40, width=56)
    cfg = dict(tokenizer=toy_tokenizer_spec(8), word_len=8, input_size=32, epochs=1, batch_size=4, lr=1e-3,
               schedule={"name": "constant"}, threads=1, seed=0, device="cpu")
    res = train(cfg, root, tmp_path / "run", progress=False)
    ck = res["checkpoint"]
    loaded = load_checkpoint(ck)
    scores = evaluate_checkpoint(ck, root, "val", loaded=loaded, keep_predictions=100, device="cpu")
    assert scores["n"] == 3 * 2 * 2  # 3 val images x 2 refs x 2 sentences
    assert all(p.shape == (40, 56) for _, _, p in scores["predictions"])
    assert 0 <= scores["mIoU"] <= 100 and set(scores) >= {"oIoU", "Pr@0.5", "Pr@0.9"}
    # threshold 0 -> everything foreground -> IoU = mask area / image area exactly, at the original size
    from ris_utils.data.refer import select_split
    from ris_utils.ris.dataset import open_refer

    all_fg = evaluate_checkpoint(ck, root, "val", loaded=loaded, threshold=-1.0, device="cpu")
    refer = open_refer(root)
    areas = [refer.get_mask(r).sum() / (40 * 56) for r in select_split(refer.refs, "val") for _ in r["sentences"]]
    assert all_fg["mIoU"] == pytest.approx(100 * np.mean(areas), rel=1e-6)
