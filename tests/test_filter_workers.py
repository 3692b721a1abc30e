"""filter.workers: W processes, each a shard of every mode x split x seed job, give the same records as one."""

import logging
from pathlib import Path

import pytest

from ris_utils import engine, profiles
from ris_utils.data import shapes
from ris_utils.layout import step_dirs
from ris_utils.pipeline import build_trainsets, filter_jobs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_world(root, n_images={"train": 3, "val": 3, "testA": 1, "testB": 1}, seed=7)
    return root


def _cfgs(world, work, workers):
    # the shapes profile: its committed captioner and CLIP, GT masks, fewer decoding settings
    logging.getLogger().setLevel(logging.ERROR)
    common = {"data_root": str(world), "work_dir": str(work)}
    ccfg = profiles.step_config("shapes", "captions", source="gt", beam={"num_beams": 2, "num_beam_groups": 1},
                                top_k=[5], top_p=[0.5], max_images=3, threads=1, workers=workers, **common)
    fcfg = profiles.step_config("shapes", "filter", threads=1, workers=workers, **common)
    return fcfg, ccfg


JOBS = [{"mode": "naive", "split": "val"}, {"mode": "distinctive", "split": "val"},
        {"mode": "distinctive", "split": "val", "seed": 1}]


def _logs(out, step):
    return {p.name: p.read_bytes() for p in sorted((out / engine.PARTS).glob(f"{step}.rank*.log"))}


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("filterw")
    out = {}
    for w in (1, 2):
        fcfg, ccfg = _cfgs(world, tmp / f"w{w}", w)
        # no captions yet: they are written first (with 2 workers: sharded, before the filter workers start)
        assert not (tmp / f"w{w}" / "captions").exists()
        out[w] = (fcfg, ccfg, filter_jobs(fcfg, ccfg, JOBS, workers=w, progress=False))
    return out


def test_two_workers_write_the_same_records(runs):
    (f1, _, d1), (f2, _, d2) = runs[1], runs[2]
    assert d2 == [step_dirs(f2["work_dir"], j["mode"], "val", j.get("seed", 0))[1] for j in JOBS]
    assert d2[2].name == "val_seed1"
    for a, b, job in zip(d1, d2, JOBS):
        ra, rb = (a / engine.RECORDS).read_bytes(), (b / engine.RECORDS).read_bytes()
        assert ra == rb
        recs = list(engine.read_records(b))
        assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
        assert all("survivors" in m and "doc" in c for r in recs for m in r["masks"] for c in m["candidates"])
        assert {c["mode"] for r in recs for m in r["masks"] for c in m["candidates"]} == {job["mode"]}
        # two filter shards really ran: rank 0 took images 0 and 2, rank 1 image 1
        logs = _logs(b, "filter")
        assert sorted(logs) == ["filter.rank0of2.log", "filter.rank1of2.log"]
        assert [len(v.splitlines()) for v in logs.values()] == [2, 1]
        assert list(_logs(a, "filter")) == ["filter.rank0of1.log"]
        # the captions were written first, by the sharded captions step (2 shards, merged), same records
        ca, cb = (step_dirs(f["work_dir"], job["mode"], "val", job.get("seed", 0))[0] for f in (f1, f2))
        assert sorted(_logs(cb, "captions")) == ["captions.rank0of2.log", "captions.rank1of2.log"]
        assert (ca / engine.RECORDS).read_bytes() == (cb / engine.RECORDS).read_bytes()
    # caption seed 1 differs from seed 0 (the job's seed reached the captions step)
    assert (d2[1] / engine.RECORDS).read_bytes() != (d2[2] / engine.RECORDS).read_bytes()


def test_rerun_resumes(runs):
    fcfg, ccfg, dirs = runs[2]
    before = {d: (_logs(d, "filter"), (d / engine.RECORDS).read_bytes()) for d in dirs}
    # everything done: nothing is scored again, with 2 workers or 1
    assert filter_jobs(fcfg, ccfg, JOBS, workers=2, progress=False) == dirs
    assert filter_jobs(fcfg, ccfg, JOBS, workers=1, progress=False) == dirs
    for d in dirs:
        assert {k: v for k, v in _logs(d, "filter").items() if v} == before[d][0]
        assert (d / engine.RECORDS).read_bytes() == before[d][1]
    # rank 1's shard of the naive job lost: only its image is scored again, same records
    naive = dirs[0]
    (naive / engine.PARTS / "filter.rank1of2.log").unlink()
    (naive / engine.RECORDS).unlink()
    filter_jobs(fcfg, ccfg, JOBS, workers=2, progress=False)
    logs = _logs(naive, "filter")
    assert logs["filter.rank0of2.log"] == before[naive][0]["filter.rank0of2.log"]
    assert len(logs["filter.rank1of2.log"].splitlines()) == 1
    assert (naive / engine.RECORDS).read_bytes() == before[naive][1]


def test_worker_errors_surface(runs, tmp_path):
    fcfg, ccfg, _ = runs[2]
    bad = {**fcfg, "clip": {**fcfg["clip"], "checkpoint": str(tmp_path / "none.pt"), "train_if_missing": False}}
    with pytest.raises(FileNotFoundError, match="checkpoint") as e:
        filter_jobs(bad, ccfg, JOBS[:1], workers=2, progress=False)
    assert any("filter worker" in n for n in getattr(e.value, "__notes__", []))
    with pytest.raises(ValueError, match="same filter folder"):
        filter_jobs(fcfg, ccfg, [JOBS[0], {**JOBS[0], "seed": 0}], workers=2)
    with pytest.raises(ValueError, match="unknown keys"):
        filter_jobs(fcfg, ccfg, [{**JOBS[0], "out_dir": "x"}], workers=2)
    with pytest.raises(ValueError, match="filter.workers"):
        filter_jobs(fcfg, ccfg, JOBS, workers=-1)


def test_build_trainsets_same_with_two_workers(world, tmp_path):
    """The notebook's train-split export: one filter_jobs call for every filtered mode, W=2 as W=1."""
    sets = {"naive": {"mode": "naive", "filtered": False}, "naive_f": {"mode": "naive", "filtered": True},
            "pseudo_ris": {"mode": "distinctive", "filtered": True}}
    cards = {}
    for w in (1, 2):
        fcfg, ccfg = _cfgs(world, tmp_path / f"w{w}", w)
        ecfg = profiles.step_config("shapes", "export", work_dir=str(tmp_path / f"w{w}"), trainsets=sets,
                                    image_mode="none")
        cards[w] = build_trainsets(fcfg, ecfg, split="train", captions_cfg=ccfg, progress=False)
    for mode in ("naive", "distinctive"):
        d1, d2 = (step_dirs(tmp_path / f"w{w}", mode, "train", 0)[1] for w in (1, 2))
        assert (d1 / engine.RECORDS).read_bytes() == (d2 / engine.RECORDS).read_bytes()
        assert sorted(_logs(d2, "filter")) == ["filter.rank0of2.log", "filter.rank1of2.log"]
    for name in sets:
        strip = {k: v for k, v in cards[1][name].items() if k != "source"}
        assert strip == {k: v for k, v in cards[2][name].items() if k != "source"}
        assert cards[2][name]["counts"]["images"] == 3
        for f in ("candidates.jsonl", "refcoco+/refs(pseudo).p"):
            a, b = (tmp_path / f"w{w}" / "export" / name / f for w in (1, 2))
            assert a.read_bytes() == b.read_bytes()
    assert Path(cards[2]["pseudo_ris"]["source"]) == step_dirs(tmp_path / "w2", "distinctive", "train", 0)[1]
