"""The package's shape: imports point down the pipeline (data → models → training → evaluation
→ pictures → runs → use → lab → command line) with no cycle, and dotted names in the code and
the documents name things that exist."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "mnistlab"

# Lowest first: a module may import from its own layer or one below, never one above.
LAYERS = [
    {"mnistlab", "errors", "files"},
    {"data"},
    {"config", "metrics"},
    {"kernels"},
    {"models"},
    {"evaluation"},
    {"train"},
    {"plots"},
    {"run"},
    {"use"},
    {"lab"},
    {"cli_args", "cli", "__main__"},
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, at module level or inside functions."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(module: str) -> int:
    key = module.split(".")[1] if "." in module else module
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{module} is in no layer; add its folder to LAYERS")


def test_the_graph_sees_the_imports_it_should():
    g = graph()
    assert "mnistlab.run.checkpoint" in g["mnistlab.run.driver"]
    assert "mnistlab.train.autograd_engine" in g["mnistlab.train.choose"]  # inside a function
    assert "mnistlab.train.engine" in g["mnistlab.train.kernel_engine"]  # relative, from a sibling


def test_every_import_points_down_the_pipeline():
    upward = [f"{m} -> {t}" for m, targets in graph().items() for t in targets if layer(t) > layer(m)]
    assert not upward, upward


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def _dotted_names() -> set[str]:
    texts = [p.read_text() for d in ("src", "benchmarks", "fuzz", "examples", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md", ".sh")]
    texts.append((ROOT / "README.md").read_text())
    return {m.group(0).rstrip(".") for text in texts for m in re.finditer(r"\bmnistlab(?:\.[A-Za-z_]\w*)+", text)}


def test_dotted_names_in_code_and_documents_exist():
    names = _dotted_names()
    assert "mnistlab.run.driver" in names  # the scan finds them
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    missing.append(name)
                    break
                obj = getattr(obj, attr)
            break
        else:
            missing.append(name)
    assert not missing, missing


@pytest.mark.parametrize("module", ["mnistlab.train.optim", "mnistlab.train.engine"])
def test_no_re_exports(module):
    """A module's names are its own: nothing imported only to be imported from it elsewhere."""
    source = modules()[module].read_text()
    assert "re-export" not in source and "noqa: F401" not in source
