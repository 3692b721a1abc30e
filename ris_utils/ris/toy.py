"""A toy REFER dataset (non-square images, coloured boxes) for tests and smoke runs of ``ris``.

Not part of the paper. Every image is ``height x width`` (non-square by default) with two boxes of two
colours on a grey background; each box is a ref with sentences naming its colour ("the red box", ...),
so a model that reads the words can segment it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ris_utils.data import refer

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}
VOCAB = ("the", "box", "square", *COLORS)


def make_toy_refer(out_root, n_images: int = 16, height: int = 40, width: int = 56, seed: int = 0,
                   dataset: str = "toy", split_by: str = "toy", splits=("train", "val")) -> Path:
    """Write ``out_root/images/*.png`` and ``out_root/<dataset>/refs(<split_by>).p`` (+ instances.json).

    Images are split round-robin over ``splits``. Returns ``out_root``.
    """
    rng = np.random.default_rng(seed)
    out_root = Path(out_root)
    (out_root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, refs = [], [], []
    names = list(COLORS)
    ann_id = ref_id = sent_id = 1
    for i in range(n_images):
        img = np.full((height, width, 3), 128, np.uint8)
        c1, c2 = rng.choice(len(names), 2, replace=False)
        fname = f"toy_{i:04d}.png"
        boxes = []
        for k, c in enumerate((c1, c2)):
            bw, bh = int(rng.integers(width // 5, width // 3)), int(rng.integers(height // 5, height // 3))
            x0 = int(rng.integers(0, width // 2 - bw)) + k * (width // 2)
            y0 = int(rng.integers(0, height - bh))
            mask = np.zeros((height, width), np.uint8)
            mask[y0:y0 + bh, x0:x0 + bw] = 1
            img[mask > 0] = COLORS[names[c]]
            boxes.append((names[c], mask))
        Image.fromarray(img).save(out_root / "images" / fname)
        images.append({"id": i + 1, "file_name": fname, "height": height, "width": width})
        split = splits[i % len(splits)]
        for color, mask in boxes:
            ann = refer.make_annotation(ann_id, i + 1, 1, mask)
            anns.append(ann)
            sents = [refer.make_sentence(f"the {color} box", sent_id), refer.make_sentence(f"{color} square", sent_id + 1)]
            refs.append(refer.make_ref(ref_id, ann, split, sents, fname))
            ann_id, ref_id, sent_id = ann_id + 1, ref_id + 1, sent_id + 2
    refer.write_refer(out_root, dataset, split_by, refs, images, anns, [{"id": 1, "name": "box"}])
    return out_root


def toy_tokenizer_spec(word_len: int = 8) -> dict:
    """A word-tokenizer spec (as saved in checkpoints) covering :data:`VOCAB`."""
    return {"type": "word", "vocab": list(VOCAB), "context_length": word_len}
