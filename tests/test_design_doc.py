"""docs/DESIGN.md's module map matches the package: every top-level module / package of ris_utils is listed,
every listed one exists, and the model configs it names are the ones in ris_utils/model_configs."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PKG = ROOT / "ris_utils"


def module_map() -> str:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    assert "## Module map" in text, "docs/DESIGN.md has no '## Module map' section"
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    assert block.startswith("\nris_utils/"), "the module map is the first code block after '## Module map'"
    return block


def test_design_opens_with_the_data_flow():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    assert "## The data flow" in text and "## Module map" in text, "docs/DESIGN.md: data flow, then module map"
    assert text.index("## The data flow") < text.index("## Module map") < text.index("## Profiles")
    flow = text.split("## The data flow", 1)[1].split("## Module map", 1)[0]
    for nb in ("00", "01", "02", "03", "04", "05"):
        assert f"| {nb} |" in flow, f"the data-flow table names no notebook {nb}"


def test_module_map_lists_the_package():
    listed = set(re.findall(r"^  ([\w]+(?:\.py|/))", module_map(), flags=re.M))
    present = {p.name for p in PKG.glob("*.py")} | {p.name + "/" for p in PKG.iterdir()
                                                    if p.is_dir() and not p.name.startswith("__")}
    assert not present - listed, f"not in docs/DESIGN.md's module map: {sorted(present - listed)}"
    assert not listed - present, f"in docs/DESIGN.md's module map but not in ris_utils: {sorted(listed - present)}"


def map_entry(block: str, name: str) -> str:
    """The map's text for one top-level entry: its line and the indented lines under it."""
    lines = block.split(f"\n  {name}", 1)[1].split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line.startswith("   "):
            break
        out.append(line)
    return "\n".join(out)


def test_module_map_names_the_model_configs_there_are():
    named = set(re.findall(r"\b[a-z0-9]+_[a-z0-9_]+\b", map_entry(module_map(), "model_configs/"))) - {"open_clip"}
    present = {p.stem for p in (PKG / "model_configs").glob("*.json")}
    assert named == present, f"model_configs in the doc {sorted(named)} vs on disk {sorted(present)}"


def test_subpackages_are_described_module_by_module():
    """``data/``, ``masks/``, ``captioning/``, ``engine/``, ``ris/``, ``formats/``: the map names every file."""
    block = module_map()
    for pkg in ("data", "masks", "captioning", "engine", "ris", "formats"):
        text = map_entry(block, f"{pkg}/")
        files = {p.stem for p in (PKG / pkg).glob("*.py") if not p.stem.startswith("__")}
        files |= {p.name for p in (PKG / pkg).iterdir() if p.is_dir() and not p.name.startswith("__")}
        missing = sorted(f for f in files if not re.search(rf"\b{f}\b", text))
        assert not missing, f"docs/DESIGN.md: the {pkg}/ entry does not name {missing}"
