"""Files along their seams: the old public paths and entry points still work, and the byte-identity check
(benchmarks/step_hashes.py) hashes what it says it hashes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, usage", [
    ("ris_utils.masks", "python -m ris_utils masks"),
    ("ris_utils.data.shapes", "python -m ris_utils shapes"),
    ("ris_utils.engine", "python -m ris_utils.engine"),
])
def test_packages_keep_their_module_entry_points(module, usage):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", module, "--help"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {usage}")


def test_old_public_paths_resolve_to_the_seam_modules():
    from ris_utils import engine, masks
    from ris_utils.captioning import decoding
    from ris_utils.data import shapes

    assert masks.run_masks.__module__ == "ris_utils.masks.step"
    assert masks.ComponentsSegmenter.__module__ == "ris_utils.masks.components"
    assert shapes.referee.__module__ == "ris_utils.data.shapes.language"
    assert shapes.generate_world.__module__ == "ris_utils.data.shapes.io"
    assert decoding.sample_captions.__module__ == "ris_utils.captioning.sampling"
    assert decoding.beam_search.__module__ == "ris_utils.captioning.beam"
    assert engine.run.__module__ == "ris_utils.engine.runner"
    # one builder per SAM variant, named as segment-anything names its own
    assert {v: b.__name__ for v, b in masks.SAM_BUILDERS.items()} == {
        "vit_h": "build_sam_vit_h", "vit_l": "build_sam_vit_l", "vit_b": "build_sam_vit_b", "tiny": "build_sam_tiny"}
    for mod in (masks, shapes, decoding, engine):  # every re-exported name is there
        assert all(hasattr(mod, n) for n in mod.__all__), mod.__name__


def _step_hashes():
    spec = importlib.util.spec_from_file_location("step_hashes", ROOT / "benchmarks" / "step_hashes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(root: Path, payload: bytes) -> None:
    (root / "work/masks/val/parts").mkdir(parents=True)
    (root / "work/masks/val/records.jsonl").write_text(f'{{"path": "{root}/data/a.png"}}\n')
    (root / "work/masks/val/parts/masks.rank0of1.log").write_text("abc {}\n")
    (root / "work/masks/val/.lock").write_text("")
    (root / "work/masks/val/manifest.json").write_text(f'{{"fingerprint": "{payload.hex()}"}}')
    (root / "data/images").mkdir(parents=True)
    for i in range(45):  # a big folder: one digest
        (root / f"data/images/{i}.png").write_bytes(payload + bytes([i]))


def test_step_hashes_normalise_the_root_and_keep_bookkeeping_apart(tmp_path):
    sh = _step_hashes()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _tree(a, b"x")
    _tree(b, b"x")
    _tree(c, b"y")
    ha, hb, hc = sh.hash_tree(a), sh.hash_tree(b), sh.hash_tree(c)
    assert list(ha["files"]) == ["work/masks/val/records.jsonl"]  # logs and dotfiles left out
    assert list(ha["bookkeeping"]) == ["work/masks/val/manifest.json"]
    assert ha["folders"]["data/images"]["n"] == 45
    assert ha == hb  # the same outputs under another root: the same hashes
    assert sh.diff(ha, hc, "folders") == ["folders: differs: data/images"]
    assert sh.diff(ha, hc, "files") == [] and sh.diff(ha, hc, "bookkeeping")
