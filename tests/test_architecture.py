"""The shape of the code base, checked from the source.

- No import cycles among ncpvae's modules, counting function-level imports too. (The plugin
  manager names the built-in plugins as strings for ``importlib``; that list is not an import
  and so is not part of the graph.)
- Built-in plugins use only ``ncpvae``'s public top level, exactly as a third-party plugin must:
  ``from ncpvae import ...`` (names in ``ncpvae.__all__``) and their own modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ncpvae

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = ROOT / "framework"
PLUGINS = ROOT / "plugins"


def module_name(path: Path) -> str:
    """The dotted name is the file path below its root: ``framework/ncpvae/run/stages.py`` ->
    ``ncpvae.run.stages``, ``plugins/ncpvae_plugins/ncp.py`` -> ``ncpvae_plugins.ncp``."""
    root = PLUGINS if path.is_relative_to(PLUGINS) else FRAMEWORK
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    files = [*FRAMEWORK.rglob("*.py"), *PLUGINS.rglob("*.py")]
    return {module_name(path): path for path in files}


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never executed)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                pending.extend(child.orelse)
            else:
                pending.append(child)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ncpvae module ``path`` imports, at any depth of the file (function bodies too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the submodule when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return [*path[path.index(child):], child]
            elif colour[child] == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_import_graph_is_read_from_the_source():
    graph = import_graph()
    # spot checks: module-level imports are seen, type-checking-only imports are not
    assert "ncpvae.registry" in graph["ncpvae.plugin_manager"]
    assert "ncpvae.config" in graph["ncpvae.factory"]
    assert "ncpvae.registry" not in graph["ncpvae.component"]
    assert len(graph) > 40


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


#: The namespaces a plugin author may import from, each with its own ``__all__``.
PUBLIC_NAMESPACES = ("ncpvae", "ncpvae.tilted", "ncpvae.splits", "ncpvae.prior_fitting")


def plugin_import_violations(path: Path) -> list[str]:
    """Imports in a built-in plugin module that a third-party plugin could not write."""
    import importlib

    public = {ns: set(importlib.import_module(ns).__all__) for ns in PUBLIC_NAMESPACES}
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if module in public:
                bad += [f"from {module} import {a.name} (not in {module}.__all__)"
                        for a in node.names if a.name not in public[module]]
            elif module.startswith("ncpvae."):
                bad.append(f"from {module} import ...")
        elif isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names if a.name.startswith("ncpvae.")]
    return bad


@pytest.mark.parametrize("path", sorted(PLUGINS.rglob("*.py")), ids=lambda p: p.stem)
def test_builtin_plugins_use_only_the_public_api(path: Path):
    bad = plugin_import_violations(path)
    assert not bad, f"{path.relative_to(ROOT)} reaches into framework internals: {bad}"


def test_public_api_names_exist():
    missing = [name for name in ncpvae.__all__ if not hasattr(ncpvae, name)]
    assert not missing


def test_plugin_import_check_flags_internal_imports(tmp_path: Path):
    module = tmp_path / "plugin.py"
    module.write_text("from ncpvae.config import PriorSection\nfrom ncpvae import Prior, nope\n")
    assert plugin_import_violations(module) == [
        "from ncpvae.config import ...", "from ncpvae import nope (not in ncpvae.__all__)"]
