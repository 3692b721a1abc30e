"""REFER-format I/O: write -> read round trip, getMask-style decode, split rules, clear errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ris_utils.data.refer import (
    decode_segmentation,
    encode_mask,
    load_refer,
    make_annotation,
    make_ref,
    make_sentence,
    write_refer,
)

# pycocotools 2.0.11 + numpy 2: its decode() triggers a DeprecationWarning about __array__(copy=...)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLITS = ["train", "train", "val", "testA", "testB", "testAB", "test", "testC"]


def toy_dataset(seed=0):
    """8 refs on 4 images of different sizes, random masks (incl. touching the border and one empty)."""
    rng = np.random.default_rng(seed)
    sizes = [(17, 23), (32, 32), (5, 41), (40, 9)]
    images = [{"id": 100 + i, "file_name": f"img_{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(sizes)]
    masks, anns, refs = {}, [], []
    sent_id = 0
    for k, split in enumerate(SPLITS):
        img = images[k % 4]
        m = rng.random((img["height"], img["width"])) < rng.uniform(0.05, 0.9)
        if k == 5:
            m[:] = False
        ann = make_annotation(1000 + k, img["id"], 1 + k % 3, m)
        sents = [make_sentence(f"The {['red', 'Blue'][j]} circle, LEFT-most #{k}!", sent_id + j) for j in range(2)]
        sent_id += 2
        refs.append(make_ref(k, ann, split, sents, img["file_name"]))
        anns.append(ann)
        masks[ann["id"]] = m.astype(np.uint8)
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
    return refs, images, anns, cats, masks


@pytest.fixture
def written(tmp_path):
    refs, images, anns, cats, masks = toy_dataset()
    out = write_refer(tmp_path, "shapes", "unc", refs, images, anns, cats)
    return tmp_path, out, masks


def test_encode_decode_roundtrip_bit_exact():
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (7, 13), (64, 48)]:
        m = rng.random((h, w)) < 0.4
        rle = encode_mask(m)
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        json.dumps(rle)
        for seg in (rle, [rle]):
            out = decode_segmentation(seg, h, w)
            assert out.dtype == np.uint8 and out.shape == (h, w)
            np.testing.assert_array_equal(out, m.astype(np.uint8))


def test_write_read_roundtrip_every_mask_bit_exact(written):
    root, out, masks = written
    assert out == root / "shapes"
    assert (out / "refs(unc).p").is_file() and (out / "instances.json").is_file()
    assert not list(out.glob("*.tmp"))
    data = load_refer(root, "shapes", "unc")
    assert len(data.refs) == len(SPLITS) and len(data.anns) == len(SPLITS) and len(data.imgs) == 4
    assert data.cats == {1: "circle", 2: "square", 3: "triangle"}
    for ref in data.refs:
        np.testing.assert_array_equal(data.get_mask(ref), masks[ref["ann_id"]])
        ann = data.anns[ref["ann_id"]]
        np.testing.assert_array_equal(data.get_mask(ann), masks[ann["id"]])
        assert ann["area"] == masks[ann["id"]].sum()

    # getMask-style decode, done directly with pycocotools on the files as written
    instances = json.loads((out / "instances.json").read_text())
    imgs = {im["id"]: im for im in instances["images"]}
    with open(out / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    anns = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        ann = anns[ref["ann_id"]]
        img = imgs[ref["image_id"]]
        seg = ann["segmentation"]
        assert isinstance(seg, list) and isinstance(seg[0], dict)  # the REFER toolkit's RLE branch
        if isinstance(seg[0], list):
            rle = mask_utils.frPyObjects(seg, img["height"], img["width"])
        else:
            rle = seg
        m = np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8)
        np.testing.assert_array_equal(m, masks[ann["id"]])
        assert sum(mask_utils.area(rle)) == masks[ann["id"]].sum()


def test_written_fields_and_bbox(written):
    root, out, masks = written
    data = load_refer(root, "shapes", "unc")
    ref = data.ref_by_id[0]
    assert set(ref) >= {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id",
                        "file_name"}
    s = ref["sentences"][0]
    assert s["tokens"] == ["the", "red", "circle", "left", "most", "0"]
    assert s["sent"] == "the red circle left most 0" and s["raw"] == "The red circle, LEFT-most #0!"
    assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
    assert data.sents[s["sent_id"]] is s
    for ann in data.anns.values():
        m = masks[ann["id"]]
        if m.any():
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] == 0


def test_polygon_and_uncompressed_rle_decode():
    # square polygon covering x in [2, 6), y in [1, 4) -> pycocotools rasterises it
    poly = [[2, 1, 6, 1, 6, 4, 2, 4]]
    m = decode_segmentation(poly, 8, 10)
    expected = mask_utils.decode(mask_utils.frPyObjects(poly, 8, 10))[:, :, 0]
    np.testing.assert_array_equal(m, expected)
    assert m.sum() > 0 and m[2, 3] == 1 and m[6, 8] == 0
    # two polygons -> union (summed over the last axis like getMask)
    two = decode_segmentation(poly + [[7, 5, 9, 5, 9, 7, 7, 7]], 8, 10)
    assert two.sum() > m.sum() and two.max() == 1
    # uncompressed RLE (column-major run lengths): 2x3 image, runs 1 off, 2 on, 3 off
    unc = {"size": [2, 3], "counts": [1, 2, 3]}
    np.testing.assert_array_equal(decode_segmentation(unc, 2, 3), np.array([[0, 1, 0], [1, 0, 0]], np.uint8))
    with pytest.raises(ValueError, match="does not match the image size"):
        decode_segmentation(encode_mask(np.ones((3, 3))), 4, 4)


@pytest.mark.parametrize("split, expected", [
    ("train", {0, 1}),
    ("val", {2}),
    ("testA", {3, 5}),  # suffix letter contained in the split: testA and testAB
    ("testB", {4, 5}),
    ("test", {3, 4, 5, 6, 7}),  # every split containing "test"
    ("testAB", {5}),
    ("testC", {7}),
])
def test_split_rules(written, split, expected):
    root, _, _ = written
    data = load_refer(root, "shapes", "unc")
    assert set(data.get_ref_ids(split=split)) == expected
    assert {ref["ref_id"] for ref, _ in data.sentences(split)} == expected
    assert len(list(data.sentences(split))) == 2 * len(expected)


def test_split_filters_and_unknown_split(written):
    root, _, _ = written
    data = load_refer(root, "shapes", "unc")
    assert data.get_ref_ids() == list(range(len(SPLITS)))
    assert data.get_ref_ids(image_ids=[100]) == [0, 4]
    assert data.get_ref_ids(image_ids=100, cat_ids=[2]) == [4]
    assert data.get_ref_ids(split="test", cat_ids=[3]) == [5]
    with pytest.raises(ValueError, match="no such split 'tset'"):
        data.get_ref_ids(split="tset")


def test_image_path_and_items(written, tmp_path):
    root, _, _ = written
    data = load_refer(root, "shapes", "unc")
    with pytest.raises(FileNotFoundError, match="img_0.png"):
        data.image_path(100)
    coco_dir = root / "images" / "mscoco" / "images" / "train2014"
    coco_dir.mkdir(parents=True)
    flat = root / "images"
    for i in range(4):
        (flat / f"img_{i}.png").write_bytes(b"x")
    (coco_dir / "img_1.png").write_bytes(b"x")
    assert data.image_path(100) == flat / "img_0.png"
    assert data.image_path(101) == coco_dir / "img_1.png"  # the REFER toolkit's directory comes first
    items = data.image_items("testB")  # refs 4 (image 100) and 5 (image 101)
    assert [it["image_id"] for it in items] == [100, 101]
    assert items[0] == {"image_id": 100, "file_name": "img_0.png", "path": str(flat / "img_0.png"),
                        "height": 17, "width": 23}
    other = load_refer(root, "shapes", "unc", image_root=tmp_path / "elsewhere")
    assert other.image_path(102) == tmp_path / "elsewhere" / "img_2.png"


def test_missing_files_name_the_path(written):
    root, out, _ = written
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p.*REFER layout.*refs\(unc\)\.p"):
        load_refer(root, "shapes", "umd")
    with pytest.raises(FileNotFoundError, match=r"refcoco.*refs\(unc\)\.p"):
        load_refer(root, "refcoco", "unc")
    (out / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_refer(root, "shapes", "unc")


def test_malformed_files_name_file_and_field(written):
    root, out, _ = written
    rp = out / "refs(unc).p"
    refs = pickle.loads(rp.read_bytes())
    del refs[3]["sentences"]
    rp.write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: ref 3 has no 'sentences'"):
        load_refer(root, "shapes", "unc")

    refs = pickle.loads(pickle.dumps(toy_dataset()[0]))
    del refs[2]["sentences"][1]["tokens"]
    rp.write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: ref 2 sentence 5 has no 'tokens'"):
        load_refer(root, "shapes", "unc")

    rp.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: not a readable refs pickle"):
        load_refer(root, "shapes", "unc")

    rp.write_bytes(pickle.dumps(toy_dataset()[0]))
    ip = out / "instances.json"
    inst = json.loads(ip.read_text())
    del inst["annotations"][4]["segmentation"]
    ip.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match="instances.json: annotation 1004 has no 'segmentation'"):
        load_refer(root, "shapes", "unc")
    del inst["categories"]
    ip.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match="instances.json: has no 'categories'"):
        load_refer(root, "shapes", "unc")
    ip.write_text("{broken")
    with pytest.raises(ValueError, match="instances.json: not valid JSON"):
        load_refer(root, "shapes", "unc")


def test_write_validates_input(tmp_path):
    refs, images, anns, cats, _ = toy_dataset()
    bad = [dict(r) for r in refs]
    del bad[1]["file_name"]
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p\): ref 1 has no 'file_name'"):
        write_refer(tmp_path, "shapes", "unc", bad, images, anns, cats)
    bad_imgs = [dict(im) for im in images]
    del bad_imgs[0]["height"]
    with pytest.raises(ValueError, match="image 100 has no 'height'"):
        write_refer(tmp_path, "shapes", "unc", refs, bad_imgs, anns, cats)
    with pytest.raises(ValueError, match="ref 0 names ann_id 1000"):
        write_refer(tmp_path, "shapes", "unc", refs, images, anns[1:], cats)
    assert not (tmp_path / "shapes").exists() or not list((tmp_path / "shapes").iterdir())


def test_write_is_deterministic_and_bytes_counts_become_str(tmp_path):
    refs, images, anns, cats, masks = toy_dataset()
    anns_bytes = [dict(a, segmentation=[dict(a["segmentation"][0], counts=a["segmentation"][0]["counts"].encode())])
                  for a in anns]
    write_refer(tmp_path / "a", "shapes", "unc", refs, images, anns, cats)
    write_refer(tmp_path / "b", "shapes", "unc", refs, images, anns_bytes, cats)
    for name in ("refs(unc).p", "instances.json"):
        assert (tmp_path / "a" / "shapes" / name).read_bytes() == (tmp_path / "b" / "shapes" / name).read_bytes()


def test_write_normalises_segmentation_to_a_list_of_rle(tmp_path):
    refs, images, anns, cats, masks = toy_dataset()
    anns = [dict(a) for a in anns]
    anns[0]["segmentation"] = anns[0]["segmentation"][0]  # bare dict
    h, w = images[1]["height"], images[1]["width"]
    m1 = masks[anns[1]["id"]]
    flat = m1.T.ravel()  # column-major, runs alternate 0s, 1s, 0s, ... starting with 0s
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    uncompressed = {"size": [h, w], "counts": counts + [run]}
    anns[1]["segmentation"] = uncompressed
    write_refer(tmp_path, "shapes", "unc", refs, images, anns, cats)
    inst = json.loads((tmp_path / "shapes" / "instances.json").read_text())
    for a in inst["annotations"][:2]:
        assert isinstance(a["segmentation"], list) and isinstance(a["segmentation"][0]["counts"], str)
        m = np.sum(mask_utils.decode(a["segmentation"]), axis=2).astype(np.uint8)
        np.testing.assert_array_equal(m, masks[a["id"]])
    anns[2]["segmentation"] = "oops"
    with pytest.raises(ValueError, match="annotation 1002 segmentation must be"):
        write_refer(tmp_path, "shapes", "unc", refs, images, anns, cats)
