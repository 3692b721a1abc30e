"""Frozen CLIP towers (ris.freeze): exactly the named parameters and BatchNorm statistics are frozen; cached
frozen features give the same logits (and training) as the uncached forward; the feature cache is shared."""

import pytest
import torch
from test_ris_train import _cfg as _train_cfg

from ris_utils.ris.dataset import RisEvalSet, open_refer
from ris_utils.ris.features import ImageFeatureStore, TextFeatureStore, tower_digest
from ris_utils.ris.model import CRIS, build_model, set_c5_stride
from ris_utils.ris.toy import make_toy_refer
from ris_utils.ris.train import build_tokenizer, evaluate_model, make_model, resolve_config, train


def _tiny(freeze="none", c5_stride=32):
    torch.manual_seed(0)
    return build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12,
                       c5_stride=c5_stride).freeze(freeze)


def _tokens(b, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(b, L, dtype=torch.long)
    t[:, 0], t[:, 1:4], t[:, 4] = 2, torch.randint(4, 12, (b, 3), generator=g), 3
    return t


@pytest.mark.parametrize("which", ["none", "visual", "text", "both"])
def test_freeze_freezes_exactly_the_named_towers(which):
    m = _tiny(which)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    vis = {n for n, _ in m.named_parameters() if n.startswith("backbone.visual.")}
    txt = {n for n, _ in m.named_parameters() if n.startswith(CRIS.TOWERS["text"])}
    want = (vis if which in ("visual", "both") else set()) | (txt if which in ("text", "both") else set())
    assert vis and txt and frozen == want
    assert not any(n.startswith(("backbone.c5_shortcut", "neck.", "decoder.", "proj.")) for n in frozen)
    # BatchNorm statistics of a frozen image tower do not move in a training step; the head's do
    m.train()
    bn_vis = m.backbone.visual.bn1
    bn_head = m.neck.f5_norm[0]
    before = bn_vis.running_mean.clone(), bn_head.running_mean.clone()
    logits = m(torch.randn(4, 3, 64, 64), _tokens(4))
    logits.mean().backward()
    assert bn_vis.training == (which not in ("visual", "both"))
    assert torch.equal(bn_vis.running_mean, before[0]) == (which in ("visual", "both"))
    assert not torch.equal(bn_head.running_mean, before[1])
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert not grads & frozen and "proj.txt.weight" in grads
    names = {id(p) for g in m.param_groups(1e-3, 0.1, 0.0) for p in g["params"]}
    assert names == {id(p) for p in m.parameters() if p.requires_grad}  # frozen: not handed to the optimizer
    with pytest.raises(ValueError, match="ris.freeze"):
        m.freeze("backbone")


def test_cached_features_give_the_same_logits(tmp_path):
    m = _tiny("both", c5_stride=16).train()
    img, tok = torch.randn(6, 3, 64, 64), _tokens(6, seed=1)
    img[3] = img[1]  # two sentences about one image
    keys = [f"img{i}" for i in (0, 1, 2, 1, 4, 5)]
    ref = m(img, tok)
    store, tstore = ImageFeatureStore(m, 64, folder=tmp_path / "f"), TextFeatureStore(m)
    feats = store.batch(keys, img)
    assert store.misses == 5 and store.hits == 0  # img1 encoded once
    got = m(None, tok, feats=feats, text=tstore.batch(tok))
    # float noise only (features are computed one image at a time; BatchNorm's batch statistics amplify it)
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    # a second store (another run) reads the disk copy: no image is encoded again
    store2 = ImageFeatureStore(m, 64, folder=tmp_path / "f")
    with torch.no_grad():
        assert torch.allclose(m(None, tok, feats=store2.batch(keys, img * 0)), got, atol=1e-6, rtol=1e-6)
    assert store2.misses == 0
    # other weights -> another folder (never stale features)
    other = _tiny("both", c5_stride=16)
    with torch.no_grad():
        other.backbone.visual.conv1.weight.add_(0.1)
    assert tower_digest(other.backbone.visual) != tower_digest(m.backbone.visual)
    # the memory bound evicts the oldest
    small = ImageFeatureStore(m, 64, max_mb=1e-3)
    small.batch(keys, img)
    assert len(small.mem) == 1


def _cfg(**kw):
    return _train_cfg(**{"epochs": 2, **kw})  # the toy settings of test_ris_train, 2 epochs


def test_frozen_training_with_and_without_cache_is_identical(tmp_path):
    toy = make_toy_refer(tmp_path / "toy", n_images=12, height=40, width=56)
    a = train(_cfg(freeze="both"), toy, tmp_path / "a", val_path=toy, progress=False)
    b = train(_cfg(freeze="both", feature_cache=str(tmp_path / "cache")), toy, tmp_path / "b", val_path=toy,
              progress=False)
    assert any((tmp_path / "cache").rglob("*.pt"))
    la = [h["train_loss"] for h in a["history"]]
    lb = [h["train_loss"] for h in b["history"]]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    ca = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    # frozen towers stay where they were after the first epoch; the head moved
    train(_cfg(freeze="both"), toy, tmp_path / "c", progress=False, stop_after_epoch=1)
    fresh = torch.load(tmp_path / "c" / "last.pt", weights_only=False)["model"]
    assert torch.equal(ca["backbone.token_embedding.weight"], fresh["backbone.token_embedding.weight"])
    assert torch.equal(ca["backbone.visual.conv1.weight"], fresh["backbone.visual.conv1.weight"])
    assert torch.equal(ca["backbone.visual.bn1.running_mean"], fresh["backbone.visual.bn1.running_mean"])
    assert not torch.equal(ca["proj.txt.weight"], fresh["proj.txt.weight"])
    # evaluation through the stores = the plain forward
    cfg = resolve_config(_cfg(freeze="both"))
    tok = build_tokenizer(cfg)
    model = make_model(cfg, tok)
    model.load_state_dict(ca)
    data = RisEvalSet(open_refer(toy), "val", tok, cfg["input_size"], cfg["word_len"])
    from ris_utils.ris.features import feature_stores

    plain = evaluate_model(model, data, cfg, "cpu", keep_predictions=100)
    cached = evaluate_model(model, data, cfg, "cpu", keep_predictions=100, stores=feature_stores(model, cfg))
    assert cached["ious"] == pytest.approx(plain["ious"], abs=1e-6)


def test_c5_stride_16_doubles_the_c5_grid():
    m = _tiny("none", c5_stride=16)
    c3, c4, c5 = m.backbone.encode_image(torch.randn(2, 3, 64, 64))
    assert c4.shape[-1] == 4 and c5.shape[-1] == 4  # stride 16, not 32
    with pytest.raises(ValueError, match="c5_stride"):
        set_c5_stride(m.backbone.visual, 8)


def test_clip_prior_and_per_image_neck_give_the_same_logits_as_per_sentence():
    torch.manual_seed(0)
    m = build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12, c5_stride=16,
                    clip_prior="value", prior_feature=True, proj_upsample=2).freeze("both").eval()
    img, tok = torch.randn(3, 3, 64, 64), _tokens(5, seed=2)
    feats = m.encode_image(img)
    assert len(feats) == 5  # + MaskCLIP's dense values for the prior
    index = torch.tensor([0, 0, 1, 2, 2])
    with torch.no_grad():
        per_sentence = m(img[index], tok)
        per_image = m(None, tok, feats=feats, image_index=index)
    assert per_sentence.shape == (5, 1, 8, 8)  # stride 8: the projector upsamples x2
    assert torch.allclose(per_image, per_sentence, atol=1e-5)
    # the prior is the pretrained CLIP's cosine score, scaled: its sign follows the cosine
    d, s = feats[4][:1], m.encode_text(tok[:1])[1]
    cos = torch.nn.functional.cosine_similarity(d, s[:, :, None, None], dim=1)
    assert torch.allclose(m.prior_logits(d, s)[:, 0], 10 * cos - 4, atol=1e-5)
    m.train()
    with pytest.raises(ValueError, match="evaluation"):
        m(None, tok, feats=feats, image_index=index)
    groups = {g["name"]: g for g in m.param_groups(1e-3, 0.1, 0.01)}
    assert groups["clip_prior"]["lr"] == pytest.approx(2e-2) and groups["clip_prior"]["weight_decay"] == 0


