"""Head-noun extraction for step 3 (the noun prompt ``"a photo of a {noun}"``).

The authors parse every caption with spaCy ``en_core_web_lg`` and take the head noun. spaCy pipelines are
model downloads (not installable offline here), so :class:`HeadNounExtractor` works in two ways:

- ``backend="spacy"``: ``spacy.load(model)`` (any installed pipeline with a parser/tagger). ``rule="authors"``
  (default) is the authors' ``noun_extraction`` (``my_utils/noun_extraction.py`` at de5d124): start at the
  sentence's root token; while it is in no noun chunk, step to its FIRST child if that child is in a noun
  chunk, else give up and return the WHOLE text; the head is the root of the chunk reached, as written
  (case kept). The whole-text answer is why their noun prompt checks for a leading article (see
  ``ris_utils.filtering``). ``rule="first_chunk"`` (the project's earlier rule): the root of the first noun
  chunk (lower case), else the first NOUN/PROPN token, else the rule-based answer. spaCy is not a
  dependency of this package: it is imported only when asked for.
- ``backend="rules"`` (our choice, the default when no spaCy pipeline is installed): a deterministic
  rule-based extractor for short referring expressions and captions, documented below.
- ``backend="auto"``: spaCy when ``spacy.load(model)`` works, else the rules (logged once).

(NLTK's POS-tagger data is not in its PyPI wheel -- checked: ``nltk-3.10.4-py3-none-any.whl`` holds
``nltk/tag/perceptron.py`` but no ``averaged_perceptron_tagger`` model -- so NLTK is no offline option.)

Rules (:func:`rule_head_noun`), on the lower-cased words of the text:

1. Framing words: a leading ``"a picture of"``, ``"a close up of"``, ``"an image of"``, ``"a group of"``,
   ``"a pair of"``, ``"a piece of"``, ... (:data:`FRAMING`) is skipped, so ``"a close up of a dog"`` gives
   ``dog`` (spaCy's first chunk root would give ``close`` / ``picture``; for a CLIP noun prompt the object
   is what matters).
2. The first noun phrase ends at the first *boundary* word seen AFTER a noun candidate: a preposition
   (``in, on, at, with, of, from, behind, near, next, ...``), a relative pronoun (``that, who, which``),
   an auxiliary or common verb (``is, are, has, sits, holding, ...``), a conjunction (``and, or, but``),
   or a participle (``-ing`` / ``-ed`` word that is not a known noun such as ``building``, ``ceiling``).
   Boundaries before any noun candidate are skipped (``"left guy"``, ``"standing man"``,
   ``"black and white cat"``).
3. The head is the LAST noun candidate of that phrase. A noun candidate is a word that is not a stop word
   (articles, pronouns, determiners), not a known modifier (colours, sizes, positions, ordinals,
   numerals, common adjectives: :data:`MODIFIERS`) and not a boundary word.
4. No noun candidate at all (``"left"``, ``"the one on the left"``): the last non-stop word before the
   first boundary word (``left``, ``one``); no word at all: ``""``.

Optional ``nouns`` (e.g. the shapes world's shape names): when a word of the text is in ``nouns``, the
first such word is the head (closed-vocabulary worlds need no parsing).
"""

from __future__ import annotations

import functools
import logging
import re

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")

STOP = frozenset(
    "a an the this that these those its his her their our my your some any each every another other "
    "it he she they them him me we you i there here very".split()
)

#: Words that end the first noun phrase once a noun candidate has been seen.
BOUNDARY = frozenset(
    # prepositions / locatives
    "in on at with without of from behind near next to under underneath above below beside besides between "
    "by over into onto off out inside outside across along around against toward towards through within "
    "beneath among amongst atop like than for about after before past via up down while where whose "
    # relatives, conjunctions
    "that who which whom and or but nor".split()
    # auxiliaries and common verbs of captions / referring expressions
    + "is are was were be been being has have had do does did can could will would "
      "sits sit stands stand holds hold looks look walks walk rides ride eats eat plays play lies lie lays "
      "runs run waits wait wears wear faces face carries carry shows show appears appear seems seem "
      "stares stare hangs hang flies fly grazes graze".split()
)

