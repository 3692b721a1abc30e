"""The shapes world: determinism, distinctive GT expressions, confusability, referee semantics, the
unseen variant, REFER round trip and masks, prepare() caching, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ris_utils.data import refer, shapes
from ris_utils.data.shapes import Scene, ShapeObject, referee

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

COUNTS = {"train": 80, "val": 30, "testA": 25, "testB": 25}


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_world")
    stats = shapes.generate_world(root, COUNTS, seed=7)
    return root, stats, shapes.load_scenes(root)


def obj(obj_id, shape, color, x, y, size="small", pattern="solid"):
    return ShapeObject(obj_id=obj_id, ann_id=100 + obj_id, shape=shape, color=color, size=size, pattern=pattern,
                       centroid=[float(x), float(y)], center=[float(x), float(y)], radius=6.0)


@pytest.fixture
def scene():
    # two red circles far apart (left / right), a blue circle in the middle, a big striped square on top,
    # and a green triangle pair 4 px apart horizontally (closer than the location margin of 8% * 128)
    objects = [
        obj(0, "circle", "red", 10, 64),
        obj(1, "circle", "red", 110, 70),
        obj(2, "circle", "blue", 60, 66),
        obj(3, "square", "red", 64, 10, size="big", pattern="striped"),
        obj(4, "triangle", "green", 30, 114),
        obj(5, "triangle", "green", 34, 96),
    ]
    return Scene(image_id=1, file_name="x.png", height=128, width=128, objects=objects)


# --------------------------------------------------------------------------- referee


def test_referee_attributes_and_ambiguity(scene):
    assert referee("the red circle", scene) == {0, 1}  # ambiguous: both red circles
    assert referee("the circle", scene) == {0, 1, 2}
    assert referee("the blue circle", scene) == {2}
    assert referee("a big striped square", scene) == {3}
    assert referee("the small square", scene) == set()
    assert referee("the large square", scene) == {3}  # synonym of big


def test_distinct_judge_gives_the_referee_and_match_verdicts_once(scene):
    masks = shapes.object_masks(scene)
    rec = {"image_id": 1, "height": 128, "width": 128}
    judge = shapes.DistinctJudge({1: scene})
    for oid, mask in masks.items():
        m = {"segmentation": refer.encode_mask(mask)}
        assert judge.mask_object(rec, m) == shapes.match_object(mask, masks) == (oid, 1.0)
        assert judge.mask_object(rec, dict(m)) is judge.mask_object(rec, m)  # memoised by segmentation
    for text in ("the red circle", "the blue circle", "a big striped square", "the left red circle"):
        assert judge.fits(1, text) == referee(text, scene)
        assert judge.is_distinct(1, text, 2) == (referee(text, scene) == {2})
    assert not judge.is_distinct(1, "the blue circle", None)  # an unmatched mask is never distinct
    assert shapes.DistinctJudge.of(judge) is judge and shapes.DistinctJudge.of({1: scene}) is not judge
    with pytest.raises(ValueError, match="min_iou"):
        shapes.DistinctJudge.of(judge, 0.7)
    with pytest.raises(KeyError, match="distinct_rate: image 9 has no scene"):
        judge.scene(9, "distinct_rate")


def test_referee_location_words(scene):
    for expr in ("the left red circle", "the leftmost circle", "the red circle on the left", "left circle"):
        assert referee(expr, scene) == {0}, expr
    assert referee("the rightmost circle", scene) == {1}
    assert referee("the circle on the right", scene) == {1}
    assert referee("the middle circle", scene) == {2}
    assert referee("the circle in the middle", scene) == {2}
    assert referee("the second circle from the left", scene) == {2}
    assert referee("the second red circle from the right", scene) == {0}
    assert referee("the third red circle from the left", scene) == set()
    # vertical: circles at y 64, 66, 70 lie within the margin of each other -> "top circle" stays ambiguous
    assert referee("the top circle", scene) == {0, 1, 2}
    assert referee("the lower triangle", scene) == {4}
    assert referee("the upper triangle", scene) == {5}
    # 4 px apart horizontally: within the location margin, so left/right cannot tell them apart
    assert referee("the left triangle", scene) == {4, 5}
    assert referee("the right triangle", scene) == {4, 5}
    # a single candidate stays fitting under a location word
    assert referee("the left square", scene) == {3}


def test_referee_unknown_words_no_head_contradictions(scene):
    assert referee("please the fancy red circle thing over there", scene) == referee("the red circle", scene)
    assert referee("the red one on the left", scene) == set()  # no shape noun -> fits nothing
    assert referee("", scene) == set()
    assert referee("the red blue circle", scene) == set()  # two colours: no object is both
    assert referee("the circle square", scene) == set()
    assert referee("THE Blue, Circle!", scene) == {2}  # case and punctuation do not matter


def test_vocabulary_covers_phrases(scene):
    rng = np.random.default_rng(0)
    vocab = set(shapes.VOCABULARY)
    for o in scene.objects:
        for _ in range(20):
            cap = shapes.generic_caption(o, rng)
            assert set(refer.tokenize(cap)) <= vocab, cap
            assert o.shape in refer.tokenize(cap)
            assert o.obj_id in referee(cap, scene), cap  # a generic caption is true of its object
    caps = {shapes.generic_caption(scene.objects[3], rng) for _ in range(60)}
    assert len(caps) >= 6  # varied subsets of attributes and articles
    # generic captions do not look at the other objects: those of a red circle are often ambiguous here
    red_circle = [shapes.generic_caption(scene.objects[0], rng) for _ in range(40)]
    assert sum(len(referee(c, scene)) > 1 for c in red_circle) >= 10


# --------------------------------------------------------------------------- generated world


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    counts = {"train": 6, "val": 2, "testA": 2, "testB": 2}
    shapes.generate_world(tmp_path / "a", counts, seed=3)
    shapes.generate_world(tmp_path / "b", counts, seed=3)
    shapes.generate_world(tmp_path / "c", counts, seed=4)
    ha, hb, hc = tree_hash(tmp_path / "a"), tree_hash(tmp_path / "b"), tree_hash(tmp_path / "c")
    # images, scenes.json, manifest.json, 3 datasets x 2 files, the toolkit view (3 x 2 links)
    assert len(ha) == 12 + 1 + 1 + 2 * 3 + 2 * 3
    assert ha == hb
    assert set(ha) == set(hc)
    assert all(ha[k] != hc[k] for k in ha if k.startswith("images/"))


def test_every_gt_expression_is_distinctive(world):
    root, _, scenes = world
    n_checked = 0
    for dataset in shapes.DATASETS:
        data = refer.load_refer(root, dataset, shapes.SPLIT_BY)
        assert data.refs, dataset
        for ref in data.refs:
            scene = scenes[ref["image_id"]]
            target = [o.obj_id for o in scene.objects if o.ann_id == ref["ann_id"]]
            assert len(target) == 1
            assert 1 <= len(ref["sentences"]) <= 3
            for sent in ref["sentences"]:
                assert referee(sent["raw"], scene) == set(target), (dataset, sent["raw"])
                assert referee(sent["sent"], scene) == set(target)
                assert set(sent["tokens"]) <= set(shapes.VOCABULARY)
                if dataset == "shapes+":
                    assert shapes.parse_expression(sent["raw"])["locations"] == [], sent["raw"]
                n_checked += 1
    assert n_checked > 1000


def test_location_words_used_and_needed(world):
    root, stats, scenes = world
    data = refer.load_refer(root, "shapes", shapes.SPLIT_BY)
    plus = refer.load_refer(root, "shapes+", shapes.SPLIT_BY)
    with_loc = [s for _, s in data.sentences("train") if shapes.parse_expression(s["raw"])["locations"]]
    assert len(with_loc) > 0.2 * len(list(data.sentences("train")))
    # twins (same four attributes) can only be referred to with location words: no ref in shapes+
    plus_anns = {r["ann_id"] for r in plus.refs}
    twins = [o.ann_id for s in scenes.values() for o in s.objects
             if any(p.obj_id != o.obj_id and p.attributes() == o.attributes() for p in s.objects)]
    assert twins and not (set(twins) & plus_anns)
    assert len({r["ann_id"] for r in data.refs} & set(twins)) > 0.5 * len(twins)
    # both styles use the same images
    inst = [json.loads(refer.instances_path(root, d).read_text())["images"] for d in shapes.DATASETS]
    assert inst[0] == inst[1] == inst[2]


def test_confusability_shares(world):
    _, stats, scenes = world
    objs = [(s, o) for s in scenes.values() for o in s.objects]
    same_shape = np.mean([any(p.obj_id != o.obj_id and p.shape == o.shape for p in s.objects) for s, o in objs])
    same_color = np.mean([any(p.obj_id != o.obj_id and (p.shape, p.color) == (o.shape, o.color)
                              for p in s.objects) for s, o in objs])
    assert same_shape >= 0.5
    assert same_color >= 0.25
    assert stats["same_shape_share"] == pytest.approx(same_shape, abs=1e-3)
    assert stats["same_color_share"] == pytest.approx(same_color, abs=1e-3)
    assert all(3 <= len(s.objects) <= 7 for s in scenes.values())
    # every shape, colour, size and pattern occurs
    for attr, values in (("shape", shapes.SHAPES), ("color", shapes.COLORS), ("size", shapes.SIZES),
                         ("pattern", shapes.PATTERNS)):
        assert {getattr(o, attr) for _, o in objs} == set(values), attr


def test_splits_ids_and_testA_testB(world):
    root, stats, scenes = world
    ids = list(scenes)
    assert len(ids) == len(set(ids)) == sum(COUNTS.values())
    for split, n in COUNTS.items():
        assert sum(s.split == split for s in scenes.values()) == n == stats["images"][split]
    for dataset in ("shapes", "shapes+"):
        data = refer.load_refer(root, dataset, shapes.SPLIT_BY)
        by_split = {sp: {r["image_id"] for r in refer.select_split(data.refs, sp)} for sp in shapes.SPLITS}
        for sp, img_ids in by_split.items():
            assert img_ids and all(scenes[i].split == sp for i in img_ids)
        for sp, kinds in (("testA", shapes.ROUND_SHAPES), ("testB", shapes.ANGULAR_SHAPES)):
            assert {data.cats[r["category_id"]] for r in refer.select_split(data.refs, sp)} <= set(kinds)
        assert stats["refs"][dataset] == {sp: len(data.get_ref_ids(sp)) for sp in shapes.SPLITS}
    ann_ids = [o.ann_id for s in scenes.values() for o in s.objects]
    assert len(ann_ids) == len(set(ann_ids))


def test_unseen_variant(world):
    root, _, scenes = world
    data = refer.load_refer(root, "shapes-unseen", shapes.SPLIT_BY)
    unseen = set(shapes.UNSEEN_SHAPES)
    train = data.get_ref_ids("train")
    assert train and data.get_ref_ids("val") and data.get_ref_ids("test")
    for ref_id in train:
        ref = data.ref_by_id[ref_id]
        assert data.cats[ref["category_id"]] not in unseen
        for s in ref["sentences"]:
            assert not (set(s["tokens"]) & unseen), s["raw"]
    for split in ("val", "test"):
        for ref_id in data.get_ref_ids(split):
            ref = data.ref_by_id[ref_id]
            assert data.cats[ref["category_id"]] in unseen
            assert all(set(s["tokens"]) & unseen for s in ref["sentences"])
    # the images hold every shape, the seen ones as well as the held-out ones
    train_shapes = {o.shape for s in scenes.values() if s.split == "train" for o in s.objects}
    assert train_shapes == set(shapes.SHAPES)
    # val refs sit on val images, test refs on testA / testB images
    assert {scenes[data.ref_by_id[i]["image_id"]].split for i in data.get_ref_ids("test")} == {"testA", "testB"}


def test_load_refer_and_masks_match_scenes(world):
    root, _, scenes = world
    data = refer.load_refer(root, "shapes", shapes.SPLIT_BY)
    some = sorted(scenes)[:: max(1, len(scenes) // 12)]
    for image_id in some:
        scene = scenes[image_id]
        from_files = shapes.object_masks(root, image_id)
        from_scene = shapes.object_masks(scene)
        assert set(from_files) == set(from_scene) == {o.obj_id for o in scene.objects}
        total = np.zeros((scene.height, scene.width), int)
        for o in scene.objects:
            m = from_files[o.obj_id]
            assert m.dtype == np.uint8 and m.shape == (128, 128)
            assert np.array_equal(m, from_scene[o.obj_id])
            assert m.sum() == o.area > 20
            ys, xs = np.nonzero(m)
            assert [xs.mean(), ys.mean()] == pytest.approx(o.centroid, abs=1e-2)
            assert data.anns[o.ann_id]["bbox"] == o.bbox
            total += m
        assert total.max() == 1  # objects never overlap
        assert data.image_path(image_id).is_file()
    for ref_id in data.get_ref_ids("val")[:20]:
        ref = data.ref_by_id[ref_id]
        scene = scenes[ref["image_id"]]
        o = next(o for o in scene.objects if o.ann_id == ref["ann_id"])
        assert np.array_equal(data.get_mask(ref), shapes.object_masks(scene)[o.obj_id])
    scene = scenes[sorted(scenes)[0]]
    masks = shapes.object_masks(scene)
    o = scene.objects[0]
    assert shapes.match_object(masks[o.obj_id], scene) == (o.obj_id, 1.0)
    partial = masks[o.obj_id].copy()
    ys, xs = np.nonzero(partial)
    partial[ys[::10], xs[::10]] = 0  # 90% of the object
    obj_id, iou = shapes.match_object(partial, masks)
    assert obj_id == o.obj_id and 0.85 < iou < 0.95
    assert shapes.match_object(np.zeros_like(partial), masks) == (None, 0.0)
    items = data.image_items("testA")
    assert items and all(Path(it["path"]).is_file() for it in items)


def test_prepare_skips_when_unchanged(tmp_path):
    cfg = {"data_root": str(tmp_path / "w"), "seed": 1, "n_images": {"train": 4, "val": 2, "testA": 1, "testB": 1},
           "image_size": 96, "world": "shapes"}
    first = shapes.prepare(cfg)
    assert first["data.regenerated"] == 1 and first["data.images.train"] == 4
    assert first["data.world"] == "shapes" and "data.refs.shapes+.val" in first
    mtime = (tmp_path / "w" / "scenes.json").stat().st_mtime_ns
    again = shapes.prepare(cfg)
    assert again["data.regenerated"] == 0
    assert (tmp_path / "w" / "scenes.json").stat().st_mtime_ns == mtime
    skip = ("data.regenerated", "data.seconds")
    assert {k: v for k, v in again.items() if k not in skip} == {k: v for k, v in first.items() if k not in skip}
    png = next((tmp_path / "w" / "images" / "train2014").glob("*.png"))
    png.write_bytes(png.read_bytes() + b"x")  # a damaged file -> regenerate
    assert shapes.prepare(cfg)["data.regenerated"] == 1
    assert shapes.prepare({**cfg, "seed": 2})["data.regenerated"] == 1
    with pytest.raises(ValueError, match="data.datasets"):
        shapes.prepare({**cfg, "datasets": [{"name": "refcoco", "split_by": "unc"}]})
    assert shapes.load_scenes(tmp_path / "w")[1].width == 96


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        shapes.generate_world(tmp_path / "x", {"train": 2, "tests": 1}, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        shapes.generate_world(tmp_path / "x", 4, seed=0, image_size=32)
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        shapes.load_scenes(tmp_path / "nothing")
    (tmp_path / "y" / "images").mkdir(parents=True)
    (tmp_path / "y" / "images" / "mine.jpg").write_bytes(b"")
    with pytest.raises(FileExistsError, match="did not write"):
        shapes.generate_world(tmp_path / "y", 4, seed=0)


def test_cli_writes_dataset(tmp_path, capsys):
    from ris_utils.__main__ import main

    out = tmp_path / "cli"
    assert main(["shapes", "--out", str(out), "--n-images", "10", "--seed", "5"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert sum(stats["images"].values()) == 10
    for d in shapes.DATASETS:
        assert refer.refs_path(out, d, "shapes").is_file() and refer.instances_path(out, d).is_file()
    assert len(list((out / "images" / "train2014").glob("shapes_*.png"))) == 10
    assert shapes.cli(["--out", str(tmp_path / "c2"), "--n-images", "train=3,val=1,testA=1,testB=1"]) == 0
    assert len(shapes.load_scenes(tmp_path / "c2")) == 6


# --------------------------------------------------------------------------- the REFER toolkit's view


def test_the_refer_toolkit_opens_the_world_unchanged(world):
    """issue 14 item 9: REFER(data_root, "refcoco" | "refcoco+" | "refcocog", "unc" | "umd") -- the toolkit's own
    names, which it insists on -- opens shapes / shapes+ / shapes-unseen, and finds every image in
    <data_root>/images/train2014 (the real refer.py when REFER_TOOLKIT_PY names it, else tests/fixtures'
    behavioural model of it)."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    try:
        from refer_toolkit import load_refer_class
    finally:
        sys.path.pop(0)
    REFER, which = load_refer_class()
    root, _, scenes = world
    assert set(shapes.TOOLKIT_VIEW) == {"refcoco", "refcoco+", "refcocog"}
    for name, (ours, split_by) in shapes.TOOLKIT_VIEW.items():
        r = REFER(str(root), name, split_by)
        data = refer.load_refer(root, ours, shapes.SPLIT_BY)
        assert sorted(r.Refs) == sorted(x["ref_id"] for x in data.refs), which
        splits = ["train", "val", "testA", "testB"] if name != "refcocog" else ["train", "val", "test"]
        assert sum(len(r.getRefIds(split=s)) for s in splits) == len(data.refs)
        for ref_id in r.getRefIds(split="val")[:5]:
            ref = r.Refs[ref_id]
            img = r.loadImgs([ref["image_id"]])[0]
            assert os.path.isfile(os.path.join(r.IMAGE_DIR, img["file_name"]))
            want = refer.decode_segmentation(data.anns[ref["ann_id"]]["segmentation"], img["height"], img["width"])
            assert np.array_equal(r.getMask(ref)["mask"], want)
        # the view is a link to the dataset, not a second copy that could drift
        assert refer.refs_path(root, name, split_by).read_bytes() == refer.refs_path(root, ours, "shapes").read_bytes()
    assert Path(REFER(str(root), "refcoco", "unc").IMAGE_DIR) == root / shapes.IMAGE_SUBDIR
    assert len(list((root / shapes.IMAGE_SUBDIR).glob("*.png"))) == len(scenes)
    with pytest.raises(SystemExit):  # the toolkit refuses every other name: why the view exists
        REFER(str(root), "shapes", "shapes")
