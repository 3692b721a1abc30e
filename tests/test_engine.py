"""The generation engine: resume after kill -9, bad input, torchrun sharding + merge, determinism."""

from __future__ import annotations

import json
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

from ris_utils import engine
from ris_utils.images import BadImageError, load_image_rgb

ROOT = Path(__file__).resolve().parents[1]


def _body(item):
    """A deterministic record body that depends on the per-image seed."""
    rng = np.random.default_rng(item["seed"])
    return {"values": [round(float(v), 6) for v in rng.random(3)], "path_len": len(item["path"])}


def _items(n):
    return [{"image_id": i, "path": f"img_{i:03d}.png"} for i in range(n)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_run_order_summary_resume_and_seeds(tmp_path):
    items = _items(7)
    calls = []

    def fn(item):
        calls.append(item["image_id"])
        if item["image_id"] == 3:
            raise ValueError("broken on purpose")
        return _body(item)

    s = engine.run("unit", items, fn, tmp_path / "a", seed=5, progress=False)
    assert (s["ok"], s["failed"], s["failed_reasons"]) == (6, 1, {"ValueError": 1})
    assert s["errors"][0]["image_id"] == 3 and "broken on purpose" in s["errors"][0]["error"]
    recs = list(engine.read_records(tmp_path / "a"))
    assert [r["image_id"] for r in recs] == list(range(7))  # item order
    assert recs[3]["status"] == "error" and recs[0]["status"] == "ok" and recs[0]["error"] is None
    assert recs[0]["file_name"] == "img_000.png"
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["ok"] == 6
    # per-image seeds depend on (seed, image_id) only
    assert recs[1]["values"] == _body({"seed": engine.item_seed(5, 1), "path": "x"})["values"]
    assert engine.item_seed(5, 1) != engine.item_seed(6, 1) and engine.item_seed(5, 1) != engine.item_seed(5, 2)
    # a rerun processes nothing and rewrites the same file
    before = (tmp_path / "a" / "records.jsonl").read_bytes()
    calls.clear()
    engine.run("unit", items, fn, tmp_path / "a", seed=5, progress=False)
    assert calls == [] and (tmp_path / "a" / "records.jsonl").read_bytes() == before
    # other settings / items / seed in the same folder are refused, not mixed
    with pytest.raises(engine.ResumeMismatchError, match="config"):
        engine.run("unit", items, fn, tmp_path / "a", seed=5, config={"k": 1}, progress=False)
    with pytest.raises(engine.ResumeMismatchError, match="items"):
        engine.run("unit", items[:3], fn, tmp_path / "a", seed=5, progress=False)
    with pytest.raises(ValueError, match="duplicate image_id"):
        engine.run("unit", items + items[:1], fn, tmp_path / "b", progress=False)


def test_torn_tail_and_fatal_error_then_resume_identical(tmp_path):
    items = _items(12)
    engine.run("unit", items, _body, tmp_path / "ref", progress=False)

    def dies_at_6(item):
        if item["image_id"] == 6:
            raise engine.FatalError("model broke")
        return _body(item)

    with pytest.raises(engine.FatalError):
        engine.run("unit", items, dies_at_6, tmp_path / "x", progress=False)
    log = tmp_path / "x" / "parts" / "unit.rank0of1.log"
    assert len(log.read_text().splitlines()) == 6 and not (tmp_path / "x" / "records.jsonl").exists()
    # a crash in the middle of a write: a torn line without newline, and a line with a bad checksum
    with open(log, "a") as f:
        f.write('0123456789abcdef {"image_id": 6, "status": "ok", "err')
    calls = []
    s = engine.run("unit", items, lambda it: calls.append(it["image_id"]) or _body(it), tmp_path / "x",
                   progress=False)
    assert calls == list(range(6, 12)) and s["ok"] == 12
    assert (tmp_path / "x" / "records.jsonl").read_bytes() == (tmp_path / "ref" / "records.jsonl").read_bytes()


KILL_SCRIPT = """
import sys, time
import numpy as np
from ris_utils import engine

def body(item):
    time.sleep(0.03)
    rng = np.random.default_rng(item["seed"])
    return {"values": [round(float(v), 6) for v in rng.random(3)], "path_len": len(item["path"])}

items = [{"image_id": i, "path": f"img_{i:03d}.png"} for i in range(int(sys.argv[2]))]
engine.run("unit", items, body, sys.argv[1], seed=3, progress=False)
"""


def test_sigkill_mid_run_then_rerun_is_identical(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(KILL_SCRIPT)
    n, out = 60, tmp_path / "killed"
    log = out / "parts" / "unit.rank0of1.log"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)], env=_env())
    deadline = time.time() + 60
    while time.time() < deadline:
        if log.exists() and log.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = log.read_bytes().count(b"\n")
    assert 10 <= done < n, "the run must have been killed part-way"
    assert not (out / "records.jsonl").exists()
    subprocess.run([sys.executable, str(script), str(out), str(n)], env=_env(), check=True, timeout=120)
    subprocess.run([sys.executable, str(script), str(tmp_path / "clean"), str(n)], env=_env(), check=True,
                   timeout=120)
    killed = (out / "records.jsonl").read_bytes()
    assert killed == (tmp_path / "clean" / "records.jsonl").read_bytes()
    recs = [json.loads(x) for x in killed.splitlines()]
    assert [r["image_id"] for r in recs] == list(range(n)) and all(r["status"] == "ok" for r in recs)


