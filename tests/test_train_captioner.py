"""The shapes-world captioner: word tokenizer, a short training run, the checkpoint loader."""

import pytest
import torch

from ris_utils.captioning.tokenizer import WordTokenizer


def test_word_tokenizer_round_trip():
    tok = WordTokenizer(["red", "blue", "circle", "striped square", "red"], context_length=6)
    assert tok.vocab_size == 4 + 5  # duplicates dropped, phrases split into words
    ids = tok(["The Red circle!", "blue striped square"])
    assert ids.shape == (2, 6) and ids.dtype == torch.long
    assert ids[0].tolist() == [tok.sot_token_id, tok.unk_token_id, tok.encoder["red"], tok.encoder["circle"],
                               tok.eot_token_id, tok.pad_token_id]
    assert tok.decode(ids[1]) == "blue striped square"
    assert tok.decode(ids[0]) == "<unk> red circle"
    # truncation keeps eot as the last token; decode stops at eot
    long = tok("red red red red red red red")
    assert long.shape == (1, 6) and long[0, -1].item() == tok.eot_token_id
    assert tok.decode([tok.sot_token_id, tok.encoder["red"], tok.eot_token_id, tok.encoder["blue"]]) == "red"
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer(["a"], context_length=2)


def test_shapes_tokenizer_covers_generic_captions():
    import numpy as np

    from ris_utils.captioning.tokenizer import shapes_tokenizer
    from ris_utils.data import shapes

    tok = shapes_tokenizer(context_length=12)
    assert tok.vocab_size == 4 + len(shapes.VOCABULARY)
    rng = np.random.default_rng(0)
    objs = [{"shape": s, "color": c, "size": z, "pattern": p} for s in shapes.SHAPES for c in shapes.COLORS
            for z in shapes.SIZES for p in shapes.PATTERNS]
    for o in objs[::7]:
        text = shapes.generic_caption(o, rng)
        ids = tok(text)[0]
        assert tok.unk_token_id not in ids.tolist()
        assert tok.decode(ids) == " ".join(text.lower().split())


def _tiny_cfg(tmp_path, **train):
    settings = {"seed": 0, "world_seed": 5, "n_images": 12, "image_size": 128, "steps": 25, "batch_size": 24,
                "lr": 3e-3, "warmup_steps": 5, "threads": 1}
    settings.update(train)
    return {"model": "coca_shapes", "tokenizer": "shapes", "views": ["masked", 1.0, 1.1, 1.2], "fill": 0,
            "pretrained": str(tmp_path / "ckpt" / "coca_shapes.pt"), "work_dir": str(tmp_path / "work"),
            "device": "cpu", "train": settings}


def test_short_training_lowers_loss_and_round_trips(tmp_path):
    from ris_utils.captioning.train import card_matches, load_captioner, train

    cfg = _tiny_cfg(tmp_path)
    cap = train(cfg, out=cfg["pretrained"], log_every=0)
    card = cap.card
    # CoCa loss (contrastive + caption) goes down within 25 steps
    first = card["initial_loss"]["caption"] + card["initial_loss"]["contrastive"]
    last = card["final_loss"]["caption"] + card["final_loss"]["contrastive"]
    assert last < 0.8 * first, (first, last)
    assert card["checkpoint_bytes"] < 10e6 and card["tokenizer"]["vocab"]
    assert card_matches(card, cfg) == (True, "")
    assert card_matches(card, {**cfg, "train": {**cfg["train"], "steps": 26}}) == (False, "train")
    # loading the saved checkpoint gives the same weights (fp16-rounded in both) and the same tokenizer
    again = load_captioner(cfg)
    assert again.source == cfg["pretrained"]
    for (k, a), (_, b) in zip(cap.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    texts = ["a big red striped circle"]
    assert torch.equal(cap.tokenizer(texts), again.tokenizer(texts))
    assert again.tokenizer.decode(again.tokenizer(texts)[0]) == "a big red striped circle"


def test_same_seed_same_weights(tmp_path):
    from ris_utils.captioning.train import train

    cfg = _tiny_cfg(tmp_path, steps=3, n_images=4)
    a, b = train(cfg, log_every=0), train(cfg, log_every=0)
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
