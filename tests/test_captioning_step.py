"""The captions step through the engine (record form, resume) and the distinct rate on hand-made records."""

import json
import math

import numpy as np
import pytest

from ris_utils import engine
from ris_utils.captioning import step
from ris_utils.data import refer, shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_world(root, n_images={"train": 2, "val": 3, "testA": 1, "testB": 1}, seed=3)
    return root


@pytest.fixture(scope="module")
def captioner():
    from ris_utils.captioning.tokenizer import shapes_tokenizer
    from ris_utils.captioning.train import Captioner, build_model, model_config
    from ris_utils.crops import model_view_settings

    tok = shapes_tokenizer()
    model = build_model("coca_shapes", tok.vocab_size, seed=0).eval()
    tok.context_length = model_config("coca_shapes", tok.vocab_size)["text_cfg"]["context_length"]
    vs = model_view_settings(model)
    return Captioner(model, tok, vs["size"], vs["mean"], vs["std"], "coca_shapes", "random init")


def _cfg(world, tmp_path, **kw):
    cfg = {"seed": 0, "data_root": str(world), "work_dir": str(tmp_path / "work"), "model": "coca_shapes",
           "tokenizer": "shapes", "source": "gt", "views": ["masked", 1.0, 1.1, 1.2], "fill": 0,
           "beam": {"num_beams": 2, "num_beam_groups": 1}, "top_k": [5], "top_p": [0.5], "seq_len": 6,
           "min_seq_len": 2, "temperature": 1.0, "n_range": [2, 30], "max_images": 2}
    cfg.update(kw)
    return cfg


def test_step_records_resume(world, tmp_path, captioner):
    cfg = _cfg(world, tmp_path)
    s1 = step.run_captions(cfg, "val", "distinctive", captioner, progress=False)
    assert s1["ok"] == 2 and s1["failed"] == 0
    out = step.output_dir(cfg, "distinctive", "val")
    assert out == tmp_path / "work" / "captions" / "distinctive" / "val"
    recs = list(engine.read_records(out))
    scenes = shapes.load_scenes(world)
    for rec in recs:
        sc = scenes[rec["image_id"]]
        assert rec["status"] == "ok" and rec["height"] == sc.height and rec["width"] == sc.width
        assert [m["mask_index"] for m in rec["masks"]] == [o.obj_id for o in sc.objects]
        for m in rec["masks"]:
            assert set(m) == {"mask_index", "segmentation", "bbox", "candidates"}
            mask = refer.decode_segmentation(m["segmentation"], rec["height"], rec["width"])
            assert mask.sum() == sc.objects[m["mask_index"]].area
            # 4 views x (1 beam + 1 top_k + 1 top_p), in (view, setting) order
            assert [(c["view"], c["setting"]) for c in m["candidates"]] == [
                (v, s) for v in range(4) for s in ("beam", "top_k=5", "top_p=0.5")]
            for c in m["candidates"]:
                assert set(c) == {"text", "view", "setting", "mode"} and c["mode"] == "distinctive"
                assert isinstance(c["text"], str) and len(c["text"].split()) <= 5  # seq_len 6 includes sot
    # a rerun resumes: nothing recomputed, same file
    before = (out / engine.RECORDS).read_bytes()
    logs = {p.name: p.read_bytes() for p in (out / engine.PARTS).iterdir()}
    step.run_captions(cfg, "val", "distinctive", captioner, progress=False)
    assert {p.name: p.read_bytes() for p in (out / engine.PARTS).iterdir()} == logs  # nothing redone
    assert (out / engine.RECORDS).read_bytes() == before
    # same seed, fresh folder -> the same candidates (noise keyed by image/mask/view/setting)
    s3 = step.run_captions(cfg, "val", "distinctive", captioner, out_dir=tmp_path / "again", progress=False)
    assert s3["ok"] == 2
    assert (tmp_path / "again" / engine.RECORDS).read_bytes() == before
    # rerunning into the same folder with other settings is refused
    with pytest.raises(engine.ResumeMismatchError):
        step.run_captions(_cfg(world, tmp_path, top_k=[7]), "val", "distinctive", captioner, progress=False)


def test_threads_setting_keeps_records(world, tmp_path, captioner):
    """captions.threads only changes speed: same records as torch's default, thread count restored."""
    import torch

    prev = torch.get_num_threads()
    base = step.run_captions(_cfg(world, tmp_path, threads=None), "val", "distinctive", captioner,
                             out_dir=tmp_path / "default", progress=False)
    one = step.run_captions(_cfg(world, tmp_path, threads=1), "val", "distinctive", captioner,
                            out_dir=tmp_path / "one", progress=False)
    assert base["ok"] == one["ok"] == 2
    assert torch.get_num_threads() == prev
    assert (tmp_path / "one" / engine.RECORDS).read_bytes() == (tmp_path / "default" / engine.RECORDS).read_bytes()
    with pytest.raises(ValueError, match="captions.threads"):
        step.run_captions(_cfg(world, tmp_path, threads=-1), "val", "naive", captioner,
                          out_dir=tmp_path / "bad", progress=False)
    assert torch.get_num_threads() == prev


