"""Step 3: DoC against hand computations, survivors, fallback, and the CLIP scoring path with a tiny
random-init open_clip RN50-family model (ModifiedResNet, ris_utils/model_configs/rn50_tiny.json)."""

import json
import logging
import math

import numpy as np
import pytest

from ris_utils.filtering import apply_fallback, degree_of_distinctiveness, select_survivors

# --------------------------------------------------------------------------- DoC on fixed scores


def test_doc_matches_hand_computation():
    noun = [[30.0, 20.0, 10.0], [10.0, 25.0, 20.0]]
    cap = [[25.0, 30.0, 5.0], [30.0, 20.0, 28.0]]
    doc = degree_of_distinctiveness(noun, cap, target=0)
    # candidate 0: products 750, 600, 50 -> 750 / 600; candidate 1: 300, 500, 560 -> 300 / 560
    assert doc == pytest.approx([750 / 600, 300 / 560])
    assert select_survivors(doc, 3).tolist() == [True, False]
    # target 2 of the same scores: candidate 0: 50 / 750, candidate 1: 560 / 500
    assert degree_of_distinctiveness(noun, cap, target=2) == pytest.approx([50 / 750, 560 / 500])


def test_doc_tie_is_not_kept():
    doc = degree_of_distinctiveness([[20.0, 10.0]], [[10.0, 20.0]], target=0)  # 200 / 200
    assert doc[0] == 1.0
    assert not select_survivors(doc, 2)[0]


def test_single_mask_rule_keeps_top_half_by_noun_score():
    noun = [[5.0], [9.0], [7.0], [7.0], [1.0]]
    cap = [[0.0], [0.0], [3.0], [4.0], [0.0]]
    doc = degree_of_distinctiveness(noun, cap, target=0)
    assert doc.tolist() == [5.0, 9.0, 7.0, 7.0, 1.0]  # DoC = the noun score
    keep = select_survivors(doc, 1, np.asarray(noun)[:, 0], np.asarray(cap)[:, 0])
    # 5 // 2 = 2 kept: 9, then ONE of the two 7s -- the one np.argsort(doc)[::-1] puts first (the authors'
    # order; caption scores do not break ties)
    assert keep.sum() == 2 and keep[1] and keep[2] != keep[3] and not keep[[0, 4]].any()
    assert keep[int(np.argsort(doc)[::-1][1])]
    assert select_survivors(np.ones(4), 1).sum() == 2
    assert select_survivors(np.zeros(0), 1).tolist() == []


def test_nonpositive_scores_clamp():
    # the target's noun score is negative -> product_t = 0 -> DoC 0, not kept
    d = degree_of_distinctiveness([[-5.0, 10.0]], [[30.0, 10.0]], target=0)
    assert d[0] == 0.0
    # every competitor non-positive: (-10) x (-10) would be +100 without the clamp; clamped it is 0 -> inf
    d = degree_of_distinctiveness([[10.0, -10.0]], [[10.0, -10.0]], target=0)
    assert math.isinf(d[0]) and d[0] > 0 and select_survivors(d, 2)[0]
    # 0 / 0 := 0
    d = degree_of_distinctiveness([[0.0, -1.0]], [[5.0, 5.0]], target=0)
    assert d[0] == 0.0
    # a zero competitor next to a positive one: the max decides
    d = degree_of_distinctiveness([[10.0, 0.0, 4.0]], [[10.0, 50.0, 5.0]], target=0)
    assert d[0] == pytest.approx(100 / 20)


def test_nonpositive_scores_shift():
    d = degree_of_distinctiveness([[-5.0, 10.0]], [[30.0, 10.0]], target=0, nonpositive="shift", logit_scale=100)
    assert d[0] == pytest.approx((95 * 130) / (110 * 110))


def test_doc_rejects_bad_input():
    with pytest.raises(ValueError, match="CxK"):
        degree_of_distinctiveness([[1.0, 2.0]], [[1.0]], target=0)
    with pytest.raises(ValueError, match="target"):
        degree_of_distinctiveness([[1.0, 2.0]], [[1.0, 2.0]], target=2)
    with pytest.raises(ValueError, match="finite"):
        degree_of_distinctiveness([[np.nan, 2.0]], [[1.0, 2.0]], target=0)
    with pytest.raises(ValueError, match="nonpositive"):
        degree_of_distinctiveness([[1.0, 2.0]], [[1.0, 2.0]], target=0, nonpositive="abs")


