"""RIS training: the loss goes down, a crashed run resumes identically, 2-process DDP (gloo) matches 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ris_utils.ris.toy import make_toy_refer, toy_tokenizer_spec
from ris_utils.ris.train import lr_factor, resolve_config, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw):
    cfg = dict(tokenizer=toy_tokenizer_spec(8), word_len=8, input_size=32, epochs=3, batch_size=4, lr=2e-3,
               weight_decay=0.01, schedule={"name": "cosine", "warmup_steps": 2}, threads=1, seed=0,
               device="cpu", grad_clip=1.0)
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_refer(tmp_path_factory.mktemp("toy"), n_images=16, height=40, width=56)


def test_schedule_and_aliases():
    s = {"name": "multistep", "milestones": [2], "gamma": 0.1}
    assert [lr_factor(k, 40, 10, s) for k in (0, 19, 20, 39)] == pytest.approx([1, 1, 0.1, 0.1])
    c = {"name": "cosine", "warmup_steps": 4}
    assert lr_factor(0, 100, 10, c) == pytest.approx(0.25) and lr_factor(99, 100, 10, c) < 0.01
    cfg = resolve_config({"milestones": [35], "lr_decay": 0.1, "num_head": 8, "clip_pretrained": "openai",
                          "max_norm": 0.0})
    assert cfg["schedule"]["milestones"] == [35] and cfg["model_args"]["num_heads"] == 8
    assert cfg["pretrained"] == "openai"


def test_training_lowers_loss(toy, tmp_path):
    res = train(_cfg(epochs=4), toy, tmp_path / "run", val_path=toy, progress=False)
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "log.csv").is_file()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 4 and "val_mIoU" in hist[-1]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["config"]["input_size"] == 32 and ck["epoch"] == 4  # resolved config saved inside


def test_resume_continues_identically(toy, tmp_path):
    full = train(_cfg(epochs=3), toy, tmp_path / "full", progress=False)
    train(_cfg(epochs=3), toy, tmp_path / "crash", progress=False, stop_after_epoch=1)  # "dies" after epoch 1
    assert torch.load(tmp_path / "crash" / "last.pt", weights_only=False)["epoch"] == 1
    resumed = train(_cfg(epochs=3), toy, tmp_path / "crash", progress=False)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "crash" / "last.pt", weights_only=False)
    assert a["steps_log"] == b["steps_log"]
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_torchrun_two_processes_match_one(toy, tmp_path):
    prof = tmp_path / "prof.yaml"
    # Adam moves every weight by ~lr whatever its gradient's size, so float noise in near-zero gradients
    # (another reduction order) would show up as lr-sized steps: a larger eps damps those, not real gradients
    cfg = _cfg(epochs=2, batch_size=8, lr=1e-4, adam_eps=1e-3)
    import yaml

    prof.write_text(yaml.safe_dump({"shared": {"profile": "t", "seed": 0, "device": "cpu"}, "ris": cfg}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "ris_utils", "train", "--train", str(toy), "--out", str(tmp_path / "ddp"), "--profile", str(prof)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    single = train(cfg, toy, tmp_path / "one", progress=False)
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    assert len(a["steps_log"]) == len(b["steps_log"]) == 2 * (8 * 2 // 8)
    la = [s[2] for s in a["steps_log"]]
    lb = [h[2] for h in b["steps_log"]]
    assert la == pytest.approx(lb, rel=2e-4, abs=1e-6)
    n_close = 0
    for k, v in b["model"].items():
        if v.is_floating_point():
            assert torch.allclose(a["model"][k], v, rtol=1e-3, atol=4 * 1e-4), k  # <= a few Adam steps of lr
            n_close += 1
    assert n_close > 100
    cfg_ddp = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg_ddp["world_size"] == 2
    assert single["epochs"] == 2


class _ColourOracle(torch.nn.Module):
    """Stub RIS model for the pick diagnostic: logits high where the pixel has the colour the sentence names
    (``sign=-1``: the opposite, so it picks the other box)."""

    def __init__(self, tok, sign: float = 1.0):
        super().__init__()
        from ris_utils.ris.dataset import _to_tensor_image
        from ris_utils.ris.toy import COLORS

        self.sign = sign
        self.colour = {tok.encoder[c]: _to_tensor_image(torch.tensor(rgb, dtype=torch.uint8)[:, None, None])[:, 0, 0]
                       for c, rgb in COLORS.items()}

    def forward(self, img, tokens):
        out = []
        for x, t in zip(img, tokens):
            rgb = next(self.colour[int(i)] for i in t if int(i) in self.colour)
            d = (x - rgb[:, None, None]).norm(dim=0)
            out.append(self.sign * (2.0 - 4.0 * d))
        return torch.nn.functional.avg_pool2d(torch.stack(out)[:, None], 4)  # (B, 1, S/4, S/4) as CRIS


def test_pick_accuracy_diagnostic(toy):
    """pick_acc = the share of sentences whose referred object gets the highest mean probability: 1 for a
    model that reads the colour word, 0 for one that picks the other box; chance = 1/2 (two boxes)."""
    from ris_utils.ris.dataset import RisEvalSet, open_refer
    from ris_utils.ris.train import build_tokenizer, evaluate_model

    cfg = resolve_config(_cfg())
    tok = build_tokenizer(cfg)
    data = RisEvalSet(open_refer(toy, "toy", "toy"), "val", tok, 32, 8)
    good = evaluate_model(_ColourOracle(tok), data, cfg, "cpu")
    bad = evaluate_model(_ColourOracle(tok, -1.0), data, cfg, "cpu")
    assert good["pick_n"] == bad["pick_n"] == len(data) > 0
    assert good["pick_chance"] == pytest.approx(0.5)
    assert good["pick_acc"] == 1.0 and bad["pick_acc"] == 0.0
    assert good["mIoU"] > bad["mIoU"]


def test_evaluation_encodes_each_image_once_with_the_same_scores(toy):
    """Sentences about one image share one image encoding in evaluation: same scores as encoding per sentence."""
    from ris_utils.ris.dataset import RisEvalSet, open_refer
    from ris_utils.ris.train import build_tokenizer, evaluate_model, make_model

    cfg = resolve_config(_cfg(model_args={"fpn_out": [32, 64, 128], "num_layers": 1, "num_heads": 4,
                                          "dim_ffn": 64, "dropout": 0.0}))
    tok = build_tokenizer(cfg)
    torch.manual_seed(0)
    model = make_model(cfg, tok).eval()
    data = RisEvalSet(open_refer(toy, "toy", "toy"), "val", tok, cfg["input_size"], cfg["word_len"])
    calls = []

    class PerSentence(torch.nn.Module):  # no encode_image: the plain path
        def forward(self, img, tokens):
            calls.append(len(img))
            return model(img, tokens)

    shared_calls = []
    enc = model.backbone.encode_image
    model.backbone.encode_image = lambda img: (shared_calls.append(len(img)), enc(img))[1]
    shared = evaluate_model(model, data, {**cfg, "eval_batch_size": 8}, "cpu", keep_predictions=len(data))
    model.backbone.encode_image = enc
    plain = evaluate_model(PerSentence(), data, {**cfg, "eval_batch_size": 8}, "cpu", keep_predictions=len(data))
    assert sum(calls) == len(data) and sum(shared_calls) < len(data)  # fewer images encoded
    assert shared["ious"] == pytest.approx(plain["ious"], abs=1e-6)
    assert shared["mIoU"] == pytest.approx(plain["mIoU"], abs=1e-6)


def test_evaluate_checkpoint_max_refs_scores_the_first_refs_only(toy, tmp_path):
    from ris_utils.ris.evaluate import evaluate_checkpoint

    train(_cfg(epochs=1), toy, tmp_path / "run", train_dataset="toy", split_by="toy", progress=False)
    full = evaluate_checkpoint(tmp_path / "run", toy, "val", "toy", "toy", device="cpu", keep_predictions=100)
    few = evaluate_checkpoint(tmp_path / "run", toy, "val", "toy", "toy", device="cpu", keep_predictions=100,
                              max_refs=3)
    assert full["n_refs"] == 16 and few["n_refs"] == 3
    assert [p[:2] for p in few["predictions"]] == [p[:2] for p in full["predictions"][:6]]  # 2 sentences per ref
    assert few["ious"] == pytest.approx(full["ious"][:6], abs=1e-6)
