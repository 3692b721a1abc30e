"""The paper-tiny profile: its sample data (ris_utils.data.samples) and its end-to-end papermill run.

The end-to-end test runs every numbered notebook of the repository under ``paper-tiny`` through
``ris_utils.runs.run_profile`` on CPU (tiny random-init models) and checks that metrics.json holds the numbers
each step must record. It proves the wiring of the paper's code path, not its quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ris_utils import profiles
from ris_utils.data import refer, samples


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_tiny_data")
    stats = samples.prepare({"data_root": str(root), "max_side": 160,
                             "datasets": [{"name": "refcoco+", "split_by": "unc"},
                                          {"name": "refcocog", "split_by": "umd"}],
                             "pseudo_split": {"dataset": "refcoco+", "split_by": "unc", "split": "train"}})
    return root, stats


def test_samples_are_written_in_the_refer_layout(tiny_root):
    root, stats = tiny_root
    n_photos = len(samples.SPLITS)
    assert stats["data.train2014_images"] == n_photos
    assert stats["data.pseudo_images"] == sum(s == "train" for s in samples.SPLITS.values())
    for name, split_by in (("refcoco+", "unc"), ("refcocog", "umd")):
        data = refer.load_refer(root, name, split_by)
        assert {r["split"] for r in data.refs} == {"train", "val", "testA", "testB"}
        for ref in data.refs:
            img = data.imgs[ref["image_id"]]
            path = data.image_path(ref["image_id"])  # found where the REFER toolkit looks
            assert path.parent == root / samples.IMAGE_DIR
            m = data.get_mask(ref)
            assert m.shape == (img["height"], img["width"]) and 0 < m.sum() < m.size
            assert max(img["height"], img["width"]) == 160
            assert ref["sentences"] and all(s["tokens"] for s in ref["sentences"])
    # splits are by image, as in RefCOCO
    data = refer.load_refer(root, "refcoco+", "unc")
    by_image = {}
    for r in data.refs:
        by_image.setdefault(r["image_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_image.values())


def test_samples_are_deterministic_and_masks_follow_the_photos():
    a = samples.build_samples(max_side=96)
    b = samples.build_samples(max_side=96)
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
    photos, refs, images, anns = a
    # the coin masks come from thresholding: the three coins are disjoint and brighter than the background
    coin_img = next(im for im in images if im["file_name"] == "sample_coins.jpg")
    coin_anns = [x for x in anns if x["image_id"] == coin_img["id"]]
    masks = [refer.decode_segmentation(x["segmentation"], coin_img["height"], coin_img["width"]).astype(bool)
             for x in coin_anns]
    gray = photos["sample_coins.jpg"].mean(axis=2)
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()
    background = ~np.logical_or.reduce(masks)
    assert all(gray[m].mean() > gray[background].mean() + 20 for m in masks)
    # "the largest coin" is the largest of the three
    assert masks[0].sum() > masks[1].sum() and masks[0].sum() > masks[2].sum()


def test_random_checkpoint_is_deterministic_and_loads_through_open_clip(tmp_path):
    """paper-tiny's CoCa weights: same seed -> same file content; open_clip's pretrained=<file> loads them."""
    import open_clip
    import torch

    a = samples.write_random_checkpoint("coca_tiny", tmp_path / "a.pt", seed=3)
    b = samples.write_random_checkpoint("coca_tiny", tmp_path / "b.pt", seed=3)
    sa, sb = torch.load(a)["state_dict"], torch.load(b)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    proj = sa["text_decoder.text_projection"]  # left as torch.empty by open_clip: initialised here
    assert torch.isfinite(proj).all() and 0.05 < float(proj.std()) < 0.5
    model = open_clip.create_model("coca_tiny", pretrained=str(a))
    assert torch.equal(model.text_decoder.text_projection.detach(), proj)


def test_unknown_photo_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sample photo 'lena'"):
        samples.build_samples(photos=["lena"])


def test_paper_and_paper_tiny_profiles_have_the_same_keys():
    """paper-tiny runs the paper's code path: same sections, and every key of a paper step exists in tiny."""
    paper, tiny = profiles.load_profile("paper"), profiles.load_profile("paper-tiny")
    assert set(paper) == set(tiny)
    for section in ("masks", "captions", "filter", "export", "ris"):  # (data differs: another world)
        missing = set(paper[section]) - set(tiny[section])
        assert not missing, f"paper-tiny.{section} lacks {sorted(missing)}"
    assert paper["data"]["world"] == "refer" and tiny["data"]["world"] == "samples"