def test_a_cached_feature_does_not_depend_on_its_batch(tmp_path):
    m = _tiny("both", c5_stride=16)
    img = torch.randn(4, 3, 64, 64)
    together = ImageFeatureStore(m, 64).batch(["a", "b", "c", "d"], img)
    alone = ImageFeatureStore(m, 64).batch(["c"], img[2:3])
    for t, a in zip(together, alone):
        assert torch.equal(t[2], a[0])  # bit for bit: which images shared the batch (or the run) does not matter


def test_train_steps_and_the_pick_vs_step_curve(tmp_path):
    import json

    toy = make_toy_refer(tmp_path / "toy", n_images=12, height=40, width=56)
    res = train(_cfg(train_steps=5, val_every=2, epochs=1), toy, tmp_path / "run", val_path=toy, progress=False)
    assert res["history"][-1]["step"] == 5  # 5 optimizer steps, whatever the epochs setting
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [c["step"] for c in curve] == [2, 4, 5] and all(0 <= c["pick_acc"] <= 1 for c in curve)
    # with the curve on, per-epoch val scores are the last epoch's only: the curve's evaluation at that step
    res = train(_cfg(train_steps=7, val_every=2, epochs=1), toy, tmp_path / "run2", val_path=toy,
                progress=False)
    curve = json.loads((tmp_path / "run2" / "curve.json").read_text())
    hist = res["history"]
    assert len(hist) == 3 and not any("val_mIoU" in h for h in hist[:-1])  # 3 steps an epoch
    assert hist[-1]["val_mIoU"] == curve[-1]["mIoU"] and hist[-1]["val_pick_acc"] == curve[-1]["pick_acc"]


