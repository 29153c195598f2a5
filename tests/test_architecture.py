"""The package's architecture, checked from the source: one room per concern, imports only downwards.

Layers, lowest first: ``core`` (infrastructure) -> ``data`` -> ``models`` -> ``analysis`` -> ``maskcut`` ->
``training`` -> ``notebook``; the package's own ``__init__`` (the curated public surface) and ``__main__``
(the command line) sit on top. A module may import its own layer or lower ones, never a higher one;
nothing imports ``__main__``; the import graph (function-level imports included) has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "nbsupport"
LAYERS = ["core", "data", "models", "analysis", "maskcut", "training", "notebook"]
TOP = len(LAYERS)
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported nbsupport module, line) for every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text())
    pkg = name if _is_package(name) else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "nbsupport"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "nbsupport":
                continue
            for a in node.names:  # `from pkg import submodule` is an import of the submodule
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return LAYERS.index(parts[1])


def test_every_module_is_in_a_room():
    strays = [m for m in MODULES if m.count(".") >= 1 and m.split(".")[1] not in LAYERS + ["__main__"]]
    assert not strays, f"modules outside the rooms {LAYERS}: {strays}"


def test_imports_only_go_down_the_layers():
    bad = []
    for name, path in MODULES.items():
        for target, line in _imports(name, path):
            if target.startswith("nbsupport.__main__"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target} (nothing may import __main__)")
            elif target != "nbsupport" and _layer(target) > _layer(name):
                bad.append(
                    f"{path.relative_to(PKG.parent)}:{line} ({LAYERS[_layer(name)]}) imports {target} "
                    f"({LAYERS[_layer(target)] if _layer(target) < TOP else 'top'})"
                )
            elif target == "nbsupport" and _layer(name) < TOP:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the top-level package")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {
        name: sorted({t for t, _ in _imports(name, path) if t in MODULES and t != name})
        for name, path in MODULES.items()
    }
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (at most {MAX_LINES}): split it by concern"


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The layer check itself can fail: a data module importing a trainer is reported."""
    fake = tmp_path / "nbsupport" / "data" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from nbsupport.training import cutler\n")
    assert _imports("nbsupport.data.bad", fake) == [("nbsupport.training.cutler", 1)]
    assert _layer("nbsupport.training.cutler") > _layer("nbsupport.data.bad")
