"""PhraseCut in the paper profile: notebook 00 converts it (data.paper.prepare), notebook 04's grid scores the
pseudo rows on it (eval_only / optional / own data_root eval sets), notebook 05's table gets its column."""

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_phrasecut import IMAGES, rect, task, write_phrasecut

from ris_utils.data import paper, phrasecut
from ris_utils.data.refer import load_refer
from ris_utils.ris import experiments, tables
from ris_utils.ris.toy import make_toy_refer, toy_tokenizer_spec

torch.set_num_threads(1)

#: the fake PhraseCut's test split: surfboards (a COCO category) and two unseen ones, sky and fence
TEST_TASKS = [task("11__1", 11, "white surfboards", "surfboards", [[rect(2, 3, 10, 8)]]),
              task("11__2", 11, "blue sky", "sky", [[rect(0, 0, 39, 2)]]),
              task("12__1", 12, "a wooden fence", "fence", [[rect(4, 4, 12, 20)]])]
N_UNSEEN_TEST = 2


def fake_phrasecut(root: Path) -> Path:
    write_phrasecut(root, TEST_TASKS[:1], IMAGES)  # refer_val.json: one task
    (root / "refer_test.json").write_text(json.dumps(TEST_TASKS))
    return root


PC_SET = {"style": "phrasecut-unseen", "dataset": "phrasecut", "split_by": "phrasecut_unseen", "splits": ["test"],
          "eval_only": True, "optional": True}
TOY_SET = {"style": "toy", "dataset": "toy", "split_by": "toy", "splits": ["val"]}


def _cfg(tmp_path, eval_sets, trainsets=("pseudo_ris", "gt")):
    """A tiny RIS grid: pseudo_ris = a 4-ref toy export (one training step at batch 4), human refs = toy."""
    work = tmp_path / "work"
    if not (work / "export" / "pseudo_ris").is_dir():
        make_toy_refer(work / "export" / "pseudo_ris", n_images=2, dataset="refcoco+", split_by="pseudo",
                       splits=("train",))
        make_toy_refer(tmp_path / "data", n_images=4, seed=1)  # dataset toy, split_by toy: train / val
    return {"work_dir": str(work), "data_root": str(tmp_path / "data"), "device": "cpu", "threads": 1, "seed": 0,
            "tokenizer": toy_tokenizer_spec(8), "word_len": 8, "input_size": 32, "epochs": 1, "batch_size": 4,
            "lr": 1e-3, "num_workers": 0, "cache": False,
            "experiments": {"trainsets": list(trainsets), "seeds": [0], "eval_sets": eval_sets}}


def _old_job_key(job, cfg):
    """job_key as it was before eval sets could carry data_root / eval_only / optional."""
    skip = {"experiments", "step", "work_dir", "profile", "data_root", "note"}
    d = asdict(job)
    d.pop("out")
    d["train_path"] = "/".join(Path(job.train_path).parts[-2:])
    return experiments._hash({"job": d, "cfg": {k: v for k, v in cfg.items() if k not in skip},
                              "seed": int(job.seed)})