def test_a_disk_backed_store_shares_the_process_memory_in_the_model_layout(tmp_path):
    m = _tiny("both", c5_stride=16)
    m.channels_last = True
    img = torch.randn(3, 3, 64, 64)
    first = ImageFeatureStore(m, 64, folder=tmp_path / "f", channels_last=True)
    feats = first.batch(["a", "b", "a"], img)
    assert first.misses == 2 and all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    for f in first.folder.glob("*.pt"):  # the next run of this process reads memory, not the files
        f.unlink()
    second = ImageFeatureStore(m, 64, folder=tmp_path / "f", channels_last=True)
    again = second.batch(["b", "a"], img * 0)
    assert second.misses == 0 and second.hits == 2
    assert all(torch.equal(x, y) for x, y in zip(again, (f[[1, 0]] for f in feats)))
    # another layout is another copy (same values), and a store without a folder keeps its own
    plain = ImageFeatureStore(m, 64, folder=tmp_path / "f")
    assert plain.mem is not first.mem and ImageFeatureStore(m, 64).mem is not ImageFeatureStore(m, 64).mem
    assert all(f.is_contiguous() for f in plain.batch(["a"], img))


def test_cached_features_read_the_letterbox_from_the_image_header(tmp_path):
    import numpy as np
    from PIL import Image

    toy = make_toy_refer(tmp_path / "toy", n_images=3, height=40, width=56)
    tok = build_tokenizer(resolve_config(_cfg()))
    decoded = RisEvalSet(open_refer(toy), "val", tok, 32, 8)
    header = RisEvalSet(open_refer(toy), "val", tok, 32, 8)
    header.with_images = False
    assert header.geometry(0) == decoded.geometry(0) and not header._img_cache
    path = header.refer.image_path(header.refs[0]["image_id"])
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(path)  # the file no longer matches instances.json
    fresh = RisEvalSet(open_refer(toy), "val", tok, 32, 8)
    fresh.with_images = False
    with pytest.raises(ValueError, match="instances.json says 56x40"):
        fresh.geometry(0)


def test_pick_accuracy_by_the_attribute_an_expression_names():
    from ris_utils.ris.diagnostics import named_attributes, pick_by_attribute

    assert named_attributes("the left red circle") == {"location", "color", "shape"}
    assert named_attributes("the second big striped star from the top") == {"location", "size", "pattern", "shape"}
    out = pick_by_attribute([("the red circle", True), ("the left circle", False), ("the big red square", False)])
    assert out["pick_acc_color"] == 0.5 and out["pick_n_color"] == 2
    assert out["pick_acc_location"] == 0.0 and out["pick_acc_shape"] == pytest.approx(1 / 3)
    assert "pick_acc_pattern" not in out


