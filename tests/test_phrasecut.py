"""PhraseCut -> REFER converter on a tiny hand-made PhraseCut-format folder."""

import json

import numpy as np
import pytest
from PIL import Image

from ris_utils.data.phrasecut import cli, convert, is_coco_category
from ris_utils.data.refer import load_refer


def rect(x0, y0, x1, y1):
    """A rectangle polygon as PhraseCut stores it: list of [x, y] points."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def box_mask(h, w, *boxes):
    """Expected raster of axis-aligned rectangles (int corners, inclusive as a filled+outlined polygon)."""
    m = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1 + 1, x0:x1 + 1] = 1
    return m


def write_phrasecut(root, tasks, images):
    (root / "images").mkdir(parents=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (10, 20, 30)).save(root / "images" / f"{im['image_id']}.jpg")
    (root / "image_data_split.json").write_text(json.dumps(images))
    (root / "refer_val.json").write_text(json.dumps(tasks))


def task(tid, image_id, phrase, name, polygons):
    return {"task_id": tid, "image_id": image_id, "phrase": phrase, "ann_ids": [1],
            "instance_boxes": [[0, 0, 1, 1]] * len(polygons), "Polygons": polygons,
            "phrase_structure": {"name": name, "attributes": [], "relation_descriptions": [], "type": "name"}}


IMAGES = [{"image_id": 11, "width": 40, "height": 30, "split": "val"},
          {"image_id": 12, "width": 32, "height": 24, "split": "val"}]


@pytest.fixture
def pc_root(tmp_path):
    root = tmp_path / "VGPhraseCut_v0"
    tasks = [
        # two instances, the second with two polygons and float points (truncated to int)
        task("11__1", 11, "white surfboards on the sand", "surfboards",
             [[rect(2, 3, 10, 8)], [rect(20, 5, 25, 9), [[30.7, 20.9], [35.2, 20.1], [35.9, 26.4], [30.1, 26.0]]]]),
        task("11__2", 11, "blue sky", "sky", [[rect(0, 0, 39, 2)]]),
        task("12__1", 12, "a wooden fence", "fence", [[rect(4, 4, 12, 20), [[1, 1]]]]),  # 1-point polygon skipped
    ]
    write_phrasecut(root, tasks, IMAGES)
    return root


def test_convert_masks_and_fields(pc_root, tmp_path):
    out = tmp_path / "refer"
    stats = convert(pc_root, out, splits=("val",))
    assert stats["refs"] == 3 and stats["images"] == 2 and stats["multi_instance"] == 1
    assert stats["refs_unseen"] == 2 and stats["split_by"] == ["phrasecut", "phrasecut_unseen"]
    data = load_refer(out, "phrasecut", "phrasecut")
    by_task = {r["task_id"]: r for r in data.refs}
    surf = by_task["11__1"]
    expected = box_mask(30, 40, (2, 3, 10, 8), (20, 5, 25, 9), (30, 20, 35, 26))
    np.testing.assert_array_equal(data.get_mask(surf), expected)
    assert surf["sentences"][0]["raw"] == "white surfboards on the sand"
    assert data.cats[surf["category_id"]] == "surfboards" and surf["split"] == "val"
    np.testing.assert_array_equal(data.get_mask(by_task["11__2"]), box_mask(30, 40, (0, 0, 39, 2)))
    np.testing.assert_array_equal(data.get_mask(by_task["12__1"]), box_mask(24, 32, (4, 4, 12, 20)))
    assert data.get_mask(by_task["12__1"]).shape == (24, 32)
    assert [it["image_id"] for it in data.image_items("val")] == [11, 12]
    assert data.image_path(12).name == "12.jpg" and data.image_path(12).is_file()
    unseen = load_refer(out, "phrasecut", "phrasecut_unseen")
    assert sorted(r["task_id"] for r in unseen.refs) == ["11__2", "12__1"]


def test_unseen_only_drops_coco(pc_root, tmp_path):
    out = tmp_path / "refer"
    assert cli(["--root", str(pc_root), "--out", str(out), "--splits", "val", "--unseen-only"]) == 0
    data = load_refer(out, "phrasecut", "phrasecut_unseen")
    assert sorted(data.cats.values()) == ["fence", "sky"]
    assert not (out / "phrasecut" / "refs(phrasecut).p").exists()


def test_coco_matching_rule():
    assert is_coco_category("Cars") and is_coco_category("benches") and is_coco_category("traffic  light")
    assert is_coco_category("person") and not is_coco_category("man") and not is_coco_category("sky")


def test_malformed_input_errors(pc_root, tmp_path):
    tasks = json.loads((pc_root / "refer_val.json").read_text())
    del tasks[1]["Polygons"]
    (pc_root / "refer_val.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=r"refer_val\.json.*11__2.*'Polygons'"):
        convert(pc_root, tmp_path / "o", splits=("val",))
    tasks[1]["Polygons"] = [[[[1, 2, 3]]]]
    (pc_root / "refer_val.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=r"refer_val\.json.*11__2.*\[x, y\]"):
        convert(pc_root, tmp_path / "o", splits=("val",))
    with pytest.raises(FileNotFoundError, match=r"refer_test\.json"):
        convert(pc_root, tmp_path / "o", splits=("test",))
    (pc_root / "image_data_split.json").write_text(json.dumps([{"image_id": 11, "width": 40}]))
    with pytest.raises(ValueError, match=r"image_data_split\.json.*'height'"):
        convert(pc_root, tmp_path / "o", splits=("val",))
    with pytest.raises(ValueError, match="splits="):
        convert(pc_root, tmp_path / "o", splits=("bogus",))


def test_miniv_written_as_val(pc_root, tmp_path):
    (pc_root / "refer_miniv.json").write_text(json.dumps([task("12__9", 12, "green grass", "grass",
                                                                [[rect(0, 20, 31, 23)]])]))
    stats = convert(pc_root, tmp_path / "refer", splits=("val", "miniv"))
    assert stats["per_split"] == {"val": 3, "miniv": 1}
    data = load_refer(tmp_path / "refer", "phrasecut", "phrasecut")
    ref = next(r for r in data.refs if r["task_id"] == "12__9")
    assert ref["split"] == "val" and ref["phrasecut_split"] == "miniv"
    assert len(data.get_ref_ids(split="val")) == 4
    np.testing.assert_array_equal(data.get_mask(ref), box_mask(24, 32, (0, 20, 31, 23)))
