import pytest

from ris_utils.ris import experiments


def _cfg(tmp_path, **ex):
    (tmp_path / "work" / "export" / "naive").mkdir(parents=True)
    return {"work_dir": str(tmp_path / "work"), "data_root": str(tmp_path / "data"), "epochs": 2, "note": "a",
            "experiments": {"trainsets": ["naive"], "seeds": [0, 1], **ex,
                            "eval_sets": [{"style": "shapes", "dataset": "shapes", "splits": ["val"]}]}}


def test_runs_dir_default_and_named(tmp_path):
    cfg = _cfg(tmp_path)
    assert experiments.runs_dir(cfg) == tmp_path / "work" / "ris"
    jobs = experiments.plan(cfg)
    assert [j.name for j in jobs] == ["naive/any/seed0", "naive/any/seed1"]
    assert all(j.out.startswith(str(tmp_path / "work" / "ris" / "naive")) for j in jobs)
    long = {**cfg, "experiments": {**cfg["experiments"], "runs_dir": "ris-long"}}
    assert all(j.out.startswith(str(tmp_path / "work" / "ris-long")) for j in experiments.plan(long))
    for bad in ("../elsewhere", "/abs"):
        with pytest.raises(ValueError, match="runs_dir"):
            experiments.runs_dir({**cfg, "experiments": {"runs_dir": bad}})


def test_job_key_follows_training_settings_not_notes_or_folders(tmp_path):
    cfg = _cfg(tmp_path)
    job = experiments.plan(cfg)[0]
    key = experiments.job_key(job, cfg)
    assert experiments.job_key(job, {**cfg, "note": "another text"}) == key
    assert experiments.job_key(job, {**cfg, "work_dir": "/elsewhere"}) == key
    assert experiments.job_key(job, {**cfg, "epochs": 3}) != key
    assert experiments.job_key(experiments.plan(cfg)[1], cfg) != key  # the seed


def test_job_cost_orders_by_training_and_evaluation_size(tmp_path):
    from ris_utils.ris.toy import make_toy_refer

    big = make_toy_refer(tmp_path / "big", n_images=12)
    small = make_toy_refer(tmp_path / "small", n_images=4)
    ev = {"style": "toy", "dataset": "toy", "split_by": "toy", "splits": ["val"]}
    cfg = {"data_root": str(big), "epochs": 2}

    def job(path, evals):
        return experiments.Job("gt", "toy", 0, str(path), "toy", "toy", str(tmp_path / "o"), evals)

    c_big, c_small = experiments.job_cost(job(big, []), cfg), experiments.job_cost(job(small, []), cfg)
    assert c_big == 3 * 2 * 12 and c_small == 3 * 2 * 4  # 2 boxes per image, half the images in train
    assert experiments.job_cost(job(small, [ev]), cfg) == c_small + 24  # on data_root (big): 12 val refs x 2 sentences
    assert experiments.job_cost(job(tmp_path / "missing", []), cfg) == 0  # unknown size: no error