def test_max_images_per_split(world, tmp_path, captioner):
    assert step.split_cap({"train": 1}, "train") == 1 and step.split_cap({"train": 1}, "val") is None
    assert step.split_cap(2, "val") == 2 and step.split_cap(None, "val") is None
    with pytest.raises(ValueError, match="captions.max_images"):
        step.split_cap({"val": "all"}, "val")
    s = step.run_captions(_cfg(world, tmp_path, max_images={"val": 1, "train": 2}), "val", "naive", captioner,
                          progress=False)
    assert s["ok"] == 1


def test_masks_source_and_cli_errors(world, tmp_path, captioner):
    # step 1's records as input (the GT masks written as proposals), plus one empty proposal
    scenes = shapes.load_scenes(world)
    sc = next(s for s in scenes.values() if s.split == "train")
    gt = shapes.object_masks(sc)
    props = [{"segmentation": refer.encode_mask(gt[o.obj_id]), "bbox": o.bbox, "area": o.area,
              "predicted_iou": 1.0, "stability_score": 1.0} for o in sc.objects]
    props.append({"segmentation": refer.encode_mask(np.zeros((sc.height, sc.width), np.uint8)),
                  "bbox": [0, 0, 0, 0], "area": 0, "predicted_iou": 0.1, "stability_score": 0.1})
    items = [{"image_id": sc.image_id, "path": str(shapes.image_path(world, sc.file_name)), "file_name": sc.file_name}]
    masks_dir = tmp_path / "masks"
    engine.run("masks", items, lambda it: {"height": sc.height, "width": sc.width, "proposals": props},
               masks_dir, progress=False)
    cfg = _cfg(world, tmp_path, source="masks")
    s = step.run_captions(cfg, "train", "naive", captioner, masks_dir=masks_dir, progress=False)
    assert s["ok"] == 1
    rec = next(engine.read_records(step.output_dir(cfg, "naive", "train")))
    assert len(rec["masks"]) == len(sc.objects) + 1
    assert rec["masks"][-1]["candidates"] == []  # empty mask: no candidates
    assert all(len(m["candidates"]) == 12 for m in rec["masks"][:-1])
    with pytest.raises(FileNotFoundError, match="masks step"):
        step.run_captions(cfg, "val", "naive", captioner, progress=False)


def test_distinct_rate_hand_made(world):
    scenes = shapes.load_scenes(world)
    sc = next(s for s in scenes.values() if s.split == "val")
    gt = shapes.object_masks(sc)
    o0, o1 = sc.objects[0], sc.objects[1]
    full0 = shapes.phrase(o0, ("size", "color", "pattern"))  # attributes + shape
    # make it distinctive for sure: add a location when attributes alone do not single it out
    if shapes.referee(full0, sc) != {0}:
        full0 = next(shapes.phrase(o0, ("size", "color", "pattern"), loc) for loc in shapes.LOCATIONS
                     if shapes.referee(shapes.phrase(o0, ("size", "color", "pattern"), loc), sc) == {0})
    wrong_shape = "the " + next(s for s in shapes.SHAPES if s not in {o.shape for o in sc.objects})
    no_shape = o0.color
    h, w = sc.height, sc.width
    shifted = np.roll(gt[1], w // 2, axis=1)  # IoU with every object < 0.5 -> unmatched
    assert shapes.match_object(shifted, gt)[0] is None

    def cand(t):
        return {"text": t, "view": 0, "setting": "top_k=5", "mode": "naive"}

    records = [{"image_id": sc.image_id, "status": "ok", "height": h, "width": w, "masks": [
        {"mask_index": 0, "segmentation": refer.encode_mask(gt[0]), "bbox": o0.bbox,
         "candidates": [cand(full0), cand(wrong_shape), cand(no_shape), cand(full0)]},
        {"mask_index": 1, "segmentation": refer.encode_mask(shifted), "bbox": o1.bbox,
         "candidates": [cand(shapes.phrase(o1, ("size", "color", "pattern")))]},
    ]}, {"image_id": -1, "status": "error", "error": "x"}]
    r = step.distinct_rate(records, scenes)
    assert r["n_candidates"] == 4 and r["n_distinct"] == 2 and r["rate"] == 0.5
    assert r["n_masks"] == 2 and r["n_matched_masks"] == 1 and r["n_unmatched_masks"] == 1
    assert r["n_unmatched_candidates"] == 1
    assert r["by_setting"] == {"top_k=5": 0.5}
    # the candidate written for the object with a location phrase is still distinct; the same text on
    # a mask matched to another object is not
    swapped = json.loads(json.dumps(records[:1]))
    swapped[0]["masks"][0]["segmentation"] = refer.encode_mask(gt[1])
    assert step.distinct_rate(swapped, scenes)["n_distinct"] == 0
    assert math.isnan(step.distinct_rate([], scenes)["rate"])
    st = step.text_statistics(records)
    assert st["n_candidates"] == 5 and st["vocab_size"] >= 3
