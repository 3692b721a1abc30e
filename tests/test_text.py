"""Head-noun extraction (ris_utils.text): real RefCOCO-style phrases, captions, the shapes grammar."""

import numpy as np
import pytest

from ris_utils.text import HeadNounExtractor, head_noun, rule_head_noun

REFCOCO = [
    ("man in red shirt on left", "man"),
    ("the second pizza from the top", "pizza"),
    ("blue umbrella", "umbrella"),
    ("left guy", "guy"),
    ("woman wearing glasses", "woman"),
    ("white car behind the bus", "car"),
    ("person on right", "person"),
    ("zebra", "zebra"),
    ("man on the left", "man"),
    ("the one on the left", "one"),
    ("black and white cat", "cat"),
    ("standing man", "man"),
    ("far right elephant", "elephant"),
    ("bottom left sandwich", "sandwich"),
    ("guy with hat", "guy"),
    ("kid in blue", "kid"),
    ("red striped shirt", "shirt"),
    ("man dressed in black", "man"),
    ("leftmost giraffe", "giraffe"),
    ("two zebras standing in a field", "zebras"),
    ("tennis player", "player"),
    ("Man in RED shirt, on left!", "man"),
]

CAPTIONS = [
    ("a close up of a dog", "dog"),
    ("a picture of a cat on a couch", "cat"),
    ("a man holding a frisbee", "man"),
    ("a woman sitting on a bench", "woman"),
    ("a dog that is sleeping", "dog"),
    ("a large building with a clock", "building"),
    ("a plate of food on a table", "food"),
    ("half of a sandwich", "sandwich"),
]


@pytest.mark.parametrize("text,noun", REFCOCO + CAPTIONS)
def test_rule_head_noun_on_real_phrases(text, noun):
    assert rule_head_noun(text) == noun


def test_degenerate_inputs():
    assert rule_head_noun("") == ""
    assert rule_head_noun("...") == ""
    assert rule_head_noun("left") == "left"  # no noun at all: the last content word
    assert rule_head_noun("on the left") == "left"


def test_shapes_grammar_gives_the_shape():
    from ris_utils.data import shapes

    rng = np.random.default_rng(0)
    scenes = []
    for i in range(12):
        scene, _, _ = shapes.make_scene(np.random.default_rng([5, i]), i + 1, "train", 128, 1)
        scenes.append(scene)
    n = 0
    for scene in scenes:
        for obj in scene.objects:
            for _ in range(3):
                assert rule_head_noun(shapes.generic_caption(obj, rng)) == obj.shape
                n += 1
            for s in shapes.referring_sentences(scene, obj, True, rng):
                assert rule_head_noun(s) == obj.shape, s
    assert n > 50
    # location phrases and ordinals of the shapes grammar
    assert rule_head_noun("the second big red circle from the left") == "circle"
    assert rule_head_noun("the striped square on the right") == "square"


def test_known_nouns_win_and_extractor_backend():
    assert rule_head_noun("the red thing next to the star", nouns=["star", "circle"]) == "star"
    ex = HeadNounExtractor(backend="rules")
    assert ex.backend == "rules" and ex("blue umbrella") == "umbrella"
    auto = HeadNounExtractor(backend="auto", spacy_model="no_such_pipeline_xyz")
    assert auto.backend == "rules"
    assert head_noun("person on right", backend="rules") == "person"
    with pytest.raises(RuntimeError, match="spacy"):
        HeadNounExtractor(backend="spacy", spacy_model="no_such_pipeline_xyz")
    with pytest.raises(ValueError, match="backend"):
        HeadNounExtractor(backend="nltk")


def test_spacy_branch_takes_the_first_noun_chunk_root(monkeypatch):
    """The spaCy path (authors: en_core_web_lg) with a stand-in pipeline: root of the first noun chunk,
    else the first NOUN/PROPN, else the rules."""
    from types import SimpleNamespace

    import ris_utils.text as text

    def nlp(t):
        toks = [SimpleNamespace(text=w, pos_="NOUN" if w in ("shirt", "Man") else "ADJ") for w in t.split()]
        chunks = [SimpleNamespace(root=toks[0])] if t.startswith("Man") else []
        return _Doc(toks, chunks)

    class _Doc(list):
        def __init__(self, toks, chunks):
            super().__init__(toks)
            self.noun_chunks = chunks

    monkeypatch.setattr(text, "_load_spacy", lambda model: nlp)
    ex = text.HeadNounExtractor(backend="auto", spacy_model="stand_in", rule="first_chunk")
    assert ex.backend == "spacy"
    assert ex("Man in red shirt") == "man"  # first chunk's root
    assert ex("red shirt") == "shirt"  # no chunk: first NOUN
    assert ex("left") == "left"  # neither: the rules


def _parsed(words, heads, chunks):
    """A stand-in spaCy Doc: ``heads[i]`` = index of token i's head (itself for the root); ``chunks`` =
    ``[(start, end, root index)]``."""
    from types import SimpleNamespace

    toks = [SimpleNamespace(i=i, text=w) for i, w in enumerate(words)]
    for t, h in zip(toks, heads):
        t.head = toks[h]
    for t in toks:
        t.children = [c for c in toks if c.head is t and c is not t]

    class _Doc(list):
        noun_chunks = [SimpleNamespace(start=a, end=b, root=toks[r]) for a, b, r in chunks]

    return _Doc(toks)


def test_authors_spacy_rule(monkeypatch):
    """The authors' noun_extraction: the chunk of the sentence root, or of its FIRST child, else the whole
    text (then their prompt drops its own article)."""
    import ris_utils.text as text

    # "a man riding a horse": root "man" is in chunk "a man"
    assert text.authors_head_noun(_parsed(["a", "man", "riding", "a", "horse"], [1, 1, 1, 4, 2],
                                          [(0, 2, 1), (3, 5, 4)]), "a man riding a horse") == "man"
    # "playing dogs": root "playing" (no chunk), first child "dogs" in a chunk -> dogs
    assert text.authors_head_noun(_parsed(["Dogs", "playing"], [1, 1], [(0, 1, 0)]), "Dogs playing") == "Dogs"
    # root outside every chunk and its first child too -> the whole text
    assert text.authors_head_noun(_parsed(["a", "red", "one", "left"], [2, 2, 3, 3], [(0, 1, 0)]),
                                  "a red one left") == "a red one left"
    docs = {"a red one left": _parsed(["a", "red", "one", "left"], [2, 2, 3, 3], [(0, 1, 0)])}
    monkeypatch.setattr(text, "_load_spacy", lambda model: docs.__getitem__)
    ex = text.HeadNounExtractor(backend="spacy", spacy_model="stand_in")
    assert ex.rule == "authors" and ex("a red one left") == "a red one left"
    with pytest.raises(ValueError, match="head_noun.rule"):
        text.HeadNounExtractor(backend="rules", rule="last_chunk")
