"""Issue 11: odd files, crafted checkpoints, concurrent runs, typo'd paths, torn downloads, leftovers, one-line
errors and file modes (each test fails on the code before the fix)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_engine import _env  # a subprocess environment that imports this checkout

from ris_utils import engine, fileio

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ris_utils", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _png(path, w=48, h=40, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 220, np.uint8)
    img[5:20, 6:30] = rng.integers(0, 120, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


# ------------------------------------------------------------------------------------------------ 3. locking


def _race_worker(out, k, barrier, q):
    def fn(item):
        time.sleep(0.002)
        return {"v": k}

    items = [{"image_id": i, "path": f"{i}.png"} for i in range(6)]
    barrier.wait()
    try:
        engine.run("unit", items, fn, out, config={"v": k}, progress=False, fsync=False)
        q.put((k, "ok"))
    except (engine.ResumeMismatchError, fileio.FolderBusyError) as e:
        q.put((k, type(e).__name__))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put((k, f"unexpected {type(e).__name__}: {e}"))


def test_two_runs_with_different_settings_never_mix_20_trials(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(20):
        out = tmp_path / f"t{trial}"
        barrier, q = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_worker, args=(out, k, barrier, q)) for k in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        results = dict(q.get(timeout=5) for _ in procs)
        assert sorted(results.values()).count("ok") == 1, results
        assert all(v in ("ok", "ResumeMismatchError", "FolderBusyError") for v in results.values()), results
        winner = next(k for k, v in results.items() if v == "ok")
        manifest = json.loads((out / engine.MANIFEST).read_text())
        assert manifest["config"] == {"v": winner}
        assert [r["v"] for r in engine.read_records(out)] == [winner] * 6


def test_second_run_into_a_busy_folder_is_refused_or_waits(tmp_path):
    items = [{"image_id": i, "path": f"{i}.png"} for i in range(3)]
    with fileio.folder_lock(tmp_path / "o", what="someone else"):
        with pytest.raises(fileio.FolderBusyError, match=r"in use by another run \(someone else, pid \d+"):
            engine.run("unit", items, lambda it: {}, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / engine.RECORDS).exists()
    # waiting: the holder releases after 0.5 s, the run then proceeds
    import threading

    got = threading.Event()

    def hold():
        with fileio.folder_lock(tmp_path / "w"):
            got.set()
            time.sleep(0.5)

    t = threading.Thread(target=hold)
    t.start()
    got.wait(5)
    s = engine.run("unit", items, lambda it: {}, tmp_path / "w", progress=False, lock_wait=30)
    t.join()
    assert s["ok"] == 3


# ------------------------------------------------------------------------------------------------ 7. leftovers


def test_temp_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    out = tmp_path / "o"
    items = [{"image_id": i, "path": f"{i}.png"} for i in range(3)]
    engine.run("unit", items, lambda it: {"a": 1}, out, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    stale = [out / f".records.jsonl.tmp{dead.pid}", out / f".manifest.json.tmp{dead.pid}.abc123",
             out / engine.PARTS / f".unit.rank0of1.log.tmp{dead.pid}", out / ".summary.json.k3j_x9aq.tmp"]
    alive = out / f".records.jsonl.tmp{os.getppid()}"  # a live writer's temp is kept
    for p in [*stale, alive]:
        p.write_text("x")
    engine.run("unit", items, lambda it: {"a": 1}, out, progress=False)
    assert not any(p.exists() for p in stale) and alive.exists()


WATCHDOG_SCRIPT = """
import os, sys, time
from ris_utils import engine

def work(out, rank, world_size):
    open(os.path.join(out, f"worker{rank}.pid"), "w").write(str(os.getpid()))
    time.sleep(300)

if __name__ == "__main__":
    open(os.path.join(sys.argv[1], "parent.pid"), "w").write(str(os.getpid()))
    engine.run_shard_workers(work, (sys.argv[1],), 2, "test")
