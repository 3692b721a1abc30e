"""``python -m ris_utils generate`` (issue 12): one command from a folder of images to REFER / CRIS / HF
outputs, a report and a summary; resumable after a real SIGKILL; the CRIS layout equals what CRIS / ETRIS's
``tools/data_process.py`` writes (checked against a re-implementation of that script's logic, below); the HF
dataset loads with ``datasets.load_dataset``; the report renders in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ris_utils import engine, generate, profiles
from ris_utils.data import refer

ROOT = Path(__file__).resolve().parents[1]
N_GOOD = 6


def _photos(tmp: Path) -> Path:
    """6 shapes-world images (one in a subfolder, one with a name another folder also uses) + 2 bad files."""
    from ris_utils.data import shapes

    world = tmp / "world"
    shapes.generate_world(world, n_images={"train": N_GOOD, "val": 0, "testA": 0, "testB": 0}, seed=3)
    pngs = sorted(world.rglob("*.png"))[:N_GOOD]
    photos = tmp / "photos"
    (photos / "sub").mkdir(parents=True)
    for k, p in enumerate(pngs):
        dst = photos / "sub" / pngs[0].name if k == len(pngs) - 1 else photos / p.name
        shutil.copy(p, dst)
    (photos / "broken.jpg").write_text("not an image")
    (photos / "sub" / "empty.webp").write_bytes(b"")
    (photos / "notes.txt").write_text("ignored: not an image extension")
    return photos


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    photos = _photos(tmp)
    out = tmp / "run"
    summary = generate.generate(photos, out, "shapes", formats="refer,cris,hf", workers=1, progress=False)
    ref = tmp / "reference"
    shutil.copytree(out, ref, symlinks=True)
    return {"tmp": tmp, "photos": photos, "out": out, "ref": ref, "summary": summary}


def _tree(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name.endswith(".lock"):  # the run's folder locks (they name the holder's pid), not outputs
            continue
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def test_generate_writes_every_output_and_a_summary(run):
    s, out = run["summary"], run["out"]
    assert s["images"] == N_GOOD + 2 and s["images_ok"] == N_GOOD and s["images_failed"] == 2
    assert {f["file_name"] for f in s["failures"]} == {"broken.jpg", "sub/empty.webp"}
    assert all("BadImageError" in f["error"] for f in s["failures"])
    assert s["masks"] > N_GOOD and 0 < s["masks_exported"] <= s["masks"] and s["expressions"] > 0
    assert s["steps"]["masks"]["failed"] == 2 and s["steps"]["filter"]["ok"] == N_GOOD
    assert json.loads((out / "summary.json").read_text())["expressions"] == s["expressions"]
    data = refer.load_refer(out / "refer", "refcoco+", "pseudo")
    assert len(data.refs) == s["masks_exported"]
    names = {im["file_name"] for im in data.imgs.values()}
    assert any(n.startswith("sub/") for n in names)  # ids are paths under --images: same names stay apart
    for iid in {r["image_id"] for r in data.refs}:
        assert data.image_path(iid).is_file()  # where the REFER toolkit looks (images/train2014)
    assert (out / "report.html").is_file() and (out / "hf" / "README.md").is_file()
    assert (out / "cris" / "anns" / "refcoco+" / "train.json").is_file()
    text = generate.summary_text(s, out)
    assert "failed [masks] broken.jpg" in text and "expressions kept" in text


def test_rerun_after_sigkill_gives_the_uninterrupted_output(run):
    """A real ``kill -9`` in the middle of the captions step, then the same command again."""
    out = run["out"]
    shutil.rmtree(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "ris_utils", "generate", "--images", str(run["photos"]), "--out", str(out),
           "--format", "refer,cris,hf", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_dir = out / "work" / "captions" / "distinctive" / "train" / "parts"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            logs = list(log_dir.glob("*.log")) if log_dir.is_dir() else []
            if logs and sum(p.read_bytes().count(b"\n") for p in logs) >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "generate finished before it could be killed (rc %s)" % proc.returncode
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = sum(p.read_bytes().count(b"\n") for p in log_dir.glob("*.log"))
    assert 1 <= done < N_GOOD and not (out / "summary.json").exists()
    generate.generate(run["photos"], out, "shapes", formats="refer,cris,hf", workers=1, progress=False)
    a, b = _tree(run["ref"]), _tree(out)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"files differ after kill -9 + rerun: {differ}"


# ------------------------------------------------------------------ CRIS / ETRIS tools/data_process.py
# A re-implementation of the logic of CRIS.pytorch's tools/data_process.py, written for this test without
# OpenCV. It talks to the REFER toolkit's API (REFER(data_root, dataset, splitBy), getRefIds(split=),
# Refs, getRefBox, loadImgs, getMask): the real refer.py when REFER_TOOLKIT_PY names it, else the behavioural
# model in tests/fixtures/refer_toolkit.py when present, else the minimal model below.


class _MiniRefer:
    """What data_process.py uses of the REFER toolkit (reads the files as refer.py does)."""

    def __init__(self, data_root, dataset, splitBy):
        d = Path(data_root) / dataset
        self.refs = pickle.load(open(d / f"refs({splitBy}).p", "rb"))
        inst = json.loads((d / "instances.json").read_text())
        self.Anns = {a["id"]: a for a in inst["annotations"]}
        self.Imgs = {im["id"]: im for im in inst["images"]}
        self.Refs = {r["ref_id"]: r for r in self.refs}
        self.refToAnn = {r["ref_id"]: self.Anns[r["ann_id"]] for r in self.refs}
        self.IMAGE_DIR = str(Path(data_root) / "images" / "train2014")

    def getRefIds(self, split=""):
        if split in ("testA", "testB", "testC"):
            sel = [r for r in self.refs if split[-1] in r["split"]]
        elif split == "test":
            sel = [r for r in self.refs if "test" in r["split"]]
        else:
            sel = [r for r in self.refs if r["split"] == split]
        return [r["ref_id"] for r in sel]

    def getRefBox(self, ref_id):
        return self.refToAnn[ref_id]["bbox"]

    def loadImgs(self, image_ids):
        return [self.Imgs[i] for i in (image_ids if isinstance(image_ids, list) else [image_ids])]

    def getMask(self, ref):
        ann, image = self.refToAnn[ref["ref_id"]], self.Imgs[ref["image_id"]]
        if type(ann["segmentation"][0]) is list:
            rle = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
        else:
            rle = ann["segmentation"]
        return {"mask": np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8)}


def _refer_class():
    fixtures = Path(__file__).parent / "fixtures"
    if (fixtures / "refer_toolkit.py").is_file():
        sys.path.insert(0, str(fixtures))
        try:
            from refer_toolkit import load_refer_class
        finally:
            sys.path.pop(0)
        return load_refer_class()[0]
    return _MiniRefer


def _data_process(data_root: Path, dataset: str, split_by: str, output_dir: Path) -> None:
    refer_api = _refer_class()(str(data_root), dataset, split_by)

    def cat_process(cat):  # as in data_process.py
        if 1 <= cat <= 11:
            cat = cat - 1
        elif 13 <= cat <= 25:
            cat = cat - 2
        elif 27 <= cat <= 28:
            cat = cat - 3
        elif 31 <= cat <= 44:
            cat = cat - 5
        elif 46 <= cat <= 65:
            cat = cat - 6
        elif cat == 67:
            cat = cat - 7
        elif cat == 70:
            cat = cat - 9
        elif 72 <= cat <= 82:
            cat = cat - 10
        elif 84 <= cat <= 90:
            cat = cat - 11
        return cat

    ann_path, mask_path = output_dir / "anns" / dataset, output_dir / "masks" / dataset
    ann_path.mkdir(parents=True, exist_ok=True)
    mask_path.mkdir(parents=True, exist_ok=True)
    for split in ["train", "val", "testA", "testB"]:  # data_process.py's list for refcoco / refcoco+
        dataset_array = []
        for i in refer_api.getRefIds(split=split):
            ref = refer_api.Refs[i]
            bbox = refer_api.getRefBox(i)
            img_name = refer_api.loadImgs([ref["image_id"]])[0]["file_name"]
            x_min, y_min = int(bbox[0]), int(bbox[1])
            box = list(map(int, [x_min, y_min, x_min + int(bbox[2]), y_min + int(bbox[3])]))
            ref_dict = {"bbox": box, "cat": cat_process(ref["category_id"]), "segment_id": i, "img_name": img_name}
            Image.fromarray(refer_api.getMask(ref)["mask"] * 255).save(mask_path / f"{i}.png")  # cv2.imwrite there
            sents = [{"idx": k, "sent_id": s["sent_id"], "sent": s["sent"].strip()} for k, s in enumerate(ref["sentences"])]
            ref_dict["sentences"] = sents
            ref_dict["sentences_num"] = len(sents)
            dataset_array.append(ref_dict)
        with open(output_dir / "anns" / dataset / (split + ".json"), "w") as f:
            json.dump(dataset_array, f)


def test_the_refer_toolkit_opens_the_export(run):
    r = _refer_class()(str(run["ref"] / "refer"), "refcoco+", "pseudo")
    ids = r.getRefIds(split="train")
    assert len(ids) == run["summary"]["masks_exported"]
    for i in ids:
        img = r.loadImgs([r.Refs[i]["image_id"]])[0]
        assert os.path.isfile(os.path.join(r.IMAGE_DIR, img["file_name"]))
        assert r.getMask(r.Refs[i])["mask"].shape == (img["height"], img["width"])


def test_cris_format_is_what_data_process_writes(run, tmp_path):
    out = run["ref"]
    _data_process(out / "refer", "refcoco+", "pseudo", tmp_path / "dp")
    for split in ("train", "val", "testA", "testB"):
        ours = (out / "cris" / "anns" / "refcoco+" / f"{split}.json").read_bytes()
        assert ours == (tmp_path / "dp" / "anns" / "refcoco+" / f"{split}.json").read_bytes(), split
    rows = json.loads((out / "cris" / "anns" / "refcoco+" / "train.json").read_text())
    assert len(rows) == run["summary"]["masks_exported"]
    theirs = sorted(p.name for p in (tmp_path / "dp" / "masks" / "refcoco+").glob("*.png"))
    assert sorted(p.name for p in (out / "cris" / "masks" / "refcoco+").glob("*.png")) == theirs
    for name in theirs:
        a = np.asarray(Image.open(out / "cris" / "masks" / "refcoco+" / name))
        b = np.asarray(Image.open(tmp_path / "dp" / "masks" / "refcoco+" / name))
        assert a.dtype == np.uint8 and a.ndim == 2 and np.array_equal(a, b) and set(np.unique(a)) <= {0, 255}
    # what folder2lmdb.py reads next: each image and mask by these names
    for r in rows:
        assert (out / "refer" / "images" / "train2014" / r["img_name"]).is_file()
        assert (out / "cris" / "masks" / "refcoco+" / f"{r['segment_id']}.png").is_file()
        assert r["sentences_num"] == len(r["sentences"]) > 0


def test_cris_category_index_matches_the_coco_compaction():
    from ris_utils.formats.cris import coco_cat_index

    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert [coco_cat_index(i) for i in coco_ids] == list(range(80))
    assert coco_cat_index(12) == 12 and coco_cat_index(0) == 0 and coco_cat_index(95) == 95


def test_hf_dataset_loads_with_load_dataset(run, tmp_path):
    from datasets import load_dataset

    out = run["ref"]
    # a cache of its own: datasets keys a local folder's cache by its path, and pytest reuses tmp paths
    ds = load_dataset(str(out / "hf"), cache_dir=str(tmp_path / "hf_cache"))["train"]
    data = refer.load_refer(out / "refer", "refcoco+", "pseudo")
    assert len(ds) == len(data.refs)
    for row, ref in zip(ds, data.refs):
        assert row["ref_id"] == ref["ref_id"] and row["expressions"] == [s["sent"] for s in ref["sentences"]]
        m = mask_utils.decode({"size": row["mask_rle"]["size"], "counts": row["mask_rle"]["counts"]})
        assert np.array_equal(m, data.get_mask(ref))
        assert (out / "hf" / row["image"]).is_file() and row["noun"] == data.cats[ref["category_id"]]
        assert len(row["doc"]) == len(row["expressions"]) and not any(math.isnan(d) for d in row["doc"])


def test_export_command_writes_the_formats(run, tmp_path):
    from ris_utils.export import cli_export

    fdir = run["ref"] / "work" / "filter" / "distinctive" / "train"
    rc = cli_export(["--candidates", str(fdir), "--out", str(tmp_path / "exp"), "--format", "cris,hf",
                     "--images", str(run["photos"])])
    assert rc == 0
    assert (tmp_path / "exp" / "cris" / "anns" / "refcoco+" / "train.json").read_bytes() == \
        (run["ref"] / "cris" / "anns" / "refcoco+" / "train.json").read_bytes()
    assert (tmp_path / "exp" / "hf" / "data" / "train-00000-of-00001.parquet").is_file()
    with pytest.raises(SystemExit):
        cli_export(["--candidates", str(fdir), "--out", str(tmp_path / "x"), "--format", "coco"])


def test_generate_refuses_an_empty_folder_and_unknown_formats(tmp_path):
    (tmp_path / "empty").mkdir()
    assert generate.cli(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    from ris_utils.formats import parse_formats

    assert parse_formats("hf, refer") == ["refer", "hf"]
    with pytest.raises(ValueError, match="unknown format"):
        parse_formats("refer,lmdb")


# ------------------------------------------------------------------ the report in a real browser

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_images_and_expressions_in_headless_chromium(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")
    report = run["ref"] / "report.html"
    html = report.read_text()
    assert "<link" not in html and "http://" not in html and "https://" not in html  # offline: no CDN
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    n_ok = run["summary"]["images_ok"]
    assert f'data-rendered="{n_ok}"' in dom, dom[:2000]  # the JS ran and drew every image of the page
    assert f'data-images-loaded="{n_ok}"' in dom  # every image file loaded (not a broken icon)
    assert dom.count('class="item"') == n_ok
    records = list(engine.read_records(run["ref"] / "work" / "filter" / "distinctive" / "train", only_ok=True))
    kept = next(c["text"] for r in records for m in r["masks"] for i, c in enumerate(m["candidates"])
                if i in m["survivors"])
    dropped = next(c["text"] for r in records for m in r["masks"] for c in m["candidates"]
                   if not c["keep"] and c["text"] not in {m["candidates"][i]["text"] for i in m["survivors"]})
    assert f'<span class="expr">{kept}' in dom and f'<s class="expr">{dropped}' in dom
    assert "DoC " in dom and "broken.jpg" in dom  # DoC shown; failed images listed
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1280,1600", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1600, 1280) and img.std() > 10  # not a blank page


# ------------------------------------------------------------------ paper-tiny: the paper's code path on photos

def test_generate_on_the_paper_tiny_sample_photos(tmp_path):
    from ris_utils.data import samples

    text = (profiles.profiles_dir() / "paper-tiny.yaml").read_text()
    text = text.replace("papermill_runs/output/paper-tiny", str(tmp_path / "out")).replace(
        "data/paper-tiny", str(tmp_path / "data"))
    prof = tmp_path / "paper-tiny.yaml"
    prof.write_text(text)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coins", "coffee"):
        img = samples.load_photo(name)
        s = 160 / max(img.shape[:2])
        Image.fromarray(img).resize((round(img.shape[1] * s), round(img.shape[0] * s))).save(photos / f"{name}.jpg")
    s = generate.generate(photos, tmp_path / "gen", str(prof), formats="refer,cris,hf", progress=False)
    assert s["images_ok"] == 2 and s["masks_exported"] > 0 and s["expressions"] > 0
    assert (tmp_path / "data" / "checkpoints" / "coca_tiny_random.pt").is_file()  # written when missing
    for p in ("report.html", "cris/anns/refcoco+/train.json", "hf/data/train-00000-of-00001.parquet",
              "refer/refcoco+/refs(pseudo).p"):
        assert (tmp_path / "gen" / p).is_file(), p


def test_image_items_recurse_skip_the_output_folder_and_other_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x.jpg", "a/x.JPG", "a/b/y.webp", "a/b/z.png", "notes.txt", "out/report_files/000000.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items = generate.image_items(tmp_path, exclude=tmp_path / "out")
    assert [it["image_id"] for it in items] == ["a/b/y.webp", "a/b/z.png", "a/x.JPG", "x.jpg"]
    assert all(it["file_name"] == it["image_id"] and Path(it["path"]).is_file() for it in items)