def test_fallback():
    rng = np.random.default_rng(0)
    assert apply_fallback([True, False, True], "keep_random", rng) == ([0, 2], None, None)
    surv, fb, dropped = apply_fallback([False] * 5, "keep_random", np.random.default_rng(3))
    assert fb == "keep_random" and dropped is None and len(surv) == 1 and 0 <= surv[0] < 5
    assert surv == apply_fallback([False] * 5, "keep_random", np.random.default_rng(3))[0]  # seeded
    assert apply_fallback([False] * 5, "drop", rng) == ([], None, "no_survivor")
    assert apply_fallback([], "keep_random", rng) == ([], None, "no_candidates")
    with pytest.raises(ValueError, match="fallback"):
        apply_fallback([True], "random", rng)


# --------------------------------------------------------------------------- CLIP path (tiny RN50 family)


def _scene(tmp_path, n_images=2):
    """Hand-made images (3 coloured squares) and captions records in the engine's layout."""
    from PIL import Image

    from ris_utils.data.refer import encode_mask

    (tmp_path / "images").mkdir(exist_ok=True)
    recs = []
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    for i in range(n_images):
        img = np.full((64, 64, 3), 235, np.uint8)
        masks = []
        for j, (x, y) in enumerate([(4, 6), (26, 30), (44, 8)][: 3 - i]):  # image 2 has 2 masks
            m = np.zeros((64, 64), bool)
            m[y:y + 14, x:x + 14] = True
            img[m] = list(colors.values())[j]
            masks.append(m)
        name = f"img_{i}.png"
        Image.fromarray(img).save(tmp_path / "images" / name)
        body = {"height": 64, "width": 64, "masks": []}
        for j, m in enumerate(masks):
            c = list(colors)[j]
            cands = [{"text": t, "view": v, "setting": s, "mode": "distinctive"}
                     for t, v, s in [(f"a {c} square", 0, "beam"), ("a square", 1, "top_k=5"),
                                     (f"the {c} box on the left", 3, "top_p=0.4"), (f"a {c} square", 2, "top_k=7")]]
            body["masks"].append({"mask_index": j, "segmentation": encode_mask(m), "bbox": [0, 0, 1, 1],
                                  "candidates": cands})
        recs.append({"image_id": i + 1, "file_name": name, "status": "ok", "error": None, **body})
    cdir = tmp_path / "captions"
    cdir.mkdir()
    (cdir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return cdir, recs


def _new_tiny_scorer():
    """A ClipScorer on a random-init ``rn50_tiny`` (seed 0), its own model: tests may change its weights."""
    import open_clip
    import torch

    from ris_utils.crops import model_view_settings
    from ris_utils.filtering import ClipScorer
    from ris_utils.models import register_open_clip_configs

    register_open_clip_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("rn50_tiny", pretrained=None)
    assert type(model.visual).__name__ == "ModifiedResNet"
    vs = model_view_settings(model)
    return ClipScorer(model, open_clip.get_tokenizer("rn50_tiny"), vs["size"], vs["mean"], vs["std"])


def _image_with_two_masks():
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    masks = np.zeros((2, 40, 40), bool)
    masks[0, :10, :10] = masks[1, 20:30, 20:30] = True
    return img, masks


@pytest.fixture(scope="module")
def tiny_scorer():
    logging.getLogger().setLevel(logging.ERROR)
    return _new_tiny_scorer()


def test_scores_are_clip_logits_and_features_computed_once(tmp_path, tiny_scorer):
    import torch

    from ris_utils.crops import make_views
    from ris_utils.data.refer import decode_segmentation
    from ris_utils.filtering import filter_record
    from ris_utils.images import load_image_rgb
    from ris_utils.text import HeadNounExtractor

    _, recs = _scene(tmp_path, 1)
    rec = recs[0]
    image = load_image_rgb(tmp_path / "images" / rec["file_name"])
    model = tiny_scorer.model
    calls = {"image": [], "text": []}
    orig_i, orig_t = model.encode_image, model.encode_text
    model.encode_image = lambda x, **k: calls["image"].append(len(x)) or orig_i(x, **k)
    model.encode_text = lambda x, **k: calls["text"].append(len(x)) or orig_t(x, **k)
    try:
        out = filter_record(rec, image, tiny_scorer, HeadNounExtractor("rules"), seed=0)
    finally:
        model.encode_image, model.encode_text = orig_i, orig_t
    K = len(rec["masks"])
    assert calls["image"] == [K, K]  # one pass per view kind (masked, x1.2), all masks batched
    texts = {c["text"] for m in rec["masks"] for c in m["candidates"]}
    prompts = {f"a photo of a {n}" for n in ("square", "box")}
    assert calls["text"] == [len(texts | prompts)]  # one pass over the distinct strings
    # one score recomputed by hand: CLIP(masked crop of mask 1, "a photo of a square") and the x1.2 crop
    masks = np.stack([decode_segmentation(m["segmentation"], 64, 64) for m in rec["masks"]]).astype(bool)
    with torch.no_grad():
        xm = make_views(image, masks, views=("masked",), size=tiny_scorer.size, mean=tiny_scorer.mean,
                        std=tiny_scorer.std)[:, 0]
        x12 = make_views(image, masks, views=(1.2,), size=tiny_scorer.size, mean=tiny_scorer.mean,
                         std=tiny_scorer.std)[:, 0]
        fi = torch.nn.functional.normalize(model.encode_image(xm), dim=-1)
        fc = torch.nn.functional.normalize(model.encode_image(x12), dim=-1)
        tok = tiny_scorer.tokenizer(["a photo of a square", "a red square"])
        ft = torch.nn.functional.normalize(model.encode_text(tok), dim=-1)
    scale = float(model.logit_scale.exp().detach())
    c0 = out["masks"][0]["candidates"][0]
    assert c0["noun"] == "square"
    assert c0["noun_scores"] == pytest.approx((scale * fi @ ft[0]).tolist(), rel=1e-4, abs=1e-4)
    assert c0["caption_scores"] == pytest.approx((scale * fc @ ft[1]).tolist(), rel=1e-4, abs=1e-4)
    for t, m in enumerate(out["masks"]):
        for c in m["candidates"]:
            d = degree_of_distinctiveness([c["noun_scores"]], [c["caption_scores"]], t)[0]
            assert c["doc"] == pytest.approx(d) and c["keep"] == (d > 1)
        assert m["survivors"] == [i for i, c in enumerate(m["candidates"]) if c["keep"]] or m["fallback"]


def test_run_filter_resumable_deterministic(tmp_path, tiny_scorer):
    from ris_utils import engine
    from ris_utils.filtering import run_filter

    cdir, recs = _scene(tmp_path, 2)
    cfg = {"seed": 0, "fallback": "drop", "images": str(tmp_path / "images"), "head_noun": {"backend": "rules"}}
    s = run_filter(cdir, tmp_path / "f1", cfg, scorer=tiny_scorer, progress=False)
    assert s["ok"] == 2 and s["failed"] == 0
    again = run_filter(cdir, tmp_path / "f2", cfg, scorer=tiny_scorer, progress=False)
    assert again["ok"] == 2
    assert (tmp_path / "f1" / "records.jsonl").read_text() == (tmp_path / "f2" / "records.jsonl").read_text()
    out = list(engine.read_records(tmp_path / "f1"))
    assert [r["n_masks"] for r in out] == [3, 2]
    for r in out:
        for m in r["masks"]:
            assert set(m) >= {"survivors", "fallback", "dropped", "candidates", "segmentation"}
            assert m["fallback"] is None  # drop policy
            assert (m["dropped"] == "no_survivor") == (not m["survivors"])
            for c in m["candidates"]:
                assert len(c["noun_scores"]) == r["n_masks"] == len(c["caption_scores"])
    with pytest.raises(ValueError, match="fallback"):
        run_filter(cdir, tmp_path / "f3", {**cfg, "fallback": "nope"}, scorer=tiny_scorer, progress=False)


def test_build_clip_from_profile_style_config():
    from ris_utils.filtering import build_clip

    model, tok, vs = build_clip({"clip": {"model": "rn50_tiny", "pretrained": None, "tokenizer": "open_clip"},
                                 "device": "cpu"})
    assert vs["size"] == 64 and tok(["a photo of a dog"]).shape == (1, 77)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        build_clip({"clip": {"model": "clip_shapes", "checkpoint": "/nonexistent/x.pt", "tokenizer": "shapes"},
                    "device": "cpu"})
    with pytest.raises(ValueError, match="clip.model"):
        build_clip({"clip": {}})


def test_cli_filter_with_a_profile_file(tmp_path):
    import yaml

    from ris_utils import engine
    from ris_utils.__main__ import main

    cdir, _ = _scene(tmp_path, 1)
    prof = {"shared": {"seed": 0, "device": "cpu", "data_root": str(tmp_path), "work_dir": str(tmp_path / "w")},
            "filter": {"clip": {"model": "rn50_tiny", "pretrained": None, "tokenizer": "open_clip"},
                       "fallback": "keep_random", "head_noun": {"backend": "rules"}, "threads": 1}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prof))
    args = ["filter", "--candidates", str(cdir), "--profile", str(tmp_path / "p.yaml")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0  # seeded random init: same records
    assert (tmp_path / "a" / "records.jsonl").read_text() == (tmp_path / "b" / "records.jsonl").read_text()
    rec = next(engine.read_records(tmp_path / "a"))
    assert all(m["survivors"] for m in rec["masks"])  # keep_random: every mask keeps >= 1 candidate
    with pytest.raises(SystemExit):
        main(["filter", "--candidates", str(tmp_path / "none"), "--out", str(tmp_path / "c"),
              "--profile", str(tmp_path / "p.yaml")])


def test_train_clip_short_run_writes_a_loadable_checkpoint(tmp_path):
    """The shapes CLIP trainer (few steps): weights + card, loaded by build_clip (train_if_missing path)."""
    import torch

    from ris_utils.filtering import build_clip

    ckpt = tmp_path / "clip_shapes.pt"
    clip = {"model": "clip_shapes", "checkpoint": str(ckpt), "tokenizer": "shapes", "train_if_missing": True,
            "train": {"steps": 3, "batch_size": 8, "n_images": 3, "val_images": 2, "warmup": 1, "threads": 1}}
    model, tok, vs = build_clip({"clip": clip, "device": "cpu"})
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert card["bytes"] == ckpt.stat().st_size < 10_000_000 and card["train"]["steps"] == 3
    assert 0 <= card["val"]["noun_accuracy"] <= 1 and card["parameters"] > 0
    assert type(model.visual).__name__ == "ModifiedResNet" and vs["size"] == 32
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v.half().float(), model.state_dict()[k].float()) for k, v in state.items())
    assert tok(["a photo of a circle"]).shape == (1, model.context_length)
    # same seed, same weights
    from ris_utils.train_clip import train_clip

    train_clip({"clip": clip}, out=tmp_path / "again.pt", progress=False)
    again = torch.load(tmp_path / "again.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, again[k]) for k, v in state.items())


# --------------------------------------------------------------------------- the authors' rules (issue 14)


def test_fallback_all_exports_every_candidate_of_a_no_survivor_mask():
    # the authors' loader draws over ALL candidates when none has DoC > 1 (pseudo_datasets.py l. 655)
    surv, fb, dropped = apply_fallback([False] * 5, "all", np.random.default_rng(0))
    assert (surv, fb, dropped) == ([0, 1, 2, 3, 4], "all", None)
    assert apply_fallback([False, True], "all", np.random.default_rng(0)) == ([1], None, None)
    assert apply_fallback([], "all", np.random.default_rng(0)) == ([], None, "no_candidates")


def test_single_mask_keeps_c_floor_half_in_argsort_order():
    # C = 3: the authors keep 3 // 2 = 1 (the project used to keep ceil(3 / 2) = 2)
    assert select_survivors(np.array([5.0, 9.0, 7.0]), 1).tolist() == [False, True, False]
    # C = 1 keeps none: the fallback decides (the authors' random.choice([]) would crash)
    assert select_survivors(np.array([3.0]), 1).tolist() == [False]
    # ties follow np.argsort(doc)[::-1]: the LAST of equal values first
    doc = np.array([7.0, 9.0, 7.0, 7.0, 1.0])
    expect = np.zeros(5, bool)
    expect[np.argsort(doc)[::-1][:2]] = True
    assert select_survivors(doc, 1).tolist() == expect.tolist()
    assert expect[1] and expect.sum() == 2


def test_doc_in_float16_matches_the_authors_fp16_arithmetic():
    import torch

    noun = np.array([[21.3, 19.7, 20.9], [18.2, 22.1, 17.5]], np.float32)
    cap = np.array([[25.5, 24.9, 26.1], [23.3, 22.7, 24.0]], np.float32)
    got = degree_of_distinctiveness(noun, cap, 0, dtype="float16")
    n, c = torch.tensor(noun).half(), torch.tensor(cap).half()  # their fp16 CLIP logits
    prod = n * c
    ref = (prod[:, 0] / prod[:, 1:].max(dim=1).values).double().numpy()
    assert got.tolist() == ref.tolist()
    assert not np.allclose(got, degree_of_distinctiveness(noun, cap, 0), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="dtype"):
        degree_of_distinctiveness(noun, cap, 0, dtype="float32")


def test_noun_prompt_drops_its_article_when_the_noun_has_one(tiny_scorer):
    assert tiny_scorer.prompt_for("dog") == "a photo of a dog"
    assert tiny_scorer.prompt_for("a red dog on the left") == "a photo of a red dog on the left"
    assert tiny_scorer.prompt_for("the man") == "a photo of the man"
    assert tiny_scorer.prompt_for("An apple") == "a photo of a An apple"  # their check is case-sensitive
    assert tiny_scorer.prompt_for("anchor") == "a photo of a anchor"  # the article rule looks at whole words


def test_precision_fp16_is_a_no_op_on_cpu(tiny_scorer):
    from ris_utils.filtering import ClipScorer

    s = ClipScorer(tiny_scorer.model, tiny_scorer.tokenizer, tiny_scorer.size, tiny_scorer.mean, tiny_scorer.std,
                   precision="fp16")
    assert s.precision == "fp32" and s.doc_dtype == "float64"
    assert next(s.model.parameters()).dtype == next(tiny_scorer.model.parameters()).dtype
    with pytest.raises(ValueError, match="filter.precision"):
        ClipScorer(tiny_scorer.model, tiny_scorer.tokenizer, 32, (0, 0, 0), (1, 1, 1), precision="bf16")
    with pytest.raises(ValueError, match="filter.box"):
        ClipScorer(tiny_scorer.model, tiny_scorer.tokenizer, 32, (0, 0, 0), (1, 1, 1), box="inclusive")


def test_image_features_kept_within_a_scope_and_dropped_when_the_weights_change():
    import torch

    s = _new_tiny_scorer()
    img, masks = _image_with_two_masks()
    fresh = s.image_features(img, masks)
    assert s.image_features(img, masks) is not fresh  # outside a scope: computed every time
    with s.keeping_image_features():
        first = s.image_features(img, masks)
        assert s.image_features(img, masks.copy()) is first  # same bytes: the kept features
        other = masks.copy()
        other[1, 30, 30] = True
        assert s.image_features(img, other) is not first
    assert all(torch.equal(first[k], fresh[k]) for k in fresh)
    with s.keeping_image_features():
        assert s.image_features(img, masks) is first  # kept from one scope to the next
    with torch.no_grad():
        next(s.model.parameters()).add_(1.0)
    with s.keeping_image_features():
        assert s.image_features(img, masks) is not first  # other weights: computed again


def test_fp16_scoring_path_runs_and_rounds_like_fp16():
    """The CUDA-only fp16 path (weights converted as clip.load does, logits in fp16), forced on CPU here."""
    import torch
    from open_clip.model import convert_weights_to_lp

    s = _new_tiny_scorer()
    img, masks = _image_with_two_masks()
    cands = [[("a red dog", "dog")], [("a cat", "cat")]]
    ref = s.score_image(img, masks, cands)
    s.precision = "fp16"  # what the constructor picks on CUDA
    convert_weights_to_lp(s.model, torch.float16)
    half = s.score_image(img, masks, cands)
    assert s.doc_dtype == "float16"
    for (rn, rc), (hn, hc) in zip(ref, half):
        assert np.allclose(rn, hn, rtol=0.05, atol=0.02) and np.allclose(rc, hc, rtol=0.05, atol=0.02)
        assert np.array_equal(hn, hn.astype(np.float16).astype(np.float32))  # fp16 values