"""


def test_workers_die_with_their_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(WATCHDOG_SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all((tmp_path / f"worker{r}.pid").is_file() for r in range(2)):
            time.sleep(0.2)
        pids = [int((tmp_path / f"worker{r}.pid").read_text()) for r in range(2)]
        os.kill(proc.pid, signal.SIGKILL)  # only the parent
        proc.wait(10)
        deadline = time.time() + 15
        while time.time() < deadline and any(fileio.pid_alive(p) and not _zombie(p) for p in pids):
            time.sleep(0.2)
        assert not any(fileio.pid_alive(p) and not _zombie(p) for p in pids), "workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def _zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------ 9. file modes


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = fileio.atomic_write(tmp_path / "a.json", "{}")
        assert p.stat().st_mode & 0o777 == 0o644
        os.umask(0o002)
        assert fileio.atomic_write(tmp_path / "b.json", "{}").stat().st_mode & 0o777 == 0o664
        with fileio.StagedDir(tmp_path / "exp") as st:
            (st.path / "x").write_text("1")
        assert (tmp_path / "exp").stat().st_mode & 0o777 == 0o775
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ 6. swaps


def test_staged_dir_swaps_in_whole_and_refuses_foreign_folders(tmp_path):
    final = tmp_path / "export"
    with fileio.StagedDir(final, marker="card.json") as st:
        (st.path / "card.json").write_text("old")
        (st.path / "data").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.StagedDir(final, marker="card.json") as st:
            (st.path / "card.json").write_text("new")
            raise RuntimeError("killed half-way")
    assert (final / "card.json").read_text() == "old" and (final / "data").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with fileio.StagedDir(final, marker="card.json") as st:
        (st.path / "card.json").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["card.json"] and (final / "card.json").read_text() == "new"
    foreign = tmp_path / "home"
    (foreign / "thesis.tex").parent.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="no card.json"):
        fileio.StagedDir(foreign, marker="card.json")
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_staged_dir_through_a_symlinked_folder_keeps_the_link(tmp_path):
    (tmp_path / "disk" / "export").mkdir(parents=True)
    (tmp_path / "disk" / "export" / "card.json").write_text("old")
    os.symlink(tmp_path / "disk" / "export", tmp_path / "export")
    with fileio.StagedDir(tmp_path / "export", marker="card.json") as st:
        (st.path / "card.json").write_text("new")
    assert (tmp_path / "export").is_symlink() and (tmp_path / "export" / "card.json").read_text() == "new"


def test_staged_dir_recovers_a_swap_killed_half_way(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "export"
    old = tmp_path / f".export.old{dead.pid}"  # the non-atomic fallback was killed between its two renames
    old.mkdir()
    (old / "card.json").write_text("old")
    staging = tmp_path / f".export.staging{dead.pid}.0"
    staging.mkdir()
    (staging / "card.json").write_text("half")
    st = fileio.StagedDir(final, marker="card.json")
    assert (final / "card.json").read_text() == "old" and not old.exists() and not staging.exists()
    st.abort()


# ------------------------------------------------------------------------------------------------ 1. odd files


def _odd_folder(root: Path) -> Path:
    imgs = root / "imgs"
    _png(imgs / "good.png")
    _png(Path(os.fsdecode(bytes(imgs) + b"/b_\xff.png")))  # a name that is not valid UTF-8
    os.symlink(imgs / "gone.png", imgs / "dangling.png")
    os.symlink(imgs / "loop_b.png", imgs / "loop_a.png")
    os.symlink(imgs / "loop_a.png", imgs / "loop_b.png")
    _png(imgs / "locked.png")
    os.chmod(imgs / "locked.png", 0)
    _png(imgs / "huge.png", w=120, h=100)
    _png(imgs / "oom.png", w=56, h=40)
    return imgs


@pytest.fixture
def odd_files(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    imgs = _odd_folder(tmp_path)
    if os.geteuid() == 0:  # root reads mode-000 files: make the read fail as it would for a user
        real_open = PILImage.open

        def open_(fp, *a, **k):
            if str(fp).endswith("locked.png"):
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *a, **k)

        monkeypatch.setattr(PILImage, "open", open_)
    yield imgs
    os.chmod(imgs / "locked.png", 0o644)


def test_odd_files_become_error_records_naming_file_and_reason(odd_files, tmp_path, monkeypatch):
    from ris_utils import masks

    real = masks.propose_masks

    def propose(image, *a, **k):
        if image.shape[1] == 56:
            raise MemoryError()
        return real(image, *a, **k)

    monkeypatch.setattr(masks.step, "propose_masks", propose)  # the step module calls it
    items = masks.image_items_from(odd_files)
    cfg = {"backend": "components", "selector": {"kind": "none"}, "seed": 0, "max_pixels": 10_000}
    s = masks.run_masks(cfg, items, tmp_path / "out", progress=False)
    recs = {r["file_name"]: r for r in engine.read_records(tmp_path / "out")}
    expect = {"b_\\xff.png": "not valid UTF-8", "dangling.png": "dangling symlink", "loop_a.png": "symlink loop",
              "loop_b.png": "symlink loop", "locked.png": "permission denied", "huge.png": "max_pixels",
              "oom.png": "MemoryError"}
    assert set(recs) == {"good.png", *expect}
    assert recs["good.png"]["status"] == "ok" and s["ok"] == 1 and s["failed"] == len(expect)
    for name, reason in expect.items():
        assert recs[name]["status"] == "error" and reason in recs[name]["error"], (name, recs[name]["error"])
        assert name in recs[name]["error"]
    assert "12,000" in recs["huge.png"]["error"] and "corrupt" not in recs["locked.png"]["error"]
    (tmp_path / "out" / engine.RECORDS).read_bytes().decode("utf-8")  # valid UTF-8 throughout
    # a record holding such a path (e.g. a step's body) is written as valid UTF-8 and reads back to the same bytes
    odd = os.fsdecode(b"/x/b_\xff.png")
    line = engine.dumps_record({"image_id": 1, "path": odd})
    assert "\\udcff" in line and line.encode("utf-8")
    assert os.fsencode(json.loads(line)["path"]) == b"/x/b_\xff.png"


def test_json_item_without_path_is_an_error_record(tmp_path):
    from ris_utils import masks

    _png(tmp_path / "a.png")
    (tmp_path / "list.json").write_text(json.dumps([{"image_id": "a", "path": "a.png"}, {"image_id": "b"}]))
    items = masks.image_items_from(tmp_path / "list.json")
    s = masks.run_masks({"backend": "components", "selector": {"kind": "none"}}, items, tmp_path / "o", progress=False)
    recs = {r["image_id"]: r for r in engine.read_records(tmp_path / "o")}
    assert recs["a"]["status"] == "ok" and s["failed"] == 1
    assert "list.json[1]" in recs["b"]["error"] and "no 'path'" in recs["b"]["error"]


def test_masks_cli_completes_on_odd_files_and_strict_fails(tmp_path):
    imgs = _odd_folder(tmp_path)
    try:
        res = _cli("masks", "--images", imgs, "--out", tmp_path / "o", "--no-progress", "--param", "max_pixels=10000")
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((tmp_path / "o" / engine.SUMMARY).read_text())
        assert summary["ok"] >= 2 and summary["failed"] >= 5  # root may read locked.png; oom.png is fine here
        res = _cli("masks", "--images", imgs, "--out", tmp_path / "o", "--no-progress", "--param", "max_pixels=10000",
                   "--strict")
        assert res.returncode == 1 and "dangling symlink" in res.stderr and "b_\\xff.png" in res.stderr
    finally:
        os.chmod(imgs / "locked.png", 0o644)


# ------------------------------------------------------------------------------------------------ 2. checkpoints


class _Payload:
    """Unpickling this writes a file: what a crafted checkpoint would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


