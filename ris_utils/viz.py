"""What the notebooks draw: galleries, histograms, curves and the prediction grid (matplotlib / seaborn).

A leaf module, used by the notebooks only. It reads the steps' outputs (mask, captions and filter records,
training histories, REFER data) and draws or tabulates them; it runs no step and imports no step module
except, lazily, the captions step's :func:`~ris_utils.captioning.step.candidate_table` (the referee's
verdict on a captions record, to mark distinct candidates).

Every plotting function creates its figure(s) and calls ``plt.show()``; it returns nothing, so a call can
end a notebook cell without the figure drawn twice (with a non-interactive backend the figure stays open:
``plt.gcf()`` is what was drawn).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ris_utils.data import refer
from ris_utils.images import load_image_rgb

GALLERY_SPLIT_ORDER = ("val", "test", "testA", "testB", "train")
GALLERY_SETTINGS = ("beam", "top_k=5", "top_k=13", "top_p=0.4", "top_p=0.8")


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _sns():
    import seaborn as sns

    return sns


def _show(fig) -> None:
    _plt().show()


def check_inputs(required: dict, notebook: str, command: str | None = None) -> None:
    """Fail with one line naming what to run first when an input of this notebook is missing.

    ``required`` maps a description to a path (file or folder; a folder must hold something); ``notebook``
    is the notebook that writes them, ``command`` the CLI command that does the same.
    """
    missing = [f"{what} ({p})" for what, p in required.items()
               if not Path(p).exists() or (Path(p).is_dir() and not any(Path(p).iterdir()))]
    if missing:
        how = f"run notebook {notebook} first" + (f" (or `{command}`)" if command else "")
        raise FileNotFoundError(f"missing input: {'; '.join(missing)} -- {how}")


def flatten(d: dict, prefix: str = ""):
    """(dotted key, value) pairs of a nested dict: ``{"a": {"b": 1}}`` -> ``("a.b", 1)``."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flatten(v, key + ".")
        else:
            yield key, v


# ------------------------------------------------------------------------------------------ data (00)


def pick_refs(data, n: int, seed: int = 0, split_order=GALLERY_SPLIT_ORDER) -> tuple[str, list[dict]]:
    """The first split of ``split_order`` present in ``data`` and ``n`` of its refs (seeded; one per image
    first, then the other refs of the same images)."""
    present = {r["split"] for r in data.refs}
    split = next((s for s in split_order if s in present), sorted(present)[0])
    refs = refer.select_split(data.refs, split)
    rng = np.random.default_rng(seed)
    order = [refs[i] for i in rng.permutation(len(refs))]
    first_per_image = list({r["image_id"]: r for r in reversed(order)}.values())[::-1]
    return split, (first_per_image + [r for r in order if r not in first_per_image])[:n]


