"""Step 1: SAM's real automatic-mask-generator path (tiny random SAM), checkpoints, selectors, components."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ris_utils import engine, masks

# Random weights give low predicted IoU / stability and boxes that span the whole image: with the default
# thresholds (0.88 / 0.95) SAM keeps 0 masks and box NMS 0.7 collapses the rest into one. So the tiny-model
# tests set both thresholds to 0 and box NMS to 1.0, and use a sparse point grid to stay fast on CPU.
TINY_AMG = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
            "box_nms_thresh": 1.0}


def _tiny_cfg(**kw):
    cfg = {"backend": "sam", "sam_variant": "tiny", "random_init": True, "seed": 0, "device": "cpu",
           "amg": dict(TINY_AMG), "selector": {"kind": "none"}}
    cfg.update(kw)
    return cfg


def _rle(mask):
    return masks.mask_to_rle(np.asarray(mask, bool))


def _prop(mask, iou=0.9, stab=0.9):
    r = _rle(mask)
    return masks.Proposal(segmentation=r, bbox=[float(v) for v in mask_utils.toBbox(masks.rle_bytes(r))],
                          area=int(np.asarray(mask).sum()), predicted_iou=iou, stability_score=stab)


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_tiny_sam_real_amg_path_through_engine(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(64, 80), (72, 56)]):
        img = np.full((h, w, 3), 210, np.uint8)
        img[10:40, 12:44] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        items.append({"image_id": i, "path": str(tmp_path / f"{i}.png")})
    s = masks.run_masks(_tiny_cfg(), items, tmp_path / "out", progress=False)
    assert s["ok"] == 2 and s["failed"] == 0
    recs = list(engine.read_records(tmp_path / "out"))
    for rec, (h, w) in zip(recs, [(64, 80), (72, 56)]):
        assert (rec["height"], rec["width"]) == (h, w)
        assert len(rec["proposals"]) > 0
        for p in rec["proposals"]:
            seg = p["segmentation"]
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
            m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            assert m.shape == (h, w) and int(m.sum()) == p["area"]
            if p["area"]:
                ys, xs = np.nonzero(m)
                assert p["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert 0.0 <= p["stability_score"] <= 1.0 and isinstance(p["predicted_iou"], float)
    # same seed -> same random SAM -> same records
    masks.run_masks(_tiny_cfg(), items, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "records.jsonl").read_bytes() == (tmp_path / "out" / "records.jsonl").read_bytes()


def test_paper_settings_reach_segment_anything():
    gen = masks.build_sam_generator(_tiny_cfg(amg={"pred_iou_thresh": 0.5}))
    assert gen.pred_iou_thresh == 0.5 and gen.output_mode == "coco_rle"
    # everything else is segment-anything's default
    assert (gen.stability_score_thresh, gen.box_nms_thresh, gen.points_per_batch, gen.crop_n_layers) == (
        0.95, 0.7, 64, 0)
    assert len(gen.point_grids[0]) == 32 * 32
    with pytest.raises(ValueError, match="unknown SamAutomaticMaskGenerator settings.*pred_iou"):
        masks.build_sam_generator(_tiny_cfg(amg={"pred_iou": 0.5}))


def test_checkpoint_problems_fail_fast_with_clear_messages(tmp_path):
    model = masks.build_sam("tiny", random_init=True, seed=1)
    good = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), good)
    loaded = masks.build_sam("tiny", good)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])

    with pytest.raises(masks.CheckpointError, match=r"does not exist.*sam_vit_h_4b8939\.pth"):
        masks.build_sam("vit_h", tmp_path / "nope.pth")
    with pytest.raises(masks.CheckpointError, match="checkpoint is not set"):
        masks.build_sam("vit_h", None)

    sd = model.state_dict()
    first = next(iter(sd))
    bad = dict(sd)
    bad.pop(first)
    bad["extra.weight"] = torch.zeros(2)
    key = "mask_decoder.iou_token.weight"
    bad[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(masks.CheckpointError) as e:
        masks.build_sam("tiny", tmp_path / "bad.pth")
    msg = str(e.value)
    assert "does not match SAM variant 'tiny'" in msg and "1 missing keys" in msg and first in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg and "1 shape mismatches" in msg and key in msg

    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(masks.CheckpointError, match="not a readable torch checkpoint"):
        masks.build_sam("tiny", tmp_path / "junk.pth")

    # through the step: fails before any image is touched
    cfg = _tiny_cfg(random_init=False, checkpoint=str(tmp_path / "bad.pth"))
    items = [{"image_id": 0, "path": str(tmp_path / "whatever.png")}]
    with pytest.raises(masks.CheckpointError):
        masks.run_masks(cfg, items, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sam_only_selector_rules():
    h, w = 40, 40
    big = _box(h, w, 0, 20, 0, 20)            # 400 px
    part = _box(h, w, 2, 10, 2, 10)           # inside big
    dup = _box(h, w, 0, 20, 0, 19)            # IoU 0.95 with big, lower score
    other = _box(h, w, 25, 35, 25, 35)        # 100 px, separate
    speck = _box(h, w, 38, 40, 0, 3)          # 6 px
    halfout = _box(h, w, 10, 30, 10, 30)      # overlaps big by 100/400: stays
    props = [_prop(part, 0.99, 0.99), _prop(big, 0.9, 0.9), _prop(dup, 0.8, 0.8), _prop(other, 0.7, 0.9),
             _prop(speck, 0.95, 0.95), _prop(halfout, 0.5, 0.5), _prop(big, 0.9, 0.9)]
    out = masks.select_sam_only(props, (h, w), min_area=10, nms_iou=0.7, containment=0.9)
    got = [p.area for p in out]
    assert got == [400, 100, 400]  # big, other, halfout by score; part contained, dup suppressed, speck small
    assert out[0].segmentation == _rle(big) and out[2].segmentation == _rle(halfout)
    # top-M by predicted_iou x stability_score
    assert [p.area for p in masks.select_sam_only(props, (h, w), min_area=10, max_masks=2)] == [400, 100]
    # without containment the part survives; NMS still removes the near-duplicate and the exact duplicate
    no_cont = masks.select_sam_only(props, (h, w), min_area=10, containment=None)
    assert [p.area for p in no_cont] == [64, 400, 100, 400]
    # min_area_frac and max_area_frac
    assert [p.area for p in masks.select_sam_only(props, (h, w), min_area_frac=0.1, containment=None)] == [400, 400]
    assert [p.area for p in masks.select_sam_only(props, (h, w), max_area_frac=0.1, containment=None)] == [64, 6, 100]


def test_external_selector_is_the_authors_rule_and_dedups():
    h, w = 30, 30
    a = _box(h, w, 0, 10, 0, 10)
    b = _box(h, w, 0, 10, 0, 15)      # larger overlap with a box that covers 0:10, 0:15
    c = _box(h, w, 20, 30, 20, 30)
    props = [_prop(a, 0.99, 0.99), _prop(b, 0.5, 0.5), _prop(c)]
    ext = [_rle(_box(h, w, 0, 10, 0, 15)), _rle(_box(h, w, 0, 10, 0, 14)), _rle(_box(h, w, 22, 30, 22, 30)),
           _rle(_box(h, w, 12, 18, 0, 5))]  # the last overlaps nothing
    out = masks.select_by_external(props, ext)
    # ext0 and ext1 both pick b (largest raw overlap, not the best-scoring a): kept once
    assert [p.segmentation for p in out] == [_rle(b), _rle(c)]
    assert masks.select_by_external(props, []) == []  # no detection -> image skipped, as the authors do
    sel = masks.make_selector({"kind": "auto"})
    assert [p.area for p in sel(props, (h, w), ext)] == [150, 100]
    with pytest.raises(ValueError, match="unknown keys"):
        masks.make_selector({"kind": "sam_only", "nms": 0.5})


def test_external_masks_file(tmp_path):
    import json

    h, w = 20, 20
    dets = [{"image_id": 7, "score": 0.9, "category_id": 1, "segmentation": _rle(_box(h, w, 0, 5, 0, 5))},
            {"image_id": 7, "score": 0.3, "category_id": 1, "segmentation": _rle(_box(h, w, 5, 9, 0, 5))},
            {"image_id": 8, "score": 0.6, "category_id": 1, "segmentation": _rle(_box(h, w, 0, 5, 0, 5))}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    ext = masks.load_external_masks(tmp_path / "dets.json", min_score=0.5)
    assert sorted(ext) == [7, 8] and len(ext[7]) == 1
    with pytest.raises(FileNotFoundError, match="COCO results json"):
        masks.load_external_masks(tmp_path / "none.json")


def test_components_recall_on_generated_shapes_val(tmp_path):
    from ris_utils.data import shapes
    from ris_utils.profiles import step_config

    shapes.generate_world(tmp_path / "world", n_images={"train": 2, "val": 30, "testA": 1, "testB": 1}, seed=3)
    cfg = step_config("shapes", "masks", data_root=str(tmp_path / "world"), work_dir=str(tmp_path / "work"))
    assert cfg["backend"] == "components"
    assert len(masks.split_items(cfg, "val")) == 30
    # through the CLI: python -m ris_utils masks --split val --profile shapes --param ...
    params = ["--param", f"data_root={tmp_path / 'world'}", "--param", f"work_dir={tmp_path / 'work'}"]
    assert masks.cli(["--split", "val", "--profile", "shapes", "--no-progress", *params]) == 0
    assert engine.read_summary(masks.output_dir_for(cfg, "val"))["ok"] == 30
    q = masks.proposal_quality(engine.read_records(masks.output_dir_for(cfg, "val")), masks.gt_masks(cfg, "val"))
    assert q["n_gt"] >= 90
    assert q["recall_at_0.5"] >= 0.95 and q["mean_best_iou"] >= 0.85, q
    assert q["proposals_per_image"] < 3 * q["n_gt"] / 30  # not a flood of proposals
    # the backend only sees pixels: a blank image yields nothing
    seg = masks.ComponentsSegmenter()
    assert seg.generate(np.full((64, 64, 3), 200, np.uint8)) == []


def test_cli_images_folder_and_refusal_to_mix_settings(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    img = np.full((40, 40, 3), 215, np.uint8)
    img[8:24, 10:30] = (200, 30, 40)
    Image.fromarray(img).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert masks.cli(["--images", str(tmp_path / "imgs"), "--out", str(out), "--profile", "shapes",
                      "--no-progress"]) == 0
    recs = {r["image_id"]: r for r in engine.read_records(out)}
    assert recs["a.png"]["status"] == "ok" and recs["b.jpg"]["status"] == "error"
    m = masks.rle_to_mask(recs["a.png"]["proposals"][0]["segmentation"])
    assert m[8:24, 10:30].all() and m.sum() == 16 * 20
    # the record names the file it segmented, and step 2 reads that file (not data_root/images/<name>)
    assert recs["a.png"]["path"] == str(tmp_path / "imgs" / "a.png")
    from ris_utils.captioning import step

    items = step.items_from_masks(out, {"data_root": str(tmp_path / "elsewhere")})
    assert [it["path"] for it in items] == [str(tmp_path / "imgs" / "a.png")]
    # same folder, other settings: refused with a clear message, nothing mixed
    assert masks.cli(["--images", str(tmp_path / "imgs"), "--out", str(out), "--profile", "shapes",
                      "--param", "components.min_area=50", "--no-progress"]) == 2
    assert "different config" in capsys.readouterr().err