@pytest.fixture(scope="module")
def ris_run(tmp_path_factory):
    from ris_utils.ris.toy import make_toy_refer, toy_tokenizer_spec
    from ris_utils.ris.train import train

    root = tmp_path_factory.mktemp("ris")
    toy = make_toy_refer(root / "toy", n_images=8, height=40, width=56)
    cfg = dict(tokenizer=toy_tokenizer_spec(8), word_len=8, input_size=32, epochs=1, batch_size=4, lr=2e-3,
               schedule={"name": "constant"}, threads=1, seed=0, device="cpu")
    train(cfg, toy, root / "run", progress=False)
    return toy, root / "run", cfg


def test_ris_checkpoint_is_plain_data_and_crafted_ones_never_run_code(ris_run, tmp_path):
    import torch

    from ris_utils.ris.evaluate import load_checkpoint
    from ris_utils.ris.train import CheckpointLoadError, train

    toy, run, cfg = ris_run
    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=True)  # plain data only
    assert ck["epoch"] == 1 and isinstance(ck["rng"]["numpy"], dict)
    load_checkpoint(run / "last.pt")
    marker = tmp_path / "pwned.txt"
    evil = dict(ck, history=[_Payload(marker)])
    bad = tmp_path / "evil" / "last.pt"
    bad.parent.mkdir()
    torch.save(evil, bad)
    with pytest.raises(CheckpointLoadError, match="safe load refuses"):
        load_checkpoint(bad)  # evaluate --checkpoint
    with pytest.raises(CheckpointLoadError, match="safe load refuses"):
        train(cfg, toy, bad.parent, progress=False)  # the resume path of train --out (and notebook 04's grid)
    assert not marker.exists()
    res = _cli("evaluate", "--checkpoint", bad, "--data", toy, "--split", "val")
    _one_line_error(res, str(bad), "not loaded")
    assert not marker.exists()