def test_the_claims_table_says_held_or_not():
    import pandas as pd

    from ris_utils.ris.tables import claims

    summary = pd.DataFrame([
        {"trainset": "naive", "style": "s", "split": "val", "mIoU": 30.0, "mIoU_std": 0.5},
        {"trainset": "pseudo_ris", "style": "s", "split": "val", "mIoU": 30.8, "mIoU_std": 0.3},
        {"trainset": "distinctive", "style": "s", "split": "val", "mIoU": 30.5, "mIoU_std": 0.2}])
    rows = {r["claim"]: r for r in claims(summary, [("s", "val")])}
    assert rows["pseudo_ris_above_naive"]["holds"] is False  # +0.8 is not > 2 x 0.5
    assert rows["distinctive_above_naive"]["holds"] is True and rows["pseudo_ris_above_distinctive"]["holds"] is True
    assert rows["gt_above_pseudo_ris"]["holds"] is None  # not measured


def test_features_encoded_before_the_runs_are_the_bytes_a_run_would_compute(tmp_path):
    from ris_utils.ris.experiments import Job, encode_images, job_images
    from ris_utils.ris.features import feature_stores

    toy = make_toy_refer(tmp_path / "toy", n_images=6, height=40, width=56)
    cfg = {**_cfg(freeze="both"), "data_root": str(toy), "feature_cache": str(tmp_path / "cache")}
    job = Job(trainset="gt", style="toy", seed=0, train_path=str(toy), train_dataset=None, split_by=None,
              out=str(tmp_path / "run"), evals=[{"style": "toy", "dataset": "toy", "split_by": "toy",
                                                  "splits": ["val"]}])
    keys = job_images([job], cfg)
    assert len(keys) == 6 and all(k.endswith("@32") for k in keys)
    assert encode_images(keys, cfg) == 6 and encode_images(keys, cfg) == 0  # the second call finds them all
    # a training run's own store computes the same features for those images
    rcfg = resolve_config(cfg)
    tok = build_tokenizer(rcfg)
    data = RisEvalSet(open_refer(toy), "val", tok, rcfg["input_size"], rcfg["word_len"])
    torch.manual_seed(0)
    fresh = feature_stores(make_model(rcfg, tok), {**rcfg, "feature_cache": None})[0]
    torch.manual_seed(0)
    warm = feature_stores(make_model(rcfg, tok), rcfg)[0]
    k = data.image_keys([0])
    img = data[0]["img"][None]
    for a, b in zip(fresh.batch(k, img), warm.batch(k, torch.zeros_like(img))):  # warm: read, never recomputed
        assert torch.equal(a, b)
    assert warm.misses == 0


def test_relative_location_points_at_the_extreme_object_and_starts_as_identity():
    from ris_utils.ris.model import RelativeLocation

    head = RelativeLocation(vocab_size=12)
    logits = torch.full((1, 1, 8, 8), -6.0)
    logits[0, 0, 1:3, 1:3] = 2.0   # an object top-left
    logits[0, 0, 5:7, 5:7] = 2.0   # the same kind of object bottom-right
    tok = _tokens(1)
    pad = tok == 0
    assert torch.equal(head(logits, tok, pad), torch.zeros_like(logits))  # zero last layer: identity at start
    with torch.no_grad():  # a sentence whose words say "x to the right": w_x = 4
        head.head[-1].bias.copy_(torch.tensor([4.0, 0, 0, 0, 0]))
    r = head(logits, tok, pad)[0, 0]
    assert r[5:7, 5:7].min() > 2 and r[1:3, 1:3].max() < -2  # the right object up, the left one down
    assert r[0, 7].abs() < 0.1  # background (p ~ 0) untouched


def test_projector_c3_skip_and_location_head_in_the_model():
    torch.manual_seed(0)
    m = build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12, c5_stride=16,
                    proj_upsample=2, proj_skip=True, location="relative").freeze("both").eval()
    img, tok = torch.randn(3, 3, 64, 64), _tokens(5, seed=2)
    feats = m.encode_image(img)
    index = torch.tensor([0, 0, 1, 2, 2])
    with torch.no_grad():
        per_sentence = m(img[index], tok)
        per_image = m(None, tok, feats=feats, image_index=index)
    assert per_sentence.shape == (5, 1, 8, 8) and torch.allclose(per_image, per_sentence, atol=1e-5)
    groups = {g["name"]: g for g in m.param_groups(1e-3, 0.1, 0.01, location_lr_mult=20)}
    assert groups["location"]["lr"] == pytest.approx(2e-2)
    assert {id(p) for p in groups["location"]["params"]} == {id(p) for p in m.location.parameters()}
    with pytest.raises(ValueError, match="upsample 2"):
        build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12, proj_skip=True)