def refs_gallery(data, n: int, seed: int = 0, split_order=GALLERY_SPLIT_ORDER):
    """``n`` refs of a REFER dataset (see :func:`pick_refs`): image, target outline, two sentences."""
    split, chosen = pick_refs(data, n, seed, split_order)
    fig, axes = _plt().subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.6), squeeze=False)
    for ax, ref in zip(axes[0], chosen):
        ax.imshow(load_image_rgb(data.image_path(ref["image_id"])))
        ax.contour(data.get_mask(ref), levels=[0.5], colors="lime", linewidths=2)
        ax.set_title("\n".join(s["sent"] for s in ref["sentences"][:2]), fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{data.dataset} / {split}", y=1.02)
    _show(fig)


def refs_per_split(counts):
    """Bar chart of refs per split and dataset (a frame with ``dataset``, ``split``, ``refs``)."""
    ax = _sns().barplot(data=counts, x="split", y="refs", hue="dataset")
    ax.set_title("refs per split")
    _show(ax.figure)


def fits_histogram(fits):
    """How many objects each generic caption fits (1 = distinctive by chance)."""
    ax = _sns().histplot(fits, discrete=True)
    ax.set(xlabel="objects a generic caption fits", title="generic captions are often ambiguous")
    _show(ax.figure)


# ------------------------------------------------------------------------------------------ masks (01)


def proposal_frames(records: dict):
    """(one row per proposal, one row per image) DataFrames of the ``ok`` mask records of each split."""
    import pandas as pd

    ok = [(split, r) for split, recs in records.items() for r in recs if r["status"] == "ok"]
    props = pd.DataFrame([{"split": split, "image_id": r["image_id"], "area": p["area"],
                           "area_frac": p["area"] / (r["height"] * r["width"]),
                           "predicted_iou": p["predicted_iou"], "stability_score": p["stability_score"]}
                          for split, r in ok for p in r["proposals"]])
    counts = pd.DataFrame([{"split": split, "image_id": r["image_id"], "proposals": len(r["proposals"])}
                           for split, r in ok])
    return props, counts


def mask_overlay(image: np.ndarray, segmentations, rng, max_drawn: int = 30) -> np.ndarray:
    """Float RGB image with up to ``max_drawn`` masks (largest drawn first) tinted by a random colour each
    (drawn from ``rng``) and their edges black."""
    img = image.astype(np.float32) / 255
    overlay = img.copy()
    edges = np.zeros(img.shape[:2], bool)
    for p in sorted(list(segmentations)[:max_drawn], key=lambda p: -p["area"]):
        m = refer.decode_segmentation(p["segmentation"], *img.shape[:2]).astype(bool)
        overlay[m] = 0.45 * overlay[m] + 0.55 * rng.uniform(0, 1, 3)
        edges |= m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    overlay[edges] = 0
    return overlay


def proposal_gallery(records: list[dict], item_path: dict, n: int, seed: int = 0, max_drawn: int = 30):
    """``n`` images (seeded choice) of one split's mask records with their proposals, one colour each."""
    ok = [r for r in records if r["status"] == "ok"]
    rng = np.random.default_rng(seed)
    shown = [ok[i] for i in sorted(rng.choice(len(ok), size=min(n, len(ok)), replace=False))]
    fig, axes = _plt().subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, rec in zip(axes[0], shown):
        ax.imshow(mask_overlay(load_image_rgb(item_path[rec["image_id"]]), rec["proposals"], rng, max_drawn))
        ax.set_title(f"{rec['file_name']}\n{len(rec['proposals'])} proposals", fontsize=8)
        ax.axis("off")
    _plt().tight_layout()
    _show(fig)


def proposal_histograms(props, counts):
    """Proposal area (fraction of the image, log scale) and proposals per image, per split."""
    sns = _sns()
    fig, axes = _plt().subplots(1, 2, figsize=(11, 3.6))
    if len(props):
        sns.histplot(data=props, x="area_frac", hue="split", log_scale=True, bins=40, element="step", ax=axes[0])
    axes[0].set_title("proposal area (fraction of the image)")
    sns.histplot(data=counts, x="proposals", hue="split", discrete=True, element="step", ax=axes[1])
    axes[1].set_title("proposals per image")
    _plt().tight_layout()
    _show(fig)


def best_iou_histogram(quality: dict, split: str):
    """Best IoU of every ground-truth mask over the proposals (``masks.proposal_quality``), recall@0.5."""
    ax = _sns().histplot(x=quality["best_ious"], bins=20, binrange=(0, 1))
    ax.axvline(0.5, color="k", ls="--")
    ax.set(xlabel="best IoU of a ground-truth mask", title=f"{split}: recall@0.5 = {quality['recall_at_0.5']:.3f}")
    _show(ax.figure)


# ------------------------------------------------------------------------------------------ captions (02)


def loss_curve(card: dict, title: str = "captioner training loss (CoCa: contrastive + caption)"):
    """The training-loss curve of a checkpoint card (``loss_curve``: [step, contrastive, caption] rows)."""
    import pandas as pd

    curve = pd.DataFrame(card["loss_curve"], columns=["step", "contrastive", "caption"])
    ax = _sns().lineplot(data=curve.melt("step", var_name="loss"), x="step", y="value", hue="loss")
    ax.set_title(title)
    _show(ax.figure)


def view_strip(image: np.ndarray, mask: np.ndarray, views, crop):
    """The image with a mask outlined, then ``crop(view)`` for every view kind."""
    fig, axes = _plt().subplots(1, len(views) + 1, figsize=(2.2 * (len(views) + 1), 2.4))
    axes[0].imshow(image)
    axes[0].contour(mask, levels=[0.5], colors="yellow")
    axes[0].set_title("image + mask 0")
    for ax, v in zip(axes[1:], views):
        ax.imshow(crop(v))
        ax.set_title(f"view: {v}")
    for ax in axes:
        ax.axis("off")
    _show(fig)


def show_masks(ax, image: np.ndarray, record: dict, title: str = "") -> None:
    """Draw an image with every mask of a captions record outlined and labelled by its mask_index."""
    ax.imshow(image)
    colors = __import__("matplotlib").colormaps["tab10"]
    for k, m in enumerate(record["masks"]):
        mask = refer.decode_segmentation(m["segmentation"], record["height"], record["width"])
        if not mask.any():
            continue
        ax.contour(mask, levels=[0.5], colors=[colors(k % 10)], linewidths=1.5)
        x, y, _, _ = m["bbox"]
        ax.text(x, y, str(m["mask_index"]), color="white", fontsize=8, va="bottom",
                bbox={"facecolor": colors(k % 10), "pad": 1, "edgecolor": "none"})
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def masks_figure(image: np.ndarray, record: dict, title: str = ""):
    """One image with the masks of a captions record (:func:`show_masks`) as its own figure."""
    fig, ax = _plt().subplots(figsize=(3.2, 3.2))
    show_masks(ax, image, record, title)
    _show(fig)


def gallery_table(records_by_mode: dict, image_id, scenes: dict | None = None, view: int = 0,
                  settings=GALLERY_SETTINGS):
    """A table (pandas DataFrame) of one image's candidates: rows (mask, setting), one column per mode, for
    one view and a few settings; with ``scenes`` (shapes world) each text ends with ✓ when distinct
    (referee == the mask's object) and ✗ otherwise."""
    import pandas as pd

    from ris_utils.captioning.step import candidate_table  # the referee's verdict on a captions record

    rows = []
    for mode, recs in records_by_mode.items():
        rec = next((r for r in recs if r["image_id"] == image_id), None)
        if rec is None:
            continue
        table = candidate_table([rec], scenes) if scenes is not None else None
        i = 0
        for m in rec["masks"]:
            for c in m["candidates"]:
                row = table[i] if table is not None else None
                i += 1
                if c["view"] != view or c["setting"] not in settings:
                    continue
                mark = "" if row is None else (" ✓" if row["distinct"] else " ✗")
                rows.append({"mask": m["mask_index"], "mode": mode, "setting": c["setting"],
                             "text": c["text"] + mark})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    order = {s: k for k, s in enumerate(settings)}
    out = df.pivot_table(index=["mask", "setting"], columns="mode", values="text", aggfunc="first")
    out = out[[m for m in records_by_mode if m in out.columns]]
    return out.sort_index(key=lambda ix: ix.map(order) if ix.name == "setting" else ix)


def distinct_rate_bars(per_setting, table):
    """Distinct rate per decoding setting and mode (mean over seeds), and over all candidates."""
    sns = _sns()
    order = list(dict.fromkeys(per_setting["setting"]))
    fig, axes = _plt().subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    sns.barplot(data=per_setting, x="setting", y="distinct_rate", hue="mode", order=order, ax=axes[0])
    axes[0].set_title("distinct rate per decoding setting (shapes val; bars: mean over seeds)")
    axes[0].tick_params(axis="x", rotation=45)
    sns.barplot(data=table, x="mode", y="distinct_rate", hue="mode", ax=axes[1])
    axes[1].set_title("all candidates")
    _plt().tight_layout()
    _show(fig)


def caption_length_histogram(records_by_mode: dict, title: str = "caption length (words), shapes val"):
    """Words per candidate of the captions records, one histogram per mode."""
    import pandas as pd

    lengths = pd.DataFrame([{"mode": mode, "words": len(c["text"].split())} for mode, recs in records_by_mode.items()
                            for r in recs for m in r["masks"] for c in m["candidates"]])
    ax = _sns().histplot(data=lengths, x="words", hue="mode", discrete=True, multiple="dodge", stat="probability",
                         common_norm=False)
    ax.set_title(title)
    _show(ax.figure)


# ------------------------------------------------------------------------------------------ filter (03)


def log10_doc(cands):
    """The candidates of multi-mask images with a ``log10_doc`` column (infinite DoC at the right edge)."""
    multi = cands[cands["n_masks"] > 1].copy() if len(cands) else cands
    if not len(multi):
        return multi
    finite = np.isfinite(multi["doc"]) & (multi["doc"] > 0)
    hi = float(np.log10(multi.loc[finite, "doc"]).max()) if finite.any() else 1.0
    lo = float(np.log10(multi.loc[finite, "doc"]).min()) if finite.any() else -1.0
    multi["log10_doc"] = np.where(np.isinf(multi["doc"]), hi + 0.25,
                                  np.log10(multi["doc"].clip(lower=10 ** (lo - 0.25))))
    return multi


def doc_histogram(cands):
    """log10 DoC per sampling type and mode (the candidate frame of ``filtering.candidate_frame``)."""
    multi = log10_doc(cands)
    if not len(multi):
        print("no candidates of multi-mask images to plot")
        return
    g = _sns().displot(data=multi, x="log10_doc", hue="sampling", col="mode", kind="hist", element="step",
                       stat="density", common_norm=False, bins=40, height=3.2, aspect=1.4)
    for ax in g.axes.flat:
        ax.axvline(0.0, color="k", ls="--", lw=1)
    g.set_axis_labels("log10 DoC (dashed: DoC = 1)", "density")
    _show(g)


def fade_outside(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with everything outside ``mask`` faded towards white."""
    shown = image.copy()
    shown[~mask] = (0.35 * shown[~mask] + 0.65 * 255).astype(np.uint8)
    return shown


def kept_dropped_lines(candidates: list[dict], k: int = 2) -> list[str]:
    """``+ text (DoC)`` for the first ``k`` distinct kept texts, ``- text (DoC)`` for ``k`` dropped ones."""
    uniq = {}
    for c in candidates:
        uniq.setdefault(c["text"], c)
    kept = [c for c in uniq.values() if c["keep"]][:k]
    dropped = [c for c in uniq.values() if not c["keep"]][:k]
    return [f"+ {c['text']} ({c['doc']:.3g})" for c in kept] + [f"- {c['text']} ({c['doc']:.3g})" for c in dropped]


def kept_dropped_examples(records: list[dict], images_dir, max_masks: int = 4):
    """For every filter record: up to ``max_masks`` masks, each with two kept and two dropped texts."""
    for rec in records:
        image = load_image_rgb(Path(images_dir) / rec["file_name"])
        n = min(max_masks, len(rec["masks"]))
        fig, axes = _plt().subplots(1, n, figsize=(3.2 * n, 3.4))
        for ax, m in zip(np.atleast_1d(axes), rec["masks"]):
            mask = refer.decode_segmentation(m["segmentation"], rec["height"], rec["width"]).astype(bool)
            ax.imshow(fade_outside(image, mask))
            ax.axis("off")
            ax.set_title("\n".join(kept_dropped_lines(m["candidates"])), fontsize=7, loc="left")
        _plt().tight_layout()
        _show(fig)


# ------------------------------------------------------------------------------------------ RIS (04, 05)


def training_frames(jobs):
    """(per-epoch history, per-step loss with a running mean over 20 steps) of the runs' output folders."""
    import pandas as pd

    hist, steps = [], []
    for j in jobs:
        for e in json.loads((Path(j.out) / "history.json").read_text()):
            hist.append({"trainset": j.trainset, "style": j.style or "any", "seed": j.seed, **e})
        log = pd.read_csv(Path(j.out) / "log.csv")
        log["loss"] = log["loss"].rolling(20, min_periods=1).mean()
        steps.append(log.assign(trainset=j.trainset, style=j.style or "any", seed=j.seed))
    return pd.DataFrame(hist), (pd.concat(steps) if steps else pd.DataFrame())


def training_curves(hist, steps, curve=None):
    """Training loss per step and val mIoU, per training set and style (mean over seeds): against the step
    from ``curve`` (:func:`ris_utils.ris.experiments.curves`, runs with ``ris.val_every``) when given, else per
    epoch from ``hist``."""
    sns = _sns()
    fig, axes = _plt().subplots(1, 2, figsize=(13, 4))
    sns.lineplot(data=steps, x="step", y="loss", hue="trainset", style="style", ax=axes[0], errorbar=None)
    axes[0].set_title("training loss (BCE, running mean over 20 steps, mean over seeds)")
    if curve is not None and len(curve):
        sns.lineplot(data=curve, x="step", y="mIoU", hue="trainset", style="style", marker="o", ax=axes[1],
                     errorbar=None)
        axes[1].set_title("val mIoU against step (first refs of the style's val split)")
    elif "val_mIoU" in hist:
        sns.lineplot(data=hist, x="epoch", y="val_mIoU", hue="trainset", style="style", marker="o", ax=axes[1],
                     errorbar=None)
        axes[1].set_title("val mIoU after each epoch (first refs of the style's val split)")
    _plt().tight_layout()
    _show(fig)


def pick_curves(cv):
    """Val pick accuracy and mIoU against the training step, per training set (mean ± sd over seeds)."""
    sns = _sns()
    fig, ax = _plt().subplots(1, 2, figsize=(12, 3.6))
    sns.lineplot(data=cv, x="step", y="pick_acc", hue="trainset", marker="o", errorbar="sd", ax=ax[0])
    sns.lineplot(data=cv, x="step", y="mIoU", hue="trainset", marker="o", errorbar="sd", ax=ax[1])
    ax[0].set_title("val pick accuracy vs step")
    ax[1].set_title("val mIoU (first refs) vs step")
    _plt().tight_layout()
    _show(fig)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two HxW masks (0 when both are empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt) > 0
    return float((pred & gt).sum() / max(1, (pred | gt).sum()))


def prediction_grid(data, refs: list[dict], predictions: dict, n: int, title: str | None = None):
    """Ground truth (top row) and one row per model of the same sentences, each with its IoU.

    ``predictions``: model name -> the ``predictions`` of ``ris.evaluate.evaluate_checkpoint``
    (``(ref index, sentence index, HxW bool mask)`` triples of ``refs``, in the same order for every model:
    the first model's triples choose the sentences).
    """
    plt = _plt()
    first = next(iter(predictions.values()))[:n]
    fig, axes = plt.subplots(len(predictions) + 1, max(1, len(first)),
                             figsize=(2.3 * max(1, len(first)), 2.4 * (len(predictions) + 1)), squeeze=False)
    for k, (i, j, _) in enumerate(first):
        r = refs[i]
        img = load_image_rgb(data.image_path(r["image_id"]))
        gt = data.get_mask(r) > 0
        axes[0, k].imshow(img)
        axes[0, k].imshow(np.ma.masked_where(~gt, gt), alpha=0.55, cmap="autumn")
        axes[0, k].set_title(r["sentences"][j]["sent"], fontsize=8)
        for row, (name, preds) in enumerate(predictions.items(), start=1):
            p = np.asarray(preds[k][2], bool)
            axes[row, k].imshow(img)
            axes[row, k].imshow(np.ma.masked_where(~p, p), alpha=0.55, cmap="winter")
            axes[row, k].set_title(f"{name}: IoU {mask_iou(p, gt):.2f}", fontsize=8)
    for a in axes.ravel():
        a.axis("off")
    if title:
        fig.suptitle(title)
    plt.tight_layout()
    _show(fig)


def ablation_bars(val, order: list[str], labels: dict):
    """Val mIoU per training set (bars: mean over seeds ± std), one colour per style."""
    g = _sns().catplot(data=val, x="trainset", y="mIoU", hue="style", kind="bar", order=order,
                       errorbar="sd", height=4, aspect=2.2)
    g.set_xticklabels([labels[t] for t in order], rotation=20)
    g.set(title="val mIoU (mean over seeds ± std)")
    _show(g)


__all__ = ["check_inputs", "flatten", "pick_refs", "refs_gallery", "refs_per_split",
           "fits_histogram", "proposal_frames",
           "mask_overlay", "proposal_gallery", "proposal_histograms", "best_iou_histogram", "loss_curve",
           "view_strip", "show_masks", "masks_figure", "gallery_table", "distinct_rate_bars",
           "caption_length_histogram", "log10_doc", "doc_histogram", "fade_outside", "kept_dropped_lines",
           "kept_dropped_examples", "training_frames", "training_curves", "pick_curves", "mask_iou",
           "prediction_grid", "ablation_bars"]
