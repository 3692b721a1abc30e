"""Notebooks 04/05: a CRIS-style RIS model on open_clip, its training (DDP-ready, resumable), evaluation
and the benchmark tables.

- :mod:`ris_utils.ris.model`: CRIS (CLIP multi-scale features, FPN fusion, vision-language decoder,
  text-to-pixel projector) and the builder registry (``cris_rn50``, ``cris_rn101``, ``cris_tiny``).
- :mod:`ris_utils.ris.dataset`: REFER datasets with CRIS's letterbox; one sentence per ref per epoch.
- :mod:`ris_utils.ris.train`: ``python -m ris_utils train`` (also under torchrun).
- :mod:`ris_utils.ris.evaluate`: ``python -m ris_utils evaluate`` (metrics at the original image size).
- :mod:`ris_utils.ris.experiments`: the grid of training sets x styles x seeds of notebook 04.
- :mod:`ris_utils.ris.tables`: the tables of notebook 05.
"""
