"""The package reads as the pipeline: no import cycle, no import of a later step, only the orchestrator runs
an earlier step (an ast walk over ris_utils, in-function imports included)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ris_utils"

#: module (or package) prefix -> pipeline level; the longest matching prefix wins. A new module needs a line.
LEVELS = {
    "": 0, "settings": 0, "profiles": 0, "layout": 0, "fileio": 0, "images": 0, "models": 0, "metrics": 0,
    "text": 0, "crops": 0, "engine": 0, "sources": 0,                                     # base: every step may use them
    "data": 1, "download": 1,                                               # notebook 00
    "masks": 2,                                                             # notebook 01, step 1
    "captioning": 3,                                                        # notebook 02, step 2
    "filtering": 4, "clip_scorer": 4, "train_clip": 4,                      # notebook 03, step 3
    "export": 5, "formats": 5, "report": 5,                                 # notebook 03, the export
    "ris": 6,                                                               # notebook 04
    "ris.tables": 7, "peers": 7,                                            # notebook 05
    "pipeline": 8, "runs": 8, "__main__": 8, "generate": 8, "fidelity": 8, "viz": 8,   # on top of the steps
}
TOP = 8
NAMES = {0: "base", 1: "data", 2: "masks", 3: "captions", 4: "filter", 5: "export", 6: "ris", 7: "tables", 8: "top"}

#: What runs a step (writes its output, or trains its model): called only from its own step or from the top.
RUNNERS = {
    "run_masks": 2, "make_step_fn": 2,
    "run_captions": 3, "run_caption_jobs": 3, "load_captioner": 3, "ensure_captions": 3,
    "run_filter": 4, "run_filter_jobs": 4, "make_scorer": 4, "train_clip": 4, "filter_jobs": 4, "filter_split": 4,
    "export_dataset": 5, "write_trainsets": 5, "build_trainsets": 5,
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def level(mod: str) -> int:
    parts = mod.split(".") if mod else []
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in LEVELS:
            return LEVELS[key]
    raise AssertionError(f"ris_utils.{mod} has no pipeline level: add it to LEVELS in {__file__}")


def _resolve(mod: str, node) -> list[str]:
    """In-package modules an import node names (``ris_utils.x.y`` -> ``x.y``), relative imports resolved."""
    is_pkg = MODULES.get(mod, Path()).name == "__init__.py"
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [n[len("ris_utils."):] if n != "ris_utils" else "" for n in names
                if n == "ris_utils" or n.startswith("ris_utils.")]
    if node.level:
        base = mod.split(".") if mod else []
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == "ris_utils" or node.module.startswith("ris_utils.")):
        target = node.module[len("ris_utils."):] if node.module != "ris_utils" else ""
    else:
        return []
    out = []
    for a in node.names:  # `from ris_utils.captioning import step`: the submodule when there is one
        sub = f"{target}.{a.name}" if target else a.name
        out.append(sub if sub in MODULES else target)
    return out


def _imports() -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _resolve(mod, node) if d != mod)
        graph[mod] = deps
    return graph


GRAPH = _imports()


def _names(mod: str) -> str:
    return f"ris_utils.{mod}" if mod else "ris_utils"


def test_every_module_has_a_level_and_imports_only_known_modules():
    for mod, deps in GRAPH.items():
        level(mod)
        for d in deps:
            assert d in MODULES, f"{_names(mod)} imports {_names(d)}, which does not exist"


def test_no_module_imports_a_later_step():
    bad = [f"{_names(m)} ({NAMES[level(m)]}) imports {_names(d)} ({NAMES[level(d)]})"
           for m, deps in GRAPH.items() for d in sorted(deps) if level(d) > level(m)]
    assert not bad, "imports that run back up the pipeline:\n" + "\n".join(bad)


def test_no_import_cycle():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(map(_names, c)) for c in cycles)


def test_only_the_orchestrator_runs_an_earlier_step():
    bad = []
    for mod, path in MODULES.items():
        lv = level(mod)
        if lv == TOP:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in RUNNERS and RUNNERS[name] < lv:
                    bad.append(f"{_names(mod)} (step {NAMES[lv]}) calls {name} (step {NAMES[RUNNERS[name]]}) "
                               f"at line {node.lineno}")
    assert not bad, "a step runs an earlier one (only ris_utils.pipeline may):\n" + "\n".join(bad)


@pytest.mark.parametrize("bad", ["from ris_utils import export", "from ..filtering import run_filter"])
def test_the_walk_sees_a_back_up_import(bad):
    """The check itself: a data-step module importing a later step is caught (also inside a function)."""
    tree = ast.parse(f"def f():\n    {bad}\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
    deps = _resolve("data.samples", node)
    assert deps and all(level(d) > level("data.samples") for d in deps)