def test_plan_eval_only_and_optional_sets(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PSEUDO_RIS_ROOT", str(tmp_path))  # relative data_root: against the project root
    base = _cfg(tmp_path, [TOY_SET])
    cfg = _cfg(tmp_path, [TOY_SET, {**PC_SET, "data_root": "pc_refer"}])
    plain = {j.name: j for j in experiments.plan(base)}
    assert sorted(plain) == ["gt/toy/seed0", "pseudo_ris/any/seed0"]
    for j in plain.values():  # eval sets without the new keys: the job key as before
        assert experiments.job_key(j, base) == _old_job_key(j, base)

    # absent: the optional set is left out with a warning, nothing else changes
    with caplog.at_level(logging.WARNING, logger="ris_utils.ris.experiments"):
        jobs = {j.name: j for j in experiments.plan(cfg)}
    assert "phrasecut-unseen" in caplog.text and "refs(phrasecut_unseen).p" in caplog.text
    assert sorted(jobs) == sorted(plain) and jobs["pseudo_ris/any/seed0"].evals == [TOY_SET]

    # present: only the pseudo row is evaluated on it (no gt job on an eval-only style), on its own data_root
    phrasecut.convert(fake_phrasecut(tmp_path / "VGPhraseCut_v0"), tmp_path / "pc_refer", ("test",), True)
    jobs = {j.name: j for j in experiments.plan(cfg)}
    assert sorted(jobs) == sorted(plain)
    assert jobs["pseudo_ris/any/seed0"].evals == [TOY_SET, {**PC_SET, "data_root": str(tmp_path / "pc_refer")}]
    assert jobs["gt/toy/seed0"].evals == [TOY_SET]
    assert experiments.plan(cfg, styles=["phrasecut-unseen"], trainsets=["gt"]) == []
    # an eval-only set does not change what a job trains: same key with or without it
    for name, j in jobs.items():
        assert experiments.job_key(j, cfg) == experiments.job_key(plain[name], base)
    # a data_root that is not eval-only enters the key by its tail, not the checkout's folder
    shared = _cfg(tmp_path, [{**TOY_SET, "data_root": str(tmp_path / "data")}], trainsets=["pseudo_ris"])
    j = experiments.plan(shared)[0]
    moved = experiments.Job(**{**asdict(j), "evals": [{**TOY_SET, "data_root": f"/elsewhere/{tmp_path.name}/data"}]})
    assert experiments.job_key(j, shared) != experiments.job_key(plain["pseudo_ris/any/seed0"], base)
    assert experiments.job_key(moved, shared) == experiments.job_key(j, shared)

    # not optional: a missing refs file is not silently skipped
    strict = _cfg(tmp_path, [TOY_SET, {**PC_SET, "optional": False, "data_root": str(tmp_path / "none")}])
    assert len(experiments.plan(strict)[0].evals) == 2


def test_run_job_scores_pseudo_rows_on_the_eval_sets_own_data_root(tmp_path):
    pc_out = tmp_path / "pc_refer"
    phrasecut.convert(fake_phrasecut(tmp_path / "VGPhraseCut_v0"), pc_out, ("test",), unseen_only=True)
    base = _cfg(tmp_path, [TOY_SET], trainsets=["pseudo_ris"])
    cfg = _cfg(tmp_path, [TOY_SET, {**PC_SET, "data_root": str(pc_out)}], trainsets=["pseudo_ris"])

    # trained and scored before the PhraseCut set existed ...
    (job0,) = experiments.plan(base)
    res = experiments.run_job(job0, base)
    assert not res["skipped"] and len(res["history"]) == 1
    out = Path(job0.out)
    ck = torch.load(out / "last.pt", weights_only=False)
    assert len(ck["steps_log"]) == 1  # one training step
    stamp = (out / "last.pt").stat().st_mtime_ns
    # ... then the eval-only set is added: scored on its own data_root, without retraining
    (job,) = experiments.plan(cfg)
    res = experiments.run_job(job, cfg)
    assert not res["skipped"] and (out / "last.pt").stat().st_mtime_ns == stamp
    pc = json.loads((out / "eval" / "phrasecut-unseen.test.json").read_text())
    assert Path(pc["data"]) == pc_out and pc["dataset"] == "phrasecut" and pc["split_by"] == "phrasecut_unseen"
    assert pc["n_refs"] == N_UNSEEN_TEST == len(load_refer(pc_out, "phrasecut", "phrasecut_unseen").refs)
    assert pc["trainset"] == "pseudo_ris" and pc["style"] == "phrasecut-unseen" and pc["train_style"] is None
    assert 0.0 <= pc["mIoU"] <= 100.0
    toy = json.loads((out / "eval" / "toy.val.json").read_text())
    assert Path(toy["data"]) == tmp_path / "data" and "eval_key" not in toy
    assert sorted(Path(p).name for p in res["evals"]) == ["phrasecut-unseen.test.json", "toy.val.json"]
    assert experiments.run_job(job, cfg)["skipped"]  # everything in place
    # a score of other eval settings (stale eval_key) is scored again; the training stays
    (out / "eval" / "phrasecut-unseen.test.json").write_text(json.dumps({**pc, "eval_key": "other", "mIoU": -1}))
    assert not experiments.run_job(job, cfg)["skipped"]
    assert json.loads((out / "eval" / "phrasecut-unseen.test.json").read_text()) == pc
    assert (out / "last.pt").stat().st_mtime_ns == stamp

    # notebook 05: the column of a style that only pseudo rows have
    rows = experiments.collect(experiments.runs_dir(cfg))
    rows.append({**rows[0], "trainset": "gt", "train_style": "toy", "style": "toy", "split": "val"})
    summary = tables.summary_frame(tables.results_frame(rows))
    wide = tables.wide_table(summary, [("toy", "val"), ("phrasecut-unseen", "test")])
    gt, pseudo = tables.ROW_LABELS["gt"], tables.ROW_LABELS["pseudo_ris"]
    assert wide.loc[gt, ("phrasecut-unseen", "test", "mIoU")] == "—"
    assert wide.loc[pseudo, ("phrasecut-unseen", "test", "mIoU")] == f"{pc['mIoU']:.1f} ± 0.0"
    assert tables.metric_keys(summary)["ris.pseudo_ris.phrasecut-unseen.test.mIoU"] == pytest.approx(pc["mIoU"])


def _prepare_cfg(root, out):
    make_toy_refer(root, n_images=2, dataset="refcoco", split_by="unc", splits=("train",))
    return {"data_root": str(root), "datasets": [{"name": "refcoco", "split_by": "unc"}], "need": ["refcoco"],
            "unseen_domain": {"name": "phrasecut", "root": "phrasecut", "out": str(out), "splits": ["test"],
                              "unseen_only": True}}


def test_prepare_warns_when_phrasecut_is_absent(tmp_path, caplog):
    cfg = _prepare_cfg(tmp_path / "data", tmp_path / "pc_refer")
    with caplog.at_level(logging.WARNING, logger="ris_utils.data.paper"):
        stats = paper.prepare(cfg)
    assert "download_dataset.py" in caplog.text and str(tmp_path / "data" / "phrasecut") in caplog.text
    assert stats["data.refcoco.train.refs"] == 4 and not any("phrasecut" in k for k in stats)
    assert not (tmp_path / "pc_refer").exists()


def test_prepare_converts_phrasecut_once(tmp_path, monkeypatch):
    out = tmp_path / "pc_refer"
    cfg = _prepare_cfg(tmp_path / "data", out)
    src = fake_phrasecut(tmp_path / "data" / "phrasecut")
    calls = []
    convert = phrasecut.convert
    monkeypatch.setattr(phrasecut, "convert", lambda *a, **k: calls.append(a) or convert(*a, **k))
    stats = paper.prepare(cfg)
    assert calls == [(src, out, ("test",))]
    assert stats["data.phrasecut_unseen.test.refs"] == N_UNSEEN_TEST
    assert stats["data.phrasecut_unseen.test.images"] == 2 and stats["data.refcoco.train.refs"] == 4
    data = load_refer(out, "phrasecut", "phrasecut_unseen")
    assert sorted(data.cats.values()) == ["fence", "sky"] and data.image_path(12).is_file()
    assert not (out / "phrasecut" / "refs(phrasecut).p").exists()  # unseen subset only
    assert not (tmp_path / "data" / "images" / "11.jpg").exists()  # data_root's images untouched
    assert paper.prepare(cfg) == stats and len(calls) == 1  # up to date: not converted again
    later = (out / "phrasecut" / "refs(phrasecut_unseen).p").stat().st_mtime + 10
    os.utime(src / "refer_test.json", (later, later))  # the source changed: converted again
    assert paper.prepare(cfg) == stats and len(calls) == 2
    cfg["unseen_domain"]["unseen_only"] = False  # other settings: converted again, both refs files counted
    stats = paper.prepare(cfg)
    assert len(calls) == 3 and stats["data.phrasecut.test.refs"] == len(TEST_TASKS)
    assert stats["data.phrasecut_unseen.test.refs"] == N_UNSEEN_TEST
