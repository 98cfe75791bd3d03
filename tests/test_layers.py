"""Layers point one way (docs/layout.md): the AST of every module of tiermem, tiermemd,
cxlfork and emulation is read, every import (top-level or inside a function) is an arrow, and
the test fails on an arrow that runs up the layer order or on an import circle between
modules. Order, bottom to top: tiermem; tiermemd and cxlfork (beside each other, both on
tiermem); emulation (on all three)."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"tiermem": "tiermem", "tiermemd": "daemon/tiermemd", "cxlfork": "cxlfork",
            "emulation": "emulation"}
# what each package may import from the project (itself always)
ALLOWED = {"tiermem": set(), "tiermemd": {"tiermem"}, "cxlfork": {"tiermem"},
           "emulation": {"tiermem", "tiermemd", "cxlfork"}}


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py of the four packages."""
    mods = {}
    for pkg, rel in PACKAGES.items():
        base = os.path.join(ROOT, rel)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mods[".".join([pkg, *parts])] = os.path.join(dirpath, f)
    return mods


def _imports(name: str, path: str, mods: dict[str, str]) -> set[str]:
    """The project modules `name` imports (resolved to the longest known module name)."""
    is_pkg = os.path.basename(path) == "__init__.py"
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import sub` is an arrow to pkg.sub when that is a module, else to pkg
            # (a parent package's __init__ runs for any submodule: not counted as an arrow)
            targets += [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                        for a in node.names]
    out = set()
    for t in targets:
        while t and t not in mods:
            t = t.rpartition(".")[0]
        if t and t != name:
            out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_packages():
    graph = _graph()
    assert "tiermem.cli" in graph and "tiermemd.control" in graph
    assert "emulation.cli" in graph and "cxlfork.cli" in graph
    assert "tiermem.control" in graph["tiermemd.control"]      # arrows are read


def test_no_upward_import():
    bad = []
    for mod, deps in sorted(_graph().items()):
        pkg = mod.split(".")[0]
        for d in sorted(deps):
            dpkg = d.split(".")[0]
            if dpkg != pkg and dpkg not in ALLOWED[pkg]:
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_no_import_circle():
    circles = _circles(_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