#: Modifiers that are (almost) never the head of a referring expression.
MODIFIERS = frozenset(
    # colours and patterns
    "red blue green yellow orange purple pink brown black white gray grey silver gold golden beige tan "
    "dark light bright pale striped dotted spotted plaid checkered patterned colored coloured multicolored "
    # sizes, shapes, ages
    "big small large little tiny huge giant tall short long wide narrow thin thick fat skinny medium "
    "young old older younger elderly baby adult new "
    # positions and ordinals
    "left right middle center centre top bottom front back far near closest nearest farthest furthest "
    "upper lower leftmost rightmost topmost first second third fourth fifth last final other "
    "1st 2nd 3rd 4th 5th closer further farther "
    # numerals
    "one two three four five six seven eight nine ten both several many few half "
    # frequent adjectives of captions
    "empty full open closed wooden metal plastic glass white-and-black round square-shaped partial "
    "visible blurry blurred cut sliced half-eaten whole single double same different main only "
    "leftmost-side right-side left-side".split()
)

#: -ing / -ed words that are nouns (never a participle boundary).
ING_ED_NOUNS = frozenset(
    "building buildings ceiling ceilings clothing thing things king ring rings wing wings string strings "
    "earring earrings pudding icing frosting stuffing topping toppings painting paintings drawing drawings "
    "railing railings siding awning awnings sibling siblings duckling evening morning pudding bedspread "
    "shed sled bread head seed speed steed weed reed".split()
)

