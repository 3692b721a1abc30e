"""Step 3 export: REFER round trip (our reader and a getMask-style decode), dataset card, mix fractions."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ris_utils.data import refer
from ris_utils.export import export_dataset, mix_datasets, round_half_up, sample_images
from ris_utils.pipeline import build_trainsets


def _masks(i):
    out = []
    for j in range(3):
        m = np.zeros((40, 48), np.uint8)
        m[5 + j * 10: 12 + j * 10, 3 + i + 4 * j: 20 + i] = 1
        out.append(m)
    return out


def _filter_records(tmp_path, n_images=4):
    """Filter-step records by hand: image i has 3 masks; mask 2 of every image has no survivor."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    recs = []
    for i in range(n_images):
        name = f"im{i}.png"
        Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / "images" / name)
        masks = []
        for j, m in enumerate(_masks(i)):
            cands = [{"text": f"a red circle {j}", "view": 0, "setting": "beam", "mode": "distinctive",
                      "noun": "circle", "noun_scores": [20.0, 10.0, 5.0], "caption_scores": [25.0, 10.0, 5.0],
                      "doc": 2.5 if j < 2 else 0.5, "keep": j < 2},
                     {"text": "the big square", "view": 3, "setting": "top_k=5", "mode": "distinctive",
                      "noun": "square", "noun_scores": [5.0, 10.0, 5.0], "caption_scores": [5.0, 20.0, 5.0],
                      "doc": 1.0, "keep": False},
                     {"text": f"a red circle {j}", "view": 1, "setting": "top_p=0.4", "mode": "distinctive",
                      "noun": "circle", "noun_scores": [20.0, 10.0, 5.0], "caption_scores": [25.0, 10.0, 5.0],
                      "doc": 2.5 if j == 0 else 0.9, "keep": j == 0}]
            surv = [k for k, c in enumerate(cands) if c["keep"]]
            masks.append({"mask_index": j, "segmentation": refer.encode_mask(m), "bbox": [0, 0, 1, 1],
                          "candidates": cands, "survivors": surv, "fallback": None,
                          "dropped": None if surv else "no_survivor"})
        recs.append({"image_id": 100 + i, "file_name": name, "status": "ok", "error": None, "height": 40,
                     "width": 48, "masks": masks, "n_masks": 3})
    recs.append({"image_id": 999, "file_name": "bad.png", "status": "error", "error": "BadImageError: x"})
    d = tmp_path / "filter"
    d.mkdir()
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d, recs


def _get_mask(ann):
    """The REFER toolkit's getMask: polygons if segmentation[0] is a list, else RLE; sum over parts."""
    rle = ann["segmentation"]
    assert not isinstance(rle[0], list)
    m = mask_utils.decode(rle)
    return np.sum(m, axis=2).astype(np.uint8)


def test_export_round_trips_through_refer_reader(tmp_path):
    cdir, recs = _filter_records(tmp_path)
    out = tmp_path / "export"
    card = export_dataset(cdir, out, images_dir=tmp_path / "images")
    assert (out / "refcoco+" / "refs(pseudo).p").is_file() and (out / "refcoco+" / "instances.json").is_file()
    data = refer.load_refer(out, "refcoco+", "pseudo")
    assert len(data.refs) == 8  # 4 images x 2 masks with survivors
    assert {r["split"] for r in data.refs} == {"train"}
    assert set(data.cats.values()) == {"circle"}
    by_key = {(r["image_id"], r["mask_index"]): r for r in data.refs}
    for rec in recs[:-1]:
        for j, m in enumerate(_masks(rec["image_id"] - 100)):
            if j == 2:
                assert (rec["image_id"], j) not in by_key
                continue
            ref = by_key[(rec["image_id"], j)]
            assert np.array_equal(data.get_mask(ref), m)
            assert np.array_equal(_get_mask(data.anns[ref["ann_id"]]), m)
            want = [rec["masks"][j]["candidates"][k]["text"] for k in rec["masks"][j]["survivors"]]
            assert [s["raw"] for s in ref["sentences"]] == want
        assert (out / "images" / "train2014" / rec["file_name"]).exists()
    assert data.image_path(100).name == "im0.png"
    c = card["counts"]
    assert c["images"] == 4 and c["images_failed"] == 1 and c["masks"] == 12
    assert c["masks_exported"] == 8 and c["masks_dropped_by_reason"] == {"no_survivor": 4}
    assert c["expressions"] == 4 * (2 + 1) and c["candidates"] == 36 and c["candidates_kept_by_doc"] == 12
    assert card["survivors_per_mask"]["max"] == 2 and card["keep_rate_by_setting"]["top_k=5"] == 0.0
    lines = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(lines) == 36 and sum(x["exported"] for x in lines) == 12
    assert {"text", "view", "setting", "noun", "noun_score", "caption_score", "doc", "keep"} <= set(lines[0])
    assert lines[0]["noun_score"] == 20.0 and lines[0]["caption_score"] == 25.0
    assert "masks_dropped" in (out / "dataset_card.md").read_text()


