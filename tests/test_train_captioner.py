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
