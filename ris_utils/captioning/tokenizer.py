"""Tokenizers behind open_clip's tokenizer interface.

The shapes-world captioner uses :class:`WordTokenizer`, a word-level tokenizer over the shapes world's
closed vocabulary (``ris_utils.data.shapes.VOCABULARY``): with open_clip's BPE vocabulary (49408 tokens)
the token embedding and the output projection of a tiny CoCa would hold ~3 M parameters each, far more
than the rest of the model. The paper profile uses open_clip's own tokenizer
(``open_clip.get_tokenizer("coca_ViT-L-14")``) through the same interface, chosen by the profile's
``captions.tokenizer`` key (:func:`build_tokenizer`).

Interface shared by both (what the decoder and the trainer use):
``tok(texts, context_length=None) -> LongTensor (B, context_length)`` = ``[sot, w1, ..., wn, eot, pad...]``
(truncated texts end with ``eot``), ``tok.decode(ids) -> str``, ``tok.sot_token_id``,
``tok.eot_token_id``, ``tok.pad_token_id`` (0, open_clip CoCa's ``pad_id``), ``tok.vocab_size``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from ris_utils.data import shapes

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def split_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (punctuation dropped, hyphenated words kept whole)."""
    return _WORD.findall(text.lower())



def content_ids(ids, sot: int, eot: int, pad: int) -> list[int]:
    """The word ids of a token sequence: up to (not including) the first ``eot``, without ``sot``/``pad``."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    kept = []
    for i in map(int, ids):
        if i == eot:
            break
        if i not in (sot, pad):
            kept.append(i)
    return kept

class WordTokenizer:
    """Word-level tokenizer with open_clip's tokenizer interface.

    Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<start_of_text>``, 3 ``<end_of_text>``, then ``words`` in the
    given order (duplicates removed). Unknown words map to ``<unk>`` (decoded as ``<unk>``).
    """

    def __init__(self, words: Iterable[str], context_length: int = 16):
        vocab = [PAD, UNK, SOT, EOT]
        seen = set(vocab)
        for w in words:
            for part in split_words(str(w)):
                if part not in seen:
                    seen.add(part)
                    vocab.append(part)
        if len(vocab) == 4:
            raise ValueError("WordTokenizer needs at least one word in its vocabulary")
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (sot, a word, eot), got {context_length}")
        self.vocab = vocab
        self.encoder = {w: i for i, w in enumerate(vocab)}
        self.context_length = int(context_length)
        self.pad_token_id, self.unk_token_id, self.sot_token_id, self.eot_token_id = 0, 1, 2, 3
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` without sot/eot."""
        return [self.encoder.get(w, self.unk_token_id) for w in split_words(text)]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """(B, context_length) LongTensor: ``[sot, words..., eot, 0...]``, truncated to fit (eot kept)."""
        if isinstance(texts, str):
            texts = [texts]
        n = int(context_length or self.context_length)
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)][: n - 1] + [self.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        """Text of a sequence of ids; stops at the first eot, drops sot and pad."""
        kept = content_ids(ids, self.sot_token_id, self.eot_token_id, self.pad_token_id)
        return " ".join(self.vocab[i] if 0 <= i < len(self.vocab) else UNK for i in kept)

    def to_dict(self) -> dict:
        return {"type": "word", "vocab": self.vocab[4:], "context_length": self.context_length}

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


class OpenClipTokenizer:
    """open_clip's own tokenizer with the same attribute names as :class:`WordTokenizer`.

    ``decode`` strips open_clip's special tokens and stops at end-of-text.
    """

    def __init__(self, model_name: str, context_length: int | None = None):
        import open_clip

        self.inner = open_clip.get_tokenizer(model_name)
        self.context_length = int(context_length or getattr(self.inner, "context_length", 77) or 77)
        self.sot_token_id = int(self.inner.sot_token_id)
        self.eot_token_id = int(self.inner.eot_token_id)
        self.pad_token_id = 0
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]
        self.vocab_size = int(getattr(self.inner, "vocab_size", 49408))

    def __call__(self, texts, context_length: int | None = None) -> torch.LongTensor:
        return self.inner(texts, context_length=context_length or self.context_length)

    def decode(self, ids) -> str:
        kept = content_ids(ids, self.sot_token_id, self.eot_token_id, self.pad_token_id)
        return self.inner.decode(kept).strip()


def shapes_tokenizer(context_length: int = 16) -> WordTokenizer:
    """The word tokenizer of the shapes world (``ris_utils.data.shapes.VOCABULARY``)."""
    return WordTokenizer(shapes.VOCABULARY, context_length=context_length)


def build_tokenizer(spec: str, model_name: str | None = None, context_length: int | None = None):
    """Tokenizer named by a profile's ``captions.tokenizer`` key.

    ``"shapes"`` -> :func:`shapes_tokenizer`; ``"open_clip"`` -> open_clip's tokenizer of ``model_name``.
    """
    if spec == "shapes":
        return shapes_tokenizer(context_length or 16)
    if spec == "open_clip":
        if not model_name:
            raise ValueError("captions.tokenizer: 'open_clip' needs captions.model (the open_clip model name)")
        return OpenClipTokenizer(model_name, context_length)
    raise ValueError(f"captions.tokenizer must be 'shapes' or 'open_clip', got {spec!r}")


__all__ = ["WordTokenizer", "OpenClipTokenizer", "shapes_tokenizer", "build_tokenizer", "split_words"]