#: Leading framing phrases skipped before looking for the head.
FRAMING = (
    "picture of", "photo of", "photograph of", "image of", "close up of", "closeup of", "close-up of",
    "view of", "shot of", "group of", "pair of", "piece of", "slice of", "bunch of", "couple of", "set of",
    "side of", "part of", "half of", "top of", "front of", "back of", "corner of", "edge of", "portion of",
    "plate of", "bowl of", "cup of", "glass of", "stack of", "pile of", "herd of", "flock of", "row of",
    "display of", "collection of", "number of", "lot of", "lots of", "kind of", "type of",
)
_FRAMING_WORDS = tuple(tuple(f.split()) for f in FRAMING)


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (punctuation dropped, hyphenated words kept whole)."""
    return _WORD.findall(str(text).lower())


def _skip_framing(ws: list[str]) -> list[str]:
    i = 0
    while True:
        j = i
        while j < len(ws) and ws[j] in STOP:
            j += 1
        for f in _FRAMING_WORDS:
            if tuple(ws[j : j + len(f)]) == f and j + len(f) < len(ws):
                i = j + len(f)
                break
        else:
            return ws[i:]


def _is_participle(w: str) -> bool:
    return (w.endswith("ing") or w.endswith("ed")) and len(w) > 4 and w not in ING_ED_NOUNS


def _is_noun_candidate(w: str) -> bool:
    return w not in STOP and w not in MODIFIERS and w not in BOUNDARY and not w.isdigit()


def rule_head_noun(text: str, nouns=None) -> str:
    """The head noun of a short English noun phrase by the rules of the module docstring.

    Arguments:
      text: a caption or referring expression, e.g. ``"man in red shirt on left"``.
      nouns: optional collection of known nouns; the first word of the text in it wins.
    Returns:
      the head word in lower case (``"man"``), or ``""`` for a text without words.
    """
    ws = words(text)
    if nouns:
        known = {str(n).lower() for n in nouns}
        for w in ws:
            if w in known:
                return w
    ws = _skip_framing(ws)
    phrase: list[str] = []
    seen_noun = False
    for w in ws:
        if seen_noun and (w in BOUNDARY or _is_participle(w)):
            break
        phrase.append(w)
        if _is_noun_candidate(w) and not _is_participle(w):
            seen_noun = True
    cands = [w for w in phrase if _is_noun_candidate(w) and not _is_participle(w)]
    if cands:
        return cands[-1]
    first = []  # no noun candidate: the words before the first boundary of any kind
    for w in ws:
        if w in BOUNDARY and first:
            break
        first.append(w)
    content = [w for w in first if w not in STOP and w not in BOUNDARY]
    if content:
        return content[-1]
    return ws[-1] if ws else ""


SPACY_RULES = ("authors", "first_chunk")


def authors_head_noun(doc, text: str) -> str:
    """The authors' head noun of a parsed caption (``my_utils/noun_extraction.py`` at de5d124, re-expressed).

    ``doc``: a spaCy ``Doc`` (tokens with ``.i``, ``.head``, ``.children``, ``.text``; ``.noun_chunks`` spans
    with ``.start``, ``.end``, ``.root``). Returns the root text of the noun chunk holding the sentence root
    (or, stepping down, its first child's), else ``text`` itself.
    """
    in_chunk = {}
    for chunk in doc.noun_chunks:
        for i in range(chunk.start, chunk.end):
            in_chunk[i] = chunk
    head = next((tok.head for tok in doc if tok.head.i == tok.i), None)
    if head is None:
        return text
    while head.i not in in_chunk:
        kids = list(head.children)
        if kids and kids[0].i in in_chunk:
            head = kids[0]
        else:
            return text
    return in_chunk[head.i].root.text


@functools.lru_cache(maxsize=4)
def _load_spacy(model: str):
    import spacy  # optional; not a dependency of this package

    return spacy.load(model)


def spacy_available(model: str = "en_core_web_lg") -> bool:
    """Whether ``spacy.load(model)`` works here."""
    try:
        _load_spacy(model)
        return True
    except Exception:  # noqa: BLE001 - ImportError, OSError (model not installed), ...
        return False


class HeadNounExtractor:
    """``extractor(text) -> noun``: spaCy when available (or asked for), else the rule-based extractor.

    Arguments:
      backend: ``"auto"`` (spaCy if ``spacy.load(spacy_model)`` works, else rules), ``"spacy"`` (error if
        unavailable) or ``"rules"``.
      spacy_model: the pipeline name (the authors: ``en_core_web_lg``).
      nouns: optional known nouns (see :func:`rule_head_noun`); used by both backends.
    Attributes:
      backend: the backend actually used (``"spacy"`` or ``"rules"``).
    """

    def __init__(self, backend: str = "auto", spacy_model: str = "en_core_web_lg", nouns=None,
                 rule: str = "authors"):
        if backend not in ("auto", "spacy", "rules"):
            raise ValueError(f"head_noun.backend must be 'auto', 'spacy' or 'rules', got {backend!r}")
        if rule not in SPACY_RULES:
            raise ValueError(f"head_noun.rule must be one of {SPACY_RULES}, got {rule!r}")
        self.rule = rule
        self.spacy_model = spacy_model
        self.nouns = sorted({str(n).lower() for n in nouns}) if nouns else None
        self._nlp = None
        if backend in ("auto", "spacy"):
            try:
                self._nlp = _load_spacy(spacy_model)
            except Exception as e:  # noqa: BLE001
                if backend == "spacy":
                    raise RuntimeError(
                        f"head_noun.backend='spacy' but spacy.load({spacy_model!r}) failed ({type(e).__name__}: "
                        f"{e}); install spaCy and the pipeline, or use backend 'rules' / 'auto'") from e
                logger.info("spaCy pipeline %s not available (%s); using the rule-based head-noun extractor",
                            spacy_model, type(e).__name__)
        self.backend = "spacy" if self._nlp is not None else "rules"
        self._cache: dict[str, str] = {}

    def _spacy_head(self, text: str) -> str:
        doc = self._nlp(text)
        if self.rule == "authors":
            return authors_head_noun(doc, text)
        for chunk in doc.noun_chunks:
            return chunk.root.text.lower()
        for tok in doc:
            if tok.pos_ in ("NOUN", "PROPN"):
                return tok.text.lower()
        return rule_head_noun(text)

    def __call__(self, text: str) -> str:
        hit = self._cache.get(text)
        if hit is None:
            if self.nouns:
                hit = next((w for w in words(text) if w in set(self.nouns)), None)
            if hit is None:
                hit = self._spacy_head(text) if self._nlp is not None else rule_head_noun(text)
            self._cache[text] = hit
        return hit

    def __repr__(self) -> str:
        return f"HeadNounExtractor(backend={self.backend!r}, spacy_model={self.spacy_model!r})"


def head_noun(text: str, backend: str = "auto", spacy_model: str = "en_core_web_lg", nouns=None) -> str:
    """One-off head noun of ``text`` (see :class:`HeadNounExtractor`)."""
    return _extractor(backend, spacy_model, tuple(nouns) if nouns else None)(text)


@functools.lru_cache(maxsize=8)
def _extractor(backend, spacy_model, nouns):
    return HeadNounExtractor(backend, spacy_model, nouns)


__all__ = ["HeadNounExtractor", "authors_head_noun", "SPACY_RULES", "head_noun", "rule_head_noun", "spacy_available", "words"]
