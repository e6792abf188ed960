"""The floor plan (docs/DESIGN.md, "Floor plan"): simkit's wings, read from the source with `ast`.

No import circle; every import goes down (or stays on its floor); the core names no env; simkit's top
level stays small; no function runs over 60 lines outside bench/. Imports inside functions count too:
a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("simkit", "trainer", "environments")

# floor of each module (longest matching prefix); a module may import its own floor and below
FLOORS = {
    "simkit.types": 0, "simkit.config": 0, "simkit.datafile": 0, "simkit.prompts": 0, "simkit.procs": 0,
    "simkit.sampling": 0,
    "simkit.roles": 1, "simkit.queue": 1, "simkit.modelserver": 1,
    "simkit.env": 2,
    "simkit.engine": 3, "simkit.envserver": 3,
    "simkit.act": 4, "simkit.evaluation": 4, "simkit.loadtools": 4,
    "simkit.serving": 5, "trainer": 5,
    "simkit.demo": 6, "environments": 6,
    "simkit.cli": 7, "trainer.cli": 7, "simkit": 7,  # `simkit` alone: the package's public facade
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else subs + [mod]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def floor(module: str) -> int:
    key = max((k for k in FLOORS if module == k or module.startswith(k + ".")), key=len)
    return FLOORS[key]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert cycles(imports(modules())) == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor("simkit.roles.agents") < floor("simkit.env") < floor("simkit.serving.serve")


def test_every_import_goes_down_or_stays_on_its_floor():
    graph = imports(modules())
    upward = sorted(f"{a} (floor {floor(a)}) -> {b} (floor {floor(b)})"
                    for a, targets in graph.items() for b in targets if floor(b) > floor(a))
    assert upward == []


def test_the_core_names_no_env_and_demo_imports_no_trainer():
    graph = imports(modules())
    assert not [(a, b) for a, ts in graph.items() if a.startswith("simkit") for b in ts
                if b.startswith("environments")]
    assert not [b for b in graph["simkit.demo"] if b.startswith("trainer")]


def test_simkit_top_level_is_small():
    top = sorted(p.name for p in (ROOT / "simkit").glob("*.py"))
    assert len(top) <= 12, top


def test_no_function_over_60_lines_outside_bench():
    long = []
    for pkg in (*PACKAGES, "tests", "recipes", "scripts"):
        for p in (ROOT / pkg).rglob("*.py"):
            for n in ast.walk(ast.parse(p.read_text())):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                    long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def _shell_imports() -> list[tuple[str, str, str]]:
    """(script, module, name) of every `from simkit…/trainer… import name` in the shell scripts
    (their Python heredocs and -c strings): a moved module breaks them with no import check of its own."""
    import re
    found = []
    for script in sorted([*ROOT.glob("recipes/*.sh"), *ROOT.glob("scripts/*.sh"), *ROOT.glob("bench/*.sh")]):
        for mod, names in re.findall(r"from ((?:simkit|trainer|environments)[\w.]*) import ([\w, ]+)", script.read_text()):
            found += [(script.name, mod, n.strip()) for n in names.split(",") if n.strip()]
    return found


def test_shell_scripts_import_what_exists():
    import importlib
    found = _shell_imports()
    assert any(mod == "simkit.queue" and name == "open_queue" for _, mod, name in found)  # the recipe's, seen
    missing = [f"{script}: from {mod} import {name}" for script, mod, name in found
               if not hasattr(importlib.import_module(mod), name)]
    assert not missing, missing