def test_ris_checkpoint_resume_after_plain_data_rng_is_identical(ris_run, tmp_path):
    """Resuming from the plain-data RNG state continues exactly like an uninterrupted run."""
    import torch

    from ris_utils.ris.train import train

    toy, _, cfg = ris_run
    full = train({**cfg, "epochs": 2}, toy, tmp_path / "full", progress=False)
    train({**cfg, "epochs": 2}, toy, tmp_path / "crash", progress=False, stop_after_epoch=1)
    stale = tmp_path / "crash" / f".last.pt.tmp{_dead_pid()}"
    stale.write_bytes(b"torn")
    (tmp_path / "crash" / ".log.csv.tmp").write_text("torn")  # the PID-less name of older versions
    resumed = train({**cfg, "epochs": 2}, toy, tmp_path / "crash", progress=False)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "crash" / "last.pt", weights_only=True)
    assert a["steps_log"] == b["steps_log"] and full["history"][-1]["train_loss"] == resumed["history"][-1]["train_loss"]
    assert not stale.exists() and not (tmp_path / "crash" / ".log.csv.tmp").exists()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_broken_ris_checkpoints_are_one_line_errors(ris_run, tmp_path):
    import torch

    toy, run, _ = ris_run
    data = (run / "last.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    ck = torch.load(run / "last.pt", weights_only=True)
    torch.save(ck["model"], tmp_path / "bare.pt")
    other = dict(ck, model={k: v for k, v in list(ck["model"].items())[:-3]})
    other["model"][next(iter(other["model"]))] = torch.zeros(3, 3)
    torch.save(other, tmp_path / "other.pt")
    for name, needle in (("trunc.pt", "truncated or damaged"), ("bare.pt", "bare state dict"),
                         ("other.pt", "another architecture")):
        res = _cli("evaluate", "--checkpoint", tmp_path / name, "--data", toy, "--split", "val")
        _one_line_error(res, str(tmp_path / name), needle)


# ------------------------------------------------------------------------------------------------ 8. one-line errors


def test_setting_errors_name_the_setting_before_work(tmp_path):
    t0 = time.time()
    res = _cli("train", "--train", tmp_path / "nothing", "--out", tmp_path / "r", "--param", "epochs=abc")
    _one_line_error(res, "ris.epochs", "'abc'")
    res = _cli("masks", "--images", tmp_path, "--out", tmp_path / "m", "--param", "components.n_colors=many")
    _one_line_error(res, "masks.components.n_colors", "'many'")
    assert time.time() - t0 < 60 and not (tmp_path / "r").exists()


def test_profile_errors_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("shared:\n  a: 1\n b: [\n")
    res = _cli("masks", "--images", tmp_path, "--out", tmp_path / "m", "--profile", tmp_path / "bad.yaml")
    _one_line_error(res, "bad.yaml", "not valid YAML", "line")
    (tmp_path / "x.yaml").write_text("extends: y\nshared: {}\n")
    (tmp_path / "y.yaml").write_text("extends: x\nshared: {}\n")
    res = _cli("filter", "--candidates", tmp_path, "--out", tmp_path / "f", "--profile", tmp_path / "x.yaml")
    if res.returncode == 2 and "records.jsonl" in res.stderr:  # argparse checks --candidates first
        (tmp_path / "records.jsonl").write_text("")
        res = _cli("filter", "--candidates", tmp_path, "--out", tmp_path / "f", "--profile", tmp_path / "x.yaml")
    _one_line_error(res, "'extends' loops")


def test_broken_records_given_to_filter_and_export_are_one_line(tmp_path):
    cand = tmp_path / "cand"
    cand.mkdir()
    (cand / "records.jsonl").write_text('{"image_id": 1, "status": "ok", "masks": []}\n{"image_id": 2, "sta\n')
    res = _cli("filter", "--candidates", cand, "--out", tmp_path / "f")
    _one_line_error(res, str(cand / "records.jsonl"), "line 2", "rerun")
    res = _cli("export", "--candidates", cand, "--out", tmp_path / "e")
    _one_line_error(res, str(cand / "records.jsonl"), "line 2")


# ------------------------------------------------------------------------------------------------ 4. typo'd paths


def test_a_typod_checkpoint_path_fails_before_any_work_naming_setting_and_path(tmp_path, monkeypatch):
    from ris_utils import filtering, pipeline
    from ris_utils.captioning import train as train_captioner
    from ris_utils.profiles import step_config

    trained = []
    monkeypatch.setattr("ris_utils.train_clip.train_clip", lambda *a, **k: trained.append(a))
    monkeypatch.setattr(train_captioner, "train", lambda *a, **k: trained.append(a))
    typo = tmp_path / "typo_clip.pt"
    cfg = step_config("shapes", "filter", clip={"checkpoint": str(typo)})
    with pytest.raises(FileNotFoundError, match=r"filter\.clip\.checkpoint .*typo_clip\.pt does not exist"):
        filtering.build_clip(cfg)
    with pytest.raises(FileNotFoundError, match="typo_clip.pt"):
        pipeline.filter_jobs(cfg, step_config("shapes", "captions"), [{"mode": "naive", "split": "train"}], 2)
    ccfg = step_config("shapes", "captions", pretrained=str(tmp_path / "typo_coca.pt"))
    with pytest.raises(FileNotFoundError, match=r"captions\.pretrained .*typo_coca\.pt does not exist"):
        train_captioner.load_captioner(ccfg)
    from ris_utils.captioning.step import run_caption_jobs

    with pytest.raises(FileNotFoundError, match="typo_coca.pt"):
        run_caption_jobs(ccfg, [{"split": "train", "mode": "naive", "out_dir": str(tmp_path / "c")}], workers=2)
    assert trained == [] and not typo.exists()
    # the profile's own default asset, when missing, is still trained on first use (announced)
    default = step_config("shapes", "filter")
    from ris_utils.profiles import is_profile_default

    assert is_profile_default(default, "filter", "clip.checkpoint", default["clip"]["checkpoint"])
    assert not is_profile_default(cfg, "filter", "clip.checkpoint", str(typo))


def test_typod_checkpoint_cli_is_one_line_exit_2(tmp_path):
    cand = tmp_path / "cand"
    cand.mkdir()
    (cand / "records.jsonl").write_text('{"image_id": 1, "status": "ok", "masks": []}\n')
    t0 = time.time()
    res = _cli("filter", "--candidates", cand, "--out", tmp_path / "f", "--param", f"clip.checkpoint={tmp_path}/typo.pt")
    _one_line_error(res, "filter.clip.checkpoint", f"{tmp_path}/typo.pt")
    assert time.time() - t0 < 60 and not (tmp_path / "typo.pt").exists() and not (tmp_path / "f").exists()


# ------------------------------------------------------------------------------------------------ 6. export swap


def _filter_dir(tmp_path, text):
    from ris_utils.data import refer

    _png(tmp_path / "images" / "im0.png")
    m = np.zeros((40, 48), np.uint8)
    m[5:20, 6:30] = 1
    cand = {"text": text, "view": 0, "setting": "beam", "mode": "distinctive", "noun": "circle",
            "noun_scores": [20.0], "caption_scores": [25.0], "doc": 2.5, "keep": True}
    rec = {"image_id": 1, "file_name": "im0.png", "status": "ok", "error": None, "height": 40, "width": 48,
           "n_masks": 1, "masks": [{"mask_index": 0, "segmentation": refer.encode_mask(m), "bbox": [6, 5, 24, 15],
                                    "candidates": [cand], "survivors": [0], "fallback": None, "dropped": None}]}
    d = tmp_path / f"filter_{text.replace(' ', '_')}"
    d.mkdir(exist_ok=True)
    (d / "records.jsonl").write_text(json.dumps(rec) + "\n")
    return d


def test_reexport_swaps_in_whole(tmp_path, monkeypatch):
    from ris_utils import export
    from ris_utils.data import refer

    out = tmp_path / "export"
    export.export_dataset(_filter_dir(tmp_path, "old circle"), out, images_dir=tmp_path / "images", images="copy")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = export.card_markdown

    def dies(card):  # the re-export dies after refs, instances and candidates are written
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "card_markdown", dies)
    with pytest.raises(KeyboardInterrupt):
        export.export_dataset(_filter_dir(tmp_path, "new circle"), out, images_dir=tmp_path / "images", images="copy")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(export, "card_markdown", real)
    card = export.export_dataset(_filter_dir(tmp_path, "new circle"), out, images_dir=tmp_path / "images",
                                 images="copy")
    assert card["name"] == "export"
    data = refer.load_refer(out, "refcoco+", "pseudo")
    assert [s["sent"] for r in data.refs for s in r["sentences"]] == ["new circle"]
    assert "new circle" in (out / "candidates.jsonl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []  # leftovers removed
    # an unrelated folder is never replaced by an export
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a previous output"):
        export.export_dataset(_filter_dir(tmp_path, "x y"), tmp_path / "notes", images="none")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep"


KILL_EXPORT = """
import sys, time
from ris_utils import export
real = export.refer.write_refer
def slow(*a, **k):
    real(*a, **k)
    open(sys.argv[3], "w").write("written")
    time.sleep(60)
export.refer.write_refer = slow
export.export_dataset(sys.argv[1], sys.argv[2], images="none")
"""


def test_reexport_killed_with_sigkill_leaves_the_old_export(tmp_path):
    from ris_utils import export

    out = tmp_path / "export"
    export.export_dataset(_filter_dir(tmp_path, "old circle"), out, images="none")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    script = tmp_path / "k.py"
    script.write_text(KILL_EXPORT)
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, str(script), str(_filter_dir(tmp_path, "new circle")), str(out), str(flag)],
                            env=_env())
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert flag.exists()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    export.export_dataset(_filter_dir(tmp_path, "newer circle"), out, images="none")  # the next one cleans up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]
    assert "newer circle" in (out / "candidates.jsonl").read_text()


