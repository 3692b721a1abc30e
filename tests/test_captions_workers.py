"""captions.workers: W processes, each a shard of every job, give the same records as one process."""

import json
from pathlib import Path

import pytest

from ris_utils import engine, profiles
from ris_utils.captioning import step
from ris_utils.data import shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_world(root, n_images={"train": 1, "val": 3, "testA": 1, "testB": 1}, seed=5)
    return root


def _cfg(world, work, **kw):
    # the shapes profile (each worker loads its committed captioner), fewer decoding settings, GT masks
    kw = {"source": "gt", "beam": {"num_beams": 2, "num_beam_groups": 1}, "top_k": [5], "top_p": [0.5],
          "max_images": 3, "threads": 1, **kw}
    return profiles.step_config("shapes", "captions", data_root=str(world), work_dir=str(work), **kw)


def _jobs(work):
    return [{"split": "val", "mode": "naive"}, {"split": "val", "mode": "distinctive"},
            {"split": "val", "mode": "distinctive", "seed": 1, "out_dir": str(work / "val_seed1")}]


def _logs(out):
    return {p.name: p.read_bytes() for p in sorted((out / engine.PARTS).iterdir())}


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    out = {}
    for w in (1, 2):
        cfg = _cfg(world, tmp / f"w{w}")
        out[w] = (cfg, step.run_caption_jobs(cfg, _jobs(tmp / f"w{w}"), workers=w, progress=False))
    return out


def test_two_workers_write_the_same_records(runs):
    (_, s1), (cfg2, s2) = runs[1], runs[2]
    assert [s["workers"] for s in s1] == [1, 1, 1] and [s["workers"] for s in s2] == [2, 2, 2]
    for a, b in zip(s1, s2):
        assert a["ok"] == b["ok"] == 3 and a["failed"] == b["failed"] == 0
        assert b["merged"] and len(b["seconds_by_rank"]) == 2 and b["seconds"] == max(b["seconds_by_rank"])
        da, db = Path(a["out_dir"]), Path(b["out_dir"])
        assert (da / engine.RECORDS).read_bytes() == (db / engine.RECORDS).read_bytes()
        # two shards really ran: rank 0 took images 0 and 2, rank 1 image 1
        logs = _logs(db)
        assert sorted(logs) == ["captions.rank0of2.log", "captions.rank1of2.log"]
        assert [len(v.splitlines()) for v in logs.values()] == [2, 1]
    assert s2[0]["out_dir"] == str(step.output_dir(cfg2, "naive", "val"))
    assert s2[1]["out_dir"] == str(step.output_dir(cfg2, "distinctive", "val"))
    # the job's seed is the run's seed
    assert json.loads((Path(s2[2]["out_dir"]) / engine.MANIFEST).read_text())["seed"] == 1
    assert json.loads((Path(s2[1]["out_dir"]) / engine.MANIFEST).read_text())["seed"] == int(cfg2["seed"])
    recs = [list(engine.read_records(s["out_dir"])) for s in s2]
    assert {c["mode"] for r in recs[0] for m in r["masks"] for c in m["candidates"]} == {"naive"}
    assert {c["mode"] for r in recs[1] for m in r["masks"] for c in m["candidates"]} == {"distinctive"}


def test_rerun_resumes(runs):
    cfg, summaries = runs[2]
    dirs = [Path(s["out_dir"]) for s in summaries]
    before = {d: (_logs(d), (d / engine.RECORDS).read_bytes()) for d in dirs}
    # everything done: nothing is decoded again, with 2 workers or 1
    again = step.run_caption_jobs(cfg, _jobs(dirs[0].parents[2]), workers=2, progress=False)
    assert [s["ok"] for s in again] == [3, 3, 3]
    step.run_caption_jobs(cfg, _jobs(dirs[0].parents[2]), workers=1, progress=False)
    for d in dirs:
        assert {k: v for k, v in _logs(d).items() if v} == before[d][0]
        assert (d / engine.RECORDS).read_bytes() == before[d][1]
    # rank 1's shard of the naive job lost: only its image is decoded again, same records
    naive = dirs[0]
    (naive / engine.PARTS / "captions.rank1of2.log").unlink()
    (naive / engine.RECORDS).unlink()
    s = step.run_caption_jobs(cfg, _jobs(naive.parents[2]), workers=2, progress=False)
    assert s[0]["ok"] == 3
    logs = _logs(naive)
    assert logs["captions.rank0of2.log"] == before[naive][0]["captions.rank0of2.log"]
    assert len(logs["captions.rank1of2.log"].splitlines()) == 1
    assert (naive / engine.RECORDS).read_bytes() == before[naive][1]


def test_worker_errors_surface(world, tmp_path):
    cfg = _cfg(world, tmp_path / "w", source="masks")  # no masks step output: every worker fails
    with pytest.raises(FileNotFoundError, match="masks step") as e:
        step.run_caption_jobs(cfg, [{"split": "val", "mode": "naive"}], workers=2, progress=False)
    assert any("captions worker" in n for n in getattr(e.value, "__notes__", []))
    with pytest.raises(ValueError, match="mode"):
        step.run_caption_jobs(cfg, [{"split": "val", "mode": "greedy"}], workers=2)
    with pytest.raises(ValueError, match="another job"):
        step.run_caption_jobs(cfg, [{"split": "val", "mode": "naive"}, {"split": "val", "mode": "naive"}])
    with pytest.raises(ValueError, match="captions.workers"):
        step.run_caption_jobs(cfg, [{"split": "val", "mode": "naive"}], workers=-2)