def test_bag_location_head_gives_a_word_the_same_push_in_any_phrase():
    from ris_utils.ris.model import RelativeLocation

    head = RelativeLocation(vocab_size=12, pool="bag")
    # sentences (SOT=2, EOT=3, pad=0): "the(5) right(7) ring(9)" and "the ring on(6) the right" and "ring"
    tok = torch.tensor([[2, 5, 7, 9, 3, 0, 0, 0], [2, 5, 9, 6, 5, 7, 3, 0], [2, 9, 3, 0, 0, 0, 0, 0]])
    pad = tok == 0
    assert torch.equal(head.coefficients(tok, pad), torch.zeros(3, 6))  # identity at start
    with torch.no_grad():
        head.words.weight[7] = torch.tensor([4.0, 0, 0, 0, 0, 0])  # "right": w_x = 4
        head.words.weight[0] = 100.0  # padding must not count
    co = head.coefficients(tok, pad)
    assert torch.equal(co[0], co[1]) and co[0, 0] == 4.0 and torch.equal(co[2], torch.zeros(6))
    logits = torch.full((3, 1, 8, 8), -6.0)
    logits[:, 0, 3:5, 1:3] = 2.0   # two objects of one kind, left and right
    logits[:, 0, 3:5, 5:7] = 2.0
    r = head(logits, tok, pad)
    assert r[0, 0, 3:5, 5:7].min() > 2 and r[0, 0, 3:5, 1:3].max() < -2 and torch.equal(r[0], r[1])
    assert r[2].abs().max() == 0  # no location word: untouched
    # "second from the right" over three objects in a row: w_x > 0 with q_w > 0 peaks at the middle one
    logits = torch.full((1, 1, 8, 12), -6.0)
    for x0 in (1, 5, 9):
        logits[0, 0, 3:5, x0:x0 + 2] = 2.0
    with torch.no_grad():
        head.words.weight[9] = torch.tensor([0, 0, 0, 0, 0, 6.0])  # "ring" plays "second": q_w = 6
    r = head(logits, tok[:1], pad[:1])[0, 0]
    assert r[3:5, 5:7].mean() > r[3:5, 9:11].mean() > r[3:5, 1:3].mean()
    with pytest.raises(ValueError, match="location_args.pool"):
        RelativeLocation(vocab_size=12, pool="max")


def test_neck_kernel_1_makes_every_neck_conv_1x1_and_keeps_the_shapes():
    from ris_utils.ris.model import FPN

    torch.manual_seed(0)
    feats = (torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 24, 4, 4))
    state = torch.randn(2, 24)
    outs = {}
    for k in (3, 1):
        neck = FPN((16, 32, 24), (8, 16, 24), kernel=k).eval()
        sizes = {m.kernel_size for m in neck.modules() if isinstance(m, torch.nn.Conv2d)}
        assert sizes == ({(1, 1), (3, 3)} if k == 3 else {(1, 1)})
        outs[k] = neck(feats, state)
    assert outs[1].shape == outs[3].shape == (2, 16, 4, 4)
    m = build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12, neck_kernel=1)
    assert m.neck.q3[0].kernel_size == (1, 1)
    with pytest.raises(ValueError, match="neck_kernel"):
        FPN((16, 32, 24), (8, 16, 24), kernel=5)


def test_channels_last_head_gives_the_same_logits_and_leaves_the_trunk_alone():
    img, tok = torch.randn(3, 3, 64, 64), _tokens(3, seed=4)
    out = {}
    for cl in (False, True):
        torch.manual_seed(0)
        m = build_model("cris_tiny", word_len=8, eot_token_id=3, image_size=64, vocab_size=12, c5_stride=16,
                        proj_upsample=2, proj_skip=True, location="relative", neck_kernel=1,
                        channels_last=cl).freeze("both").eval()
        w = m.proj.vis[1][0].weight  # the projector's 3x3 conv
        assert w.shape[-1] == 3 and w.is_contiguous() != cl
        assert w.is_contiguous(memory_format=torch.channels_last) == cl
        assert m.backbone.visual.conv1.weight.is_contiguous()  # the trunk (cached features) is untouched
        with torch.no_grad():
            out[cl] = (m.encode_image(img), m(img, tok))
    assert all(torch.equal(a, b) for a, b in zip(out[False][0], out[True][0]))  # same cached features
    assert torch.allclose(out[False][1], out[True][1], atol=1e-5)