def test_crafted_refs_pickle_never_runs_code(tmp_path):
    import pickle

    from ris_utils.data import refer

    marker = tmp_path / "pwned.txt"
    (tmp_path / "refcoco+").mkdir()
    (tmp_path / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([_Payload(marker)]))
    (tmp_path / "refcoco+" / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match="refused global"):
        refer.load_refer(tmp_path, "refcoco+", "unc")
    assert not marker.exists()


def test_runner_profile_error_is_one_line(tmp_path):
    (tmp_path / "x.yaml").write_text("extends: y\nshared: {}\n")
    (tmp_path / "y.yaml").write_text("extends: x\nshared: {}\n")
    res = subprocess.run([sys.executable, "-m", "ris_utils.runs", "--profile", str(tmp_path / "x.yaml")], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    _one_line_error(res, "'extends' loops")


def test_training_into_a_busy_folder_is_refused(ris_run, tmp_path):
    from ris_utils.ris.train import train

    toy, _, cfg = ris_run
    with fileio.folder_lock(tmp_path / "run", what="another training"):
        with pytest.raises(fileio.FolderBusyError, match="another training"):
            train(cfg, toy, tmp_path / "run", progress=False)
    assert train(cfg, toy, tmp_path / "run", progress=False)["epochs"] == 1
    # a run that died in this process (its lock still referenced by a traceback) does not block the next one
    with pytest.raises(KeyboardInterrupt) as died:
        _die_in_training(train, cfg, toy, tmp_path / "run2")
    assert died.tb is not None
    assert train(cfg, toy, tmp_path / "run2", progress=False)["epochs"] == 1


def _die_in_training(train, cfg, toy, out):
    import ris_utils.ris.train as t

    real = t._write_logs

    def dies(*a, **k):
        raise KeyboardInterrupt

    t._write_logs = dies
    try:
        train(cfg, toy, out, progress=False)
    finally:
        t._write_logs = real


def test_cli_into_a_busy_folder_is_one_line_exit_2(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    with fileio.folder_lock(tmp_path / "o", what="engine step 'masks'"):
        res = _cli("masks", "--images", tmp_path / "imgs", "--out", tmp_path / "o", "--no-progress")
    _one_line_error(res, str(tmp_path / "o"), "in use by another run", f"pid {os.getpid()}")
    assert not (tmp_path / "o" / engine.RECORDS).exists()


def test_checkpoints_of_earlier_versions_still_load_safely(ris_run, tmp_path):
    """Written before the RNG state was plain data (numpy ndarray / scalars inside): loaded with weights_only."""
    import torch

    from ris_utils.ris.evaluate import load_checkpoint

    _, run, _ = ris_run
    ck = torch.load(run / "last.pt", weights_only=True)
    ck["rng"]["numpy"] = np.random.get_state()
    ck["history"][0]["train_loss"] = np.float64(ck["history"][0]["train_loss"])
    torch.save(ck, tmp_path / "old.pt")
    model, tok, cfg = load_checkpoint(tmp_path / "old.pt")
    assert cfg["input_size"] == 32
