"""RIS effect of training on the top-2 survivors by DoC (issue 15 item 4: the authors' LMDB loader reads
pseudo_captions[:2]) against all survivors (the default), 3 seeds, after `make reproduce`:

    .venv/bin/python benchmarks/ris_export_top2.py      # writes <work_dir>/export/pseudo_ris_top2, runs in ris-top2

Prints val mIoU and pick accuracy per style and seed (compare with ris.pseudo_ris.<style>.val.* of metrics.json).
"""

import logging
from pathlib import Path

from ris_utils.export import export_dataset
from ris_utils.filtering import images_dir_of
from ris_utils.profiles import step_config
from ris_utils.ris import experiments


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    fcfg = step_config("shapes", "filter")
    ecfg = step_config("shapes", "export")
    rcfg = step_config("shapes", "ris")
    work = Path(ecfg["work_dir"])
    out = work / "export" / "pseudo_ris_top2"
    if not (out / "dataset_card.json").is_file():
        export_dataset(work / "filter" / "distinctive" / "train", out, dataset=ecfg.get("dataset"),
                       split_by=ecfg.get("split_by"), unfiltered=False, images_dir=images_dir_of(fcfg),
                       images="link", name="pseudo_ris_top2", max_sentences_per_ref=2, order="doc")
    rcfg["experiments"]["runs_dir"] = "ris-top2"
    jobs = experiments.plan(rcfg, trainsets=["pseudo_ris"])
    for j in jobs:
        j.train_path = str(out)
        j.out = str(experiments.runs_dir(rcfg) / "pseudo_ris_top2" / "any" / f"seed{j.seed}")
    experiments.run_jobs(jobs, rcfg, workers=1, progress=False)
    for r in experiments.collect(experiments.runs_dir(rcfg)):
        if r["split"] == "val":
            print(r["style"], r["seed"], round(r["mIoU"], 2), round(r["pick_acc"], 3))


if __name__ == "__main__":
    main()