def test_export_unfiltered_and_errors(tmp_path):
    cdir, _ = _filter_records(tmp_path)
    card = export_dataset(cdir, tmp_path / "all", unfiltered=True, images="none", split_by="unc", dataset="shapes+")
    data = refer.load_refer(tmp_path / "all", "shapes+", "unc")
    assert len(data.refs) == 12 and card["counts"]["expressions"] == 36
    # captions records (no survivors) need --unfiltered
    cap = tmp_path / "captions"
    cap.mkdir()
    recs = [json.loads(x) for x in (cdir / "records.jsonl").read_text().splitlines()]
    for r in recs:
        for m in r.get("masks") or []:
            m.pop("survivors")
    (cap / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="unfiltered"):
        export_dataset(cap, tmp_path / "x", images="none")
    with pytest.raises(ValueError, match="images"):
        export_dataset(cdir, tmp_path / "y", images="hardlink")


def _human(tmp_path, n_images=20):
    images, anns, refs = [], [], []
    for i in range(n_images):
        iid = 100 + i
        images.append({"id": iid, "file_name": f"im{i}.png", "height": 40, "width": 48})
        for j in range(2):
            a = refer.make_annotation(len(anns) + 1, iid, 1, _masks(i % 4)[j])
            anns.append(a)
            refs.append(refer.make_ref(len(refs) + 1, a, "train" if i < n_images - 2 else "val",
                                       [refer.make_sentence(f"human {i} {j}", len(refs) + 1)], f"im{i}.png"))
    refer.write_refer(tmp_path / "human", "refcoco+", "unc", refs, images, anns, [{"id": 1, "name": "circle"}])
    return refer.load_refer(tmp_path / "human", "refcoco+", "unc")


def _pseudo(tmp_path, n_images=20):
    images, anns, refs = [], [], []
    for i in range(n_images):
        iid = 100 + i
        images.append({"id": iid, "file_name": f"im{i}.png", "height": 40, "width": 48})
        a = refer.make_annotation(len(anns) + 1, iid, 2, _masks(i % 4)[0])
        anns.append(a)
        refs.append(refer.make_ref(len(refs) + 1, a, "train", [refer.make_sentence("a red circle", len(refs) + 1)],
                                   f"im{i}.png"))
    refer.write_refer(tmp_path / "pseudo", "refcoco+", "pseudo", refs, images, anns, [{"id": 2, "name": "circle"}])
    return refer.load_refer(tmp_path / "pseudo", "refcoco+", "pseudo")


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.1, 2), (0.125, 2), (0.25, 5), (0.5, 9), (1.0, 18)])
def test_mix_fraction_exact(tmp_path, fraction, expected):
    human, pseudo = _human(tmp_path), _pseudo(tmp_path)  # 18 human train images (2 are val), 20 pseudo
    assert round_half_up(fraction * 18) == expected
    card = mix_datasets(pseudo, human, fraction, 0, tmp_path / "mix", images="none")
    data = refer.load_refer(tmp_path / "mix", "refcoco+", "mix")
    h_imgs = {r["image_id"] for r in data.refs if r["source"] == "human"}
    p_imgs = {r["image_id"] for r in data.refs if r["source"] == "pseudo"}
    assert len(h_imgs) == expected == card["counts"]["human_images"]
    assert not h_imgs & p_imgs and len(h_imgs | p_imgs) == 20  # pseudo refs for every other image
    assert sum(r["source"] == "human" for r in data.refs) == 2 * expected  # all human refs of those images
    assert {r["split"] for r in data.refs} == {"train"}
    for r in data.refs:  # masks survive the re-numbering
        assert data.get_mask(r).sum() > 0
    assert set(data.cats.values()) == {"circle"}


