"""Dependencies point down only: an import graph of ``src/sapguard`` built with ``ast``.

Layers, lowest first (a module may import its own layer and the ones below, never one above)::

    _version, errors, io                        (foundation)
    data
    models
    features
    polytope
    evaluate, detect, steer, interpret          (consumers of the polytope)
    bench
    serve, engines
    pipeline, demo
    cli
    sapguard/__init__.py                        (the public facade re-exports from every layer)

Every import counts: module level, inside functions and classes, and under ``TYPE_CHECKING`` (a
type-only import is still an arrow up). Known violations are listed in ``ALLOWED`` with the reason;
the test fails on any violation that is not listed and warns about a listed one that has gone
away (so the list only shrinks).
"""

from __future__ import annotations

import ast
import warnings
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "sapguard"

LAYERS: list[set[str]] = [
    {"_version", "errors", "io"},
    {"data"},
    {"models"},
    {"features"},
    {"polytope"},
    {"evaluate", "detect", "steer", "interpret"},
    {"bench"},
    {"serve", "engines"},  # engines: serving-engine backends (vLLM), beside our own server
    {"pipeline", "demo"},
    {"cli"},
    {""},  # sapguard/__init__.py
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}

# (importing module, imported module) pairs allowed to go up a layer: none today (the last two,
# steer.target -> bench.judges / bench.attacks, went when the refusal judge moved to steer.refusal and
# the attack families to data.attacks). Do not add to this list: put the code in the layer that owns it.
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``module -> {sapguard modules it imports}``, resolving ``from pkg import submodule``."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                if target == ROOT or target.startswith(ROOT + "."):
                    while target not in modules and "." in target:  # `import a.b.c` of a name in a.b
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        graph[name].add(target)
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else ""
    assert part in LAYER_OF, f"{module}: package {part!r} has no layer in tests/test_architecture.py"
    return LAYER_OF[part]


def upward_imports() -> set[tuple[str, str]]:
    return {(src, dst) for src, dsts in import_graph().items() for dst in dsts if _layer(dst) > _layer(src)}


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "sapguard.models.layers" in graph["sapguard.features.hooks"]
    assert "sapguard.errors" in graph["sapguard.models.layers"]
    assert "sapguard.models.layers" in graph["sapguard.models.loading"]  # imported inside a method


def test_lower_layers_never_import_higher_ones():
    found = upward_imports()
    new = sorted(found - ALLOWED.keys())
    assert not new, (
        "imports that point up a layer (move the code down, or call it from above):\n"
        + "\n".join(f"  {src} -> {dst}" for src, dst in new)
    )
    gone = sorted(ALLOWED.keys() - found)
    if gone:  # a warning, not a failure, so the change that fixes one is not blocked by this file
        warnings.warn(f"fixed upward imports, remove them from ALLOWED: {gone}", stacklevel=1)


def test_no_cycle_between_packages():
    """Within a layer too (detect, steer, interpret, evaluate): the package graph is acyclic.

    The facade ``sapguard/__init__.py`` (package ``""``) imports everything by design; an import of
    the facade from below is reported by the layer test above, so it is left out here.
    """
    edges: dict[str, set[str]] = defaultdict(set)
    for src, dsts in import_graph().items():
        for dst in dsts:
            if (src, dst) in ALLOWED:
                continue
            a, b = (m.split(".")[1] if "." in m else "" for m in (src, dst))
            if a != b and "" not in (a, b):
                edges[a].add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, "package import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for package in sorted(edges):
        if package not in state:
            visit(package, [])


# Cycles between modules of one package: a cycle is allowed when all its modules are in one set. None
# today (the steer/ cycle went when the artifact's load/save/attach moved to steer.artifact).
MODULE_CYCLES_ALLOWED: dict[frozenset[str], str] = {}


def module_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_module_cycles_finder():
    assert module_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert module_cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_between_modules():
    """No module imports, directly or through others, a module that imports it back.

    The facade ``sapguard/__init__.py`` is left out: it re-exports from every layer by design, and
    an import of it from below is an upward import reported above.
    """
    graph = {src: {d for d in dsts if d != ROOT} for src, dsts in import_graph().items() if src != ROOT}
    found = module_cycles(graph)
    new = sorted(sorted(c) for c in found if not any(c <= known for known in MODULE_CYCLES_ALLOWED))
    assert not new, "module import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in new)
    gone = sorted(sorted(known) for known in MODULE_CYCLES_ALLOWED if not any(c <= known for c in found))
    if gone:
        warnings.warn(f"fixed module cycles, remove them from MODULE_CYCLES_ALLOWED: {gone}", stacklevel=1)


def _readme_layout() -> dict[str, str]:
    """The README's layout block as ``entry -> its text`` (``data/``, ``detect.py``, ...)."""
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in block.splitlines()[2:]:
        if line.startswith("  ") and not line.startswith(
            "   "
        ):  # a new entry: "  name/  text" or "  a.py b.py  text"
            names = []
            for word in line.split():
                if word.endswith("/") or word.endswith(".py"):
                    names.append(word)
                else:
                    break
            current = names
            for name in names:
                entries[name] = ""
        for name in current:
            entries[name] += " " + line
    return entries


def test_readme_layout_matches_the_tree():
    entries = _readme_layout()
    root = SRC / ROOT
    on_disk = {p.name + "/" for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    on_disk |= {p.name for p in root.glob("*.py") if p.name != "__init__.py"}
    on_disk.add("assets/")
    assert on_disk == set(entries), (
        f"README layout vs src/sapguard: missing {sorted(on_disk - set(entries))}, "
        f"not in the tree {sorted(set(entries) - on_disk)}"
    )
    for entry, text in entries.items():
        if entry.endswith("/") and entry != "assets/":
            words = set(text.replace(",", " ").replace("(", " ").replace(")", " ").split())
            modules = {p.stem for p in (root / entry).glob("*.py") if p.stem != "__init__"}
            assert modules <= words, (
                f"README layout, {entry}: modules not described: {sorted(modules - words)}"
            )


# `sap` commands defined as closures inside a register() function: none today (cli/steer.py's four
# went module-level). Like ALLOWED, the list only shrinks.
NESTED_COMMANDS_ALLOWED: set[str] = set()


def test_cli_commands_are_module_level_functions():
    """Each `sap` command is a plain function of a cli module (parse, call the library, print)."""
    from sapguard.cli import app

    nested = set()
    for command in app.registered_commands:
        func = command.callback
        func = getattr(func, "__wrapped__", func)
        assert func.__module__.startswith("sapguard.cli."), f"{command.name}: defined in {func.__module__}"
        if "<locals>" in func.__qualname__:
            nested.add(command.name)
    assert nested <= NESTED_COMMANDS_ALLOWED, (
        f"commands defined inside functions: {sorted(nested - NESTED_COMMANDS_ALLOWED)}"
    )
    if NESTED_COMMANDS_ALLOWED - nested:
        warnings.warn(
            f"now module-level, remove from NESTED_COMMANDS_ALLOWED: {sorted(NESTED_COMMANDS_ALLOWED - nested)}",
            stacklevel=1,
        )
