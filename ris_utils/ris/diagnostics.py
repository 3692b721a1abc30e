"""Diagnostics that say WHY a RIS model scores what it scores (ours, not the paper's).

- :func:`named_attributes`: which attribute kinds a referring expression names -- colour, shape, size,
  pattern, location -- read with the shapes world's referee vocabulary (:func:`ris_utils.data.shapes.
  parse_expression`); on other text it finds the words of that vocabulary only. Used to split the pick
  accuracy of :func:`ris_utils.ris.train.evaluate_model` by attribute (``pick_acc_<attr>``): a model that
  reads colours but not sizes shows it there.
"""

from __future__ import annotations

from ris_utils.data.shapes import parse_expression

ATTRIBUTE_KINDS = ("color", "shape", "size", "pattern", "location")


def named_attributes(sentence: str) -> set[str]:
    """The attribute kinds named in ``sentence`` (subset of :data:`ATTRIBUTE_KINDS`)."""
    p = parse_expression(sentence)
    out = {k for k in ("color", "shape", "size", "pattern") if p[k]}
    if p["locations"]:
        out.add("location")
    return out


def pick_by_attribute(records: list[tuple[str, bool]]) -> dict:
    """``[(sentence, picked right)]`` -> ``{"pick_acc_<attr>": share, "pick_n_<attr>": count}`` per kind named."""
    hits = {k: [0, 0] for k in ATTRIBUTE_KINDS}
    for sent, ok in records:
        for k in named_attributes(sent):
            hits[k][0] += int(ok)
            hits[k][1] += 1
    out = {}
    for k, (h, n) in hits.items():
        if n:
            out[f"pick_acc_{k}"] = h / n
            out[f"pick_n_{k}"] = n
    return out
