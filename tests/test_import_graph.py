"""The package's imports run one way: no module reaches itself again through its imports, counting every
``import`` in the source (module level and inside functions), so a call-time import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import llamalit

SRC = Path(llamalit.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Every llamalit module ``path`` imports anywhere in its source (``from pkg import sub`` counts sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import llamalit.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_call_time_and_relative_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom . import llama\n\ndef f():\n"
                     "    from llamalit.checkpoints import load_checkpoint\n    import llamalit.data.tokenizer\n")
    known = set(package_modules())
    assert imported_modules(probe, "llamalit.model.probe", known) == {
        "llamalit.model.llama", "llamalit.checkpoints", "llamalit.data.tokenizer"}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "llamalit.checkpoints.detect" in graph["llamalit.checkpoints"]  # the walker reads re-exports
    found = cycles(graph)
    assert not found, "import cycles (each group reaches itself through its imports):\n" + "\n".join(
        " -> ".join(group) for group in found)


def test_layers_point_down():
    """Each layer imports only those below it: utils, then model, then data and checkpoints, then inference,
    training and the CLI."""
    graph = import_graph()
    rules = {
        "llamalit.model": ("llamalit.checkpoints", "llamalit.data", "llamalit.training", "llamalit.cli",
                           "llamalit.inference"),
        "llamalit.checkpoints": ("llamalit.training", "llamalit.cli", "llamalit.inference"),
        "llamalit.inference": ("llamalit.training", "llamalit.cli"),
        "llamalit.training": ("llamalit.cli",),
        "llamalit.data": ("llamalit.training", "llamalit.cli", "llamalit.checkpoints", "llamalit.inference"),
        "llamalit.utils": ("llamalit.model", "llamalit.checkpoints", "llamalit.data", "llamalit.training",
                           "llamalit.cli", "llamalit.inference", "llamalit.settings"),
    }
    wrong = [f"{mod} imports {dep}" for mod, deps in graph.items() for layer, banned in rules.items()
             if mod == layer or mod.startswith(layer + ".")
             for dep in deps if any(dep == b or dep.startswith(b + ".") for b in banned)]
    assert not wrong, "\n".join(sorted(wrong))
