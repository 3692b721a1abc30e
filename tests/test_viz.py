"""ris_utils.viz: the notebooks' drawing helpers -- what they compute, what they draw, and that the module is
a leaf (importing it pulls in no step module)."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # plt.show() is a no-op: the figure stays open for the test

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from ris_utils import viz  # noqa: E402
from ris_utils.data.refer import encode_mask  # noqa: E402

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_viz_is_a_leaf():
    code = ("import sys, ris_utils.viz; print(sorted(m for m in sys.modules if m.startswith('ris_utils')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    loaded = eval(out)  # noqa: S307 - our own printout
    steps = ("masks", "captioning", "filtering", "export", "engine", "ris", "generate", "train_")
    assert "ris_utils.data.refer" in loaded
    assert not [m for m in loaded if m.count(".") and m.split(".")[1].startswith(steps)], loaded


def test_check_inputs_names_what_to_run(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "records.jsonl").write_text("{}\n")
    (tmp_path / "empty").mkdir()
    viz.check_inputs({"a": tmp_path / "full", "b": tmp_path / "full" / "records.jsonl"}, "01_x.ipynb")
    with pytest.raises(FileNotFoundError) as e:
        viz.check_inputs({"masks": tmp_path / "empty", "ok": tmp_path / "full", "caps": tmp_path / "nope"},
                         "01_x.ipynb", "python -m ris_utils masks --split val")
    msg = str(e.value)
    assert msg == (f"missing input: masks ({tmp_path / 'empty'}); caps ({tmp_path / 'nope'}) -- run notebook "
                   "01_x.ipynb first (or `python -m ris_utils masks --split val`)")


def test_flatten():
    assert dict(viz.flatten({"a": 1, "b": {"c": 2, "d": {"e": "x"}}, "f": [1]})) == \
        {"a": 1, "b.c": 2, "b.d.e": "x", "f": [1]}


@dataclass
class FakeRefer:
    refs: list
    root: Path
    dataset: str = "fake"
    masks: dict = None

    def image_path(self, image_id):
        return self.root / f"{image_id}.png"

    def get_mask(self, ref):
        return self.masks[ref["ref_id"]].astype(np.uint8)


def fake_refer(tmp_path, n_images=3, refs_per_image=2, split="val"):
    refs, masks = [], {}
    for i in range(n_images):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        for k in range(refs_per_image):
            rid = 10 * i + k
            refs.append({"ref_id": rid, "image_id": i, "split": split, "sentences": [{"sent": f"ref {rid}"}]})
            masks[rid] = box(8, 10, 0, 4, 2 * k, 2 * k + 3)
    refs.append({"ref_id": 99, "image_id": 0, "split": "train", "sentences": [{"sent": "train ref"}]})
    masks[99] = box(8, 10, 0, 1, 0, 1)
    return FakeRefer(refs, tmp_path, masks=masks)


def test_pick_refs_is_seeded_and_shows_other_images_first(tmp_path):
    data = fake_refer(tmp_path)
    split, a = viz.pick_refs(data, 4, seed=3)
    assert split == "val" and viz.pick_refs(data, 4, seed=3)[1] == a
    assert len({r["image_id"] for r in a[:3]}) == 3  # one ref of each of the 3 images before a second one
    assert all(r["split"] == "val" for r in a)
    assert viz.pick_refs(data, 4, split_order=("train",))[0] == "train"


def test_refs_gallery_draws_one_panel_per_ref(tmp_path):
    viz.refs_gallery(fake_refer(tmp_path), 4, seed=0)
    fig = plt.gcf()
    assert len(fig.axes) == 4 and fig._suptitle.get_text() == "fake / val"
    assert all(ax.get_title().startswith("ref ") for ax in fig.axes)


def test_mask_overlay_tints_masks_and_blackens_edges():
    image = np.full((12, 12, 3), 200, np.uint8)
    big, small = box(12, 12, 1, 9, 1, 9), box(12, 12, 4, 6, 4, 6)
    props = [{"area": 4, "segmentation": encode_mask(small)}, {"area": 64, "segmentation": encode_mask(big)}]
    out = viz.mask_overlay(image, props, np.random.default_rng(0))
    rng = np.random.default_rng(0)  # the largest mask is drawn (and draws its colour) first
    c_big = rng.uniform(0, 1, 3)
    bg = 200 / 255
    assert np.allclose(out[0, 0], bg)                                  # outside every mask: unchanged
    assert np.allclose(out[2, 2], 0.45 * bg + 0.55 * c_big)            # inside the big mask only
    assert np.allclose(out[1, 1], 0) and np.allclose(out[4, 4], 0)     # edges (of the big and the small mask)
    assert np.allclose(out[5, 5], 0)                                   # a 2x2 mask is all edge
    assert np.allclose(viz.mask_overlay(image, props[:1], np.random.default_rng(0), max_drawn=0), bg)


def test_proposal_frames_and_gallery(tmp_path):
    m = box(10, 20, 0, 5, 0, 4)
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "a.png")
    prop = {"area": 20, "predicted_iou": 0.9, "stability_score": 0.8, "segmentation": encode_mask(m)}
    records = {"val": [{"status": "ok", "image_id": 1, "file_name": "a.png", "height": 10, "width": 20,
                        "proposals": [prop, prop]},
                       {"status": "error", "image_id": 2, "proposals": [prop]}]}
    props, counts = viz.proposal_frames(records)
    assert list(props["area_frac"]) == [0.1, 0.1] and list(counts["proposals"]) == [2]
    viz.proposal_gallery(records["val"], {1: tmp_path / "a.png"}, n=5)
    assert [ax.get_title() for ax in plt.gcf().axes] == ["a.png\n2 proposals"]


def test_gallery_table_rows_per_mask_and_setting():
    rec = {"image_id": 7, "masks": [{"mask_index": 0, "candidates": [
        {"view": 0, "setting": "beam", "text": "a red square"},
        {"view": 1, "setting": "beam", "text": "other view"},
        {"view": 0, "setting": "top_k=5", "text": "a square"},
        {"view": 0, "setting": "top_k=7", "text": "not shown"}]}]}
    table = viz.gallery_table({"naive": [rec], "distinctive": [rec]}, 7)
    assert list(table.columns) == ["naive", "distinctive"]
    assert list(table.index) == [(0, "beam"), (0, "top_k=5")]
    assert table.loc[(0, "beam"), "naive"] == "a red square"


def test_kept_dropped_lines_unique_texts_first_k():
    cands = [{"text": t, "keep": k, "doc": d} for t, k, d in
             [("a", True, 2.0), ("a", False, 0.1), ("b", True, 1.5), ("c", True, 3.0), ("d", False, 0.5)]]
    assert viz.kept_dropped_lines(cands) == ["+ a (2)", "+ b (1.5)", "- d (0.5)"]


def test_log10_doc_places_infinite_at_the_right_edge():
    import pandas as pd

    cands = pd.DataFrame({"n_masks": [1, 2, 2, 2], "doc": [5.0, 10.0, 0.01, np.inf]})
    out = viz.log10_doc(cands)
    assert list(out["log10_doc"]) == pytest.approx([1.0, -2.0, 1.25])  # single-mask image left out
    viz.doc_histogram(cands.assign(sampling="beam", mode="naive"))
    assert plt.gcf().axes


def test_mask_iou_by_hand():
    a, b = box(4, 4, 0, 2, 0, 2), box(4, 4, 0, 2, 1, 3)   # 4 px each, 2 shared -> 2 / 6
    assert viz.mask_iou(a, b) == pytest.approx(1 / 3)
    assert viz.mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0


def test_prediction_grid_gt_row_and_one_row_per_model(tmp_path):
    """Notebooks 04 (one model) and 05 (several) share this grid: GT on top, each model's IoU per panel."""
    data = fake_refer(tmp_path, n_images=2, refs_per_image=1)
    refs = [r for r in data.refs if r["split"] == "val"]
    gt0 = data.masks[refs[0]["ref_id"]]
    preds = {"naive": [(0, 0, np.zeros_like(gt0)), (1, 0, data.masks[refs[1]["ref_id"]])],
             "pseudo_ris": [(0, 0, gt0.copy()), (1, 0, box(8, 10, 0, 2, 0, 3))]}
    viz.prediction_grid(data, refs, preds, n=2, title="grid")
    axes = np.array(plt.gcf().axes).reshape(3, 2)
    assert [a.get_title() for a in axes[0]] == ["ref 0", "ref 10"]
    assert [a.get_title() for a in axes[1]] == ["naive: IoU 0.00", "naive: IoU 1.00"]
    assert [a.get_title() for a in axes[2]] == ["pseudo_ris: IoU 1.00", "pseudo_ris: IoU 0.50"]
    plt.close("all")
    viz.prediction_grid(data, refs, {"pseudo_ris": preds["pseudo_ris"]}, n=1)
    assert len(plt.gcf().axes) == 2


@dataclass
class FakeJob:
    out: str
    trainset: str
    style: str | None
    seed: int


def test_training_frames_and_curves(tmp_path):
    jobs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        (out / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 1.0, "val_mIoU": 10.0 + seed}]))
        (out / "log.csv").write_text("step,loss\n1,2.0\n2,4.0\n3,6.0\n")
        jobs.append(FakeJob(str(out), "pseudo_ris", None, seed))
    hist, steps = viz.training_frames(jobs)
    assert list(hist["val_mIoU"]) == [10.0, 11.0] and set(hist["style"]) == {"any"}
    assert list(steps["loss"])[:3] == [2.0, 3.0, 4.0]  # running mean
    viz.training_curves(hist, steps)
    assert len(plt.gcf().axes) == 2
