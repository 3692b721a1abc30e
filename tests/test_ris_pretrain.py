"""The shapes world's pretrained CLIP for the RIS model (ris_utils.ris.pretrain): its data shares no image and
no referring expression with the RIS datasets (checked on the data), its objective, its asset and card."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ris_utils.data import refer, shapes
from ris_utils.profiles import step_config
from ris_utils.ris import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ris_world(tmp_path_factory):
    data = step_config("shapes", "data")
    root = tmp_path_factory.mktemp("world")
    shapes.generate_world(root, {"train": 60, "val": 15, "testA": 10, "testB": 10}, seed=int(data.get("seed", 0)),
                          image_size=int(data["image_size"]))
    return root


def test_pretraining_data_shares_no_image_and_no_expression_with_the_ris_world(ris_world):
    pcfg = step_config("shapes", "ris")["pretrain"]
    world_seed = int(pcfg["world_seed"])
    assert world_seed != int(step_config("shapes", "data").get("seed", 0))
    # the pretraining scenes at the RIS world's own resolution (letterbox of a 128 px square = identity)
    imgs, objs, _ = pretrain.pretrain_world(world_seed, 80, input_size=128)
    pre_hashes = {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in imgs}
    ris_hashes, sentences = set(), set()
    from ris_utils.images import load_image_rgb

    for ds in shapes.DATASETS:
        data = refer.load_refer(ris_world, ds, shapes.SPLIT_BY)
        sentences |= {s["sent"] for r in data.refs for s in r["sentences"]} | {
            s["raw"] for r in data.refs for s in r["sentences"]}
        for image_id in data.imgs:
            img = load_image_rgb(data.image_path(image_id))
            ris_hashes.add(hashlib.sha1(np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()).hexdigest())
    assert len(ris_hashes) == 95 and len(pre_hashes) == 80
    assert not pre_hashes & ris_hashes
    rng = np.random.default_rng(0)
    captions = {pretrain.generic_caption(o, rng) for scene in objs for o in scene for _ in range(8)}
    assert len(captions) > 300 and len(sentences) > 300
    assert not captions & sentences  # no pretraining caption is a referring expression of the RIS data
    # and they are generic: no location, no ordinal (the referee reads no location in any of them)
    assert all(not shapes.parse_expression(c)["locations"] for c in captions)


def test_fits_and_the_multi_positive_loss():
    o = shapes.ShapeObject(obj_id=0, ann_id=1, shape="circle", color="red", size="big", pattern="striped")
    assert pretrain.fits("a red circle", o) and pretrain.fits("one big striped circle shape", o)
    assert not pretrain.fits("a blue circle", o) and not pretrain.fits("a red square", o)
    assert not pretrain.fits("a small circle", o)
    reg = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    pos = torch.eye(4, dtype=torch.bool)
    aligned = pretrain.fit_loss(reg, reg, pos, torch.tensor(10.0))
    shuffled = pretrain.fit_loss(reg, reg.roll(1, 0), pos, torch.tensor(10.0))
    assert aligned < shuffled


def test_a_short_pretraining_run_writes_a_loadable_checkpoint_and_card(tmp_path):
    cfg = {**step_config("shapes", "ris")["pretrain"], "steps": 2, "n_images": 4, "batch_size": 2, "eval": None}
    card = pretrain.pretrain(cfg, out=tmp_path / "dense.pt", progress=False)
    assert (tmp_path / "dense.json").is_file() and card["c5_stride"] == 16
    from ris_utils.ris.model import build_model

    m = build_model("cris_clip_dense", word_len=16, eot_token_id=3, pretrained=str(tmp_path / "dense.pt"))
    sd = torch.load(tmp_path / "dense.pt", weights_only=True)["state_dict"]
    assert torch.equal(m.backbone.visual.conv1.weight, sd["visual.conv1.weight"].float())
    c3, c4, c5 = m.backbone.encode_image(torch.randn(1, 3, cfg["input_size"], cfg["input_size"]))
    assert c5.shape[-1] == cfg["input_size"] // 16


def test_the_committed_asset_matches_its_card():
    pcfg = step_config("shapes", "ris")["pretrain"]
    ck = ROOT / pcfg["checkpoint"]
    card = json.loads(ck.with_suffix(".json").read_text())
    assert ck.stat().st_size <= 10 * 2**20 and card["bytes"] == ck.stat().st_size
    assert card["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert card["settings"]["world_seed"] == pcfg["world_seed"] and card["pick"]["dense"] > card["pick"]["chance"]