def test_mix_seeded(tmp_path):
    ids = list(range(100, 140))
    a, b = sample_images(ids, 0.25, 3), sample_images(ids, 0.25, 3)
    assert a == b and len(a) == 10
    assert sample_images(ids, 0.25, 4) != a
    assert round_half_up(0.5) == 1 and round_half_up(2.5) == 3  # unlike round()
    with pytest.raises(ValueError, match="fraction"):
        sample_images(ids, 1.5, 0)


def test_cli_export_and_mix(tmp_path, capsys):
    from ris_utils.__main__ import main

    cdir, _ = _filter_records(tmp_path)
    assert main(["export", "--candidates", str(cdir), "--out", str(tmp_path / "e"),
                 "--images", str(tmp_path / "images")]) == 0
    assert refer.load_refer(tmp_path / "e", "refcoco+", "pseudo").refs
    _human(tmp_path)
    assert main(["mix", "--pseudo", str(tmp_path / "e"), "--human", str(tmp_path / "human"), "--fraction", "0.5",
                 "--seed", "1", "--out", str(tmp_path / "m"), "--image-mode", "none",
                 "--human-dataset", "refcoco+", "--human-split-by", "unc"]) == 0
    card = json.loads((tmp_path / "m" / "dataset_card.json").read_text())
    assert card["counts"]["human_images"] == 9
    with pytest.raises(SystemExit):
        main(["export", "--candidates", str(tmp_path / "nothing"), "--out", str(tmp_path / "z")])