@pytest.mark.parametrize("name", ["paper", "paper-tiny"])
def test_paper_profiles_are_accepted_by_every_step(name):
    """Every section of both paper profiles passes the validation of the module that reads it (no model built)."""
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    from ris_utils import download, filtering, masks
    from ris_utils.captioning import parse_settings, step
    from ris_utils.ris.model import MODEL_REGISTRY
    from ris_utils.ris.train import resolve_config

    m = profiles.step_config(name, "masks")
    assert m["sam_variant"] in masks.SAM_BUILDERS
    allowed = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters)
    assert set(m["amg"]) <= allowed
    masks.make_selector(m["selector"])  # raises on unknown keys
    c = profiles.step_config(name, "captions")
    settings = step.decode_settings(c)
    assert len(settings) == 11 and settings[0]["kind"] == "beam"  # 1 beam + 5 top-k + 5 top-p per view
    assert len(parse_settings(settings[1:])) == 10 and len(step.view_kinds(c)) == 4  # -> 44 candidates
    assert c["min_seq_len"] == 5 and c["seq_len"] > c["min_seq_len"] and c["n_range"] == [2, 30]
    f = profiles.step_config(name, "filter")
    assert f["fallback"] in filtering.FALLBACKS and f["nonpositive"] in filtering.NONPOSITIVE
    r = resolve_config(profiles.step_config(name, "ris"))
    assert r["model"] in MODEL_REGISTRY and r["word_len"] == 17 and r["tokenizer"] == "open_clip"
    assert r["schedule"] == {"name": "multistep", "milestones": [35], "gamma": 0.1, "warmup_steps": 0}
    assert r["backbone_lr_mult"] == 0.1 and r["grad_clip"] == 0.0 and r["convention"] == "cris"
    d = profiles.step_config(name, "data")
    if d["world"] == "refer":
        download.resolve_names(d["need"])  # every item is in the source table
        assert m["checkpoint"].endswith("sam_vit_h_4b8939.pth") and m["amg"]["pred_iou_thresh"] == 0.5
        assert r["input_size"] == 416 and r["epochs"] == 50 and r["pretrained"] == "openai"


# --------------------------------------------------------------------------- end to end (papermill)

#: metric keys each notebook must record under paper-tiny (by notebook number)
EXPECTED_KEYS = {
    "00": ["data.train2014_images", "data.pseudo_images", "data.refcoco+.train.refs"],
    "01": ["masks.proposals_per_image", "masks.recall_at_0.5", "masks.images_ok"],
    "02": ["captions.seconds.naive.train", "captions.seconds.distinctive.train"],
    "03": ["export.pseudo_ris.masks_exported", "export.pseudo_ris.expressions"],
    "04": ["ris.n_runs", "ris.train.pseudo_ris.refcoco+.val.mIoU_seed_mean"],
    "05": ["ris.pseudo_ris.refcoco+.val.mIoU", "ris.pseudo_ris.refcoco+.testB.oIoU"],
    "06": ["generate.masks_exported", "generate.expressions"],
}


def isolated_profile(tmp_path) -> Path:
    """A copy of paper-tiny.yaml whose data_root / work_dir / checkpoint paths live under ``tmp_path``, so the
    test neither clobbers nor reuses a user's ``data/paper-tiny`` or ``papermill_runs/output/paper-tiny``."""
    text = (profiles.profiles_dir() / "paper-tiny.yaml").read_text()
    text = text.replace("papermill_runs/output/paper-tiny", str(tmp_path / "out"))
    text = text.replace("data/paper-tiny", str(tmp_path / "data"))
    path = tmp_path / "paper-tiny.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_paper_tiny_end_to_end_through_papermill(tmp_path):
    from ris_utils.runs import find_notebooks, run_profile

    notebooks = find_notebooks(profiles.project_root() / "notebooks")
    if not notebooks:
        pytest.skip("no numbered notebooks in notebooks/ yet")
    prof = isolated_profile(tmp_path)
    assert profiles.step_config(prof, "shared")["work_dir"] == str(tmp_path / "out" / "work")
    metrics = run_profile(str(prof), params={"profile": str(prof)}, output_root=tmp_path / "runs", progress=False)
    out = tmp_path / "runs" / "paper-tiny"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for nb in notebooks:
        assert f"runtime.{nb.stem}.seconds" in metrics
        for key in EXPECTED_KEYS.get(nb.name[:2], []):
            assert key in metrics, f"{nb.name} did not record {key}"
        executed = (out / nb.name).read_text()
        assert "proves the wiring" in executed, f"{nb.name} does not say that paper-tiny proves the wiring only"
    assert metrics["data.train2014_images"] == len(samples.SPLITS)
    assert (tmp_path / "data" / "checkpoints" / "coca_tiny_random.pt").is_file()