def _write_bad_and_good(folder: Path) -> dict[str, bool]:
    """A folder with every kind of bad file and every convertible mode. Returns {file: is_good}."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray((rng.integers(0, 65535, (40, 48))).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    png = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    jpg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(rgb[:1, :1]).save(folder / "tiny.png")
    (folder / "empty.png").write_bytes(b"")
    return {"rgb.png": True, "gray.png": True, "palette.png": True, "rgba.png": True, "gray16.png": True,
            "photo.jpg": True, "truncated.png": False, "truncated.jpg": False, "text.jpg": False,
            "tiny.png": False, "empty.png": False, "missing.png": False}


def test_load_image_rgb_conversions_and_errors(tmp_path):
    kinds = _write_bad_and_good(tmp_path / "imgs")
    for name, good in kinds.items():
        if good:
            a = load_image_rgb(tmp_path / "imgs" / name)
            assert a.shape == (40, 48, 3) and a.dtype == np.uint8
        else:
            with pytest.raises(BadImageError, match=name.replace(".", r"\.")):
                load_image_rgb(tmp_path / "imgs" / name)
    gray = load_image_rgb(tmp_path / "imgs" / "gray.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == gray[..., 2]).all()
    g16 = np.asarray(Image.open(tmp_path / "imgs" / "gray16.png")).astype(np.int64)
    assert np.abs(load_image_rgb(tmp_path / "imgs" / "gray16.png")[..., 0] - g16 * 255 / 65535).max() <= 0.5 + 1e-9
    with pytest.raises(BadImageError, match="1x1"):
        load_image_rgb(tmp_path / "imgs" / "tiny.png")


def test_bad_files_become_error_records_and_good_ones_are_processed(tmp_path):
    from ris_utils import masks

    kinds = _write_bad_and_good(tmp_path / "imgs")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"imgs/{k}" for k in kinds) + "\n")
    items = masks.image_items_from(listing)
    cfg = {"backend": "components", "selector": {"kind": "none"}, "seed": 0}
    s = masks.run_masks(cfg, items, tmp_path / "out", progress=False)
    recs = {Path(r["image_id"]).name: r for r in engine.read_records(tmp_path / "out")}
    assert set(recs) == set(kinds)
    for name, good in kinds.items():
        assert recs[name]["status"] == ("ok" if good else "error"), (name, recs[name].get("error"))
        if good:
            assert (recs[name]["height"], recs[name]["width"]) == (40, 48)
            assert isinstance(recs[name]["proposals"], list)
        else:
            assert name in recs[name]["error"] and recs[name]["error"].startswith("BadImageError")
    assert "does not exist" in recs["missing.png"]["error"]
    assert "1x1" in recs["tiny.png"]["error"] and "truncated" in recs["truncated.png"]["error"]
    assert s["ok"] == sum(kinds.values()) and s["failed"] == len(kinds) - sum(kinds.values())
    assert s["failed_reasons"] == {"BadImageError": s["failed"]}


def test_explicit_ranks_without_process_group_then_merge(tmp_path):
    items = _items(9)
    engine.run("unit", items, _body, tmp_path / "one", progress=False)
    for r in (1, 0):
        s = engine.run("unit", items, _body, tmp_path / "two", rank=r, world_size=2, progress=False)
        assert s["merged"] is False and s["n_items"] == len(items[r::2])
    engine.run("unit", items, _body, tmp_path / "three", rank=0, world_size=2, progress=False)
    with pytest.raises(RuntimeError, match="not finished"):  # rank 1 never ran
        engine.merge(tmp_path / "three")
    assert engine.main(["merge", str(tmp_path / "three")]) == 2
    partial = engine.merge(tmp_path / "three", allow_partial=True)
    assert partial["missing"] == [1, 3, 5, 7] and partial["ok"] == 5
    assert engine.main(["merge", str(tmp_path / "two")]) == 0  # python -m ris_utils.engine merge OUT_DIR
    assert (tmp_path / "two" / "records.jsonl").read_bytes() == (tmp_path / "one" / "records.jsonl").read_bytes()
    # a later single-process rerun over the 2-rank logs has nothing to do
    calls = []
    engine.run("unit", items, lambda it: calls.append(1) or _body(it), tmp_path / "two", progress=False)
    assert calls == []


TORCHRUN_SCRIPT = """
import json, sys
import torch.distributed as dist
from ris_utils import masks
items = json.loads(open(sys.argv[1]).read())
cfg = {"backend": "components", "selector": {"kind": "none"}, "seed": 0}
summary = masks.run_masks(cfg, items, sys.argv[2], progress=False)
assert dist.is_initialized() and dist.get_world_size() == 2, "engine should have joined the torchrun group"
assert summary["merged"] and summary["ok"] == len(items), summary
"""


def test_torchrun_two_ranks_merge_equals_one_process(tmp_path):
    from ris_utils import masks

    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    items = []
    for i in range(7):
        img = np.full((48, 48, 3), 220, np.uint8)
        y, x = rng.integers(4, 30, 2)
        img[y:y + 12, x:x + 14] = rng.integers(0, 120, 3)
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i}.png")
        items.append({"image_id": i, "path": str(tmp_path / "imgs" / f"{i}.png")})
    (tmp_path / "items.json").write_text(json.dumps(items))
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "items.json"), str(tmp_path / "dist")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "dist" / "parts").iterdir()) == [
        "masks.rank0of2.log", "masks.rank1of2.log"]
    cfg = {"backend": "components", "selector": {"kind": "none"}, "seed": 0}
    masks.run_masks(cfg, items, tmp_path / "single", progress=False)
    single = (tmp_path / "single" / "records.jsonl").read_bytes()
    assert (tmp_path / "dist" / "records.jsonl").read_bytes() == single
    assert all(len(r["proposals"]) >= 1 for r in engine.read_records(tmp_path / "single"))