def test_build_trainsets_filters_and_exports(tmp_path):
    """The notebook's train-split exports: unfiltered candidates vs filtered survivors (tiny RN50 CLIP)."""
    from ris_utils import engine

    cdir, recs = _filter_records(tmp_path)
    work = tmp_path / "work"
    for mode in ("naive", "distinctive"):
        d = work / "captions" / mode / "train"
        d.mkdir(parents=True)
        plain = []
        for r in recs:
            masks = [{k: m[k] for k in ("mask_index", "segmentation", "bbox")} | {"candidates": [
                {k: c[k] for k in ("text", "view", "setting", "mode")} for c in m["candidates"]]}
                for m in r.get("masks") or []]
            plain.append({**r, "masks": masks} if r["status"] == "ok" else r)
        (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    fcfg = {"seed": 0, "work_dir": str(work), "images": str(tmp_path / "images"), "threads": 1,
            "clip": {"model": "rn50_tiny", "pretrained": None, "tokenizer": "open_clip"}, "fallback": "drop",
            "head_noun": {"backend": "rules"}}
    ecfg = {"work_dir": str(work), "trainsets": {"naive": {"mode": "naive", "filtered": False},
                                                 "pseudo_ris": {"mode": "distinctive", "filtered": True}}}
    cards = build_trainsets(fcfg, ecfg, progress=False)
    assert set(cards) == {"naive", "pseudo_ris"}
    naive = refer.load_refer(work / "export" / "naive", "refcoco+", "pseudo")
    assert len(naive.refs) == 12 and cards["naive"]["counts"]["expressions"] == 36
    filtered = list(engine.read_records(work / "filter" / "distinctive" / "train"))
    kept = sum(bool(m["survivors"]) for r in filtered if r["status"] == "ok" for m in r["masks"])
    pseudo = refer.load_refer(work / "export" / "pseudo_ris", "refcoco+", "pseudo")
    assert len(pseudo.refs) == kept == cards["pseudo_ris"]["counts"]["masks_exported"]
    n_sent = sum(len(m["survivors"]) for r in filtered if r["status"] == "ok" for m in r["masks"])
    assert sum(len(r["sentences"]) for r in pseudo.refs) == n_sent


# --------------------------------------------------------------------------- issue 14 / 15: which sentences


class _FixedScorer:
    """A ClipScorer stand-in returning fixed CLIP logits (the filter's rules, not CLIP, are under test)."""

    logit_scale = 100.0
    doc_dtype = "float64"

    def __init__(self, scores):
        self.scores = scores

    def score_image(self, image, masks, cands):
        return self.scores


def test_default_fallback_exports_every_candidate_of_a_no_survivor_mask(tmp_path):
    # the authors' loader draws over ALL candidates of a mask without DoC > 1 (pseudo_datasets.py l. 655):
    # with the default filter.fallback every candidate must become a sentence of the mask's ref
    from ris_utils.filtering import filter_record

    m0, m1 = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    m0[2:8, 2:8], m1[10:16, 10:16] = 1, 1
    texts = ["a red circle", "a blue square", "a big ring", "the star"]
    rec = {"image_id": 1, "file_name": "a.png", "height": 20, "width": 20, "masks": [
        {"mask_index": j, "segmentation": refer.encode_mask(m), "bbox": [0, 0, 1, 1],
         "candidates": [{"text": t, "view": 0, "setting": "beam", "mode": "distinctive"} for t in texts]}
        for j, m in enumerate((m0, m1))]}
    ones = np.ones((4, 2), np.float32) * 20
    scores = [(ones * [[1, 2]], ones)] * 2  # mask 0: DoC 400 / 800 (none kept); mask 1: 800 / 400 (all)
    body = filter_record(rec, np.zeros((20, 20, 3), np.uint8), _FixedScorer(scores), lambda t: t.split()[-1])
    assert body["masks"][0]["survivors"] == [0, 1, 2, 3] and body["masks"][0]["fallback"] == "all"
    d = tmp_path / "f"
    d.mkdir()
    (d / "records.jsonl").write_text(json.dumps({**rec, **body, "status": "ok", "error": None}) + "\n")
    export_dataset(d, tmp_path / "out", images="none")
    data = refer.load_refer(tmp_path / "out", "refcoco+", "pseudo")
    sents = {r["mask_index"]: [s["raw"] for s in r["sentences"]] for r in data.refs}
    assert sents == {0: texts, 1: texts}


def test_max_sentences_per_ref_and_order(tmp_path):
    from ris_utils.export import select_sentences

    cands = [{"doc": 1.5}, {"doc": 3.0}, {"doc": float("inf")}, {"doc": 3.0}]
    assert select_sentences(cands, [0, 1, 2, 3]) == [0, 1, 2, 3]
    assert select_sentences(cands, [0, 1, 2, 3], order="doc") == [2, 1, 3, 0]  # stable on ties
    assert select_sentences(cands, [0, 1, 3], 2, "doc") == [1, 3]
    assert select_sentences(cands, [0, 1, 3], 1, "generation") == [0]
    with pytest.raises(ValueError, match="export.order"):
        select_sentences(cands, [0], order="score")
    with pytest.raises(ValueError, match="export.max_sentences_per_ref"):
        select_sentences(cands, [0], 0)
    with pytest.raises(ValueError, match="captions records"):
        select_sentences([{"text": "x"}], [0], order="doc")
    cdir, _ = _filter_records(tmp_path)
    card = export_dataset(cdir, tmp_path / "top1", images="none", max_sentences_per_ref=1, order="doc")
    data = refer.load_refer(tmp_path / "top1", "refcoco+", "pseudo")
    assert card["max_sentences_per_ref"] == 1 and card["order"] == "doc"
    assert all(len(r["sentences"]) == 1 for r in data.refs)
    assert card["survivors_per_mask"]["max"] == 2 and card["sentences_per_ref"]["max"] == 1
    lines = [json.loads(x) for x in (tmp_path / "top1" / "candidates.jsonl").read_text().splitlines()]
    assert sum(c["survivor"] for c in lines) > sum(c["exported"] for c in lines)
