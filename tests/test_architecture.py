"""The shape of the code base, checked from the source.

- No import cycles among ncpvae's modules, counting function-level imports too. (The plugin
  manager names the built-in plugins as strings for ``importlib``; that list is not an import
  and so is not part of the graph.)
- Layers: the core (interfaces, registry, components, MCMC building blocks) imports no run
  config, runner, evaluation or metric module, and ``import ncpvae`` loads none of them.
- Import path = file path: every module's file path ends with its dotted name.
- Built-in plugins use only the public namespaces, exactly as a third-party plugin must:
  ``from ncpvae import ...``, ``from ncpvae.mcmc import ...`` (names in that namespace's
  ``__all__``) and their own modules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
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


def is_lazy_hook(node: ast.AST, parent: ast.AST) -> bool:
    """A module-level ``def __getattr__`` (PEP 562): what it imports loads on first use of a
    name, after the module itself was imported, so it is no import of the module."""
    return (isinstance(parent, ast.Module) and isinstance(node, ast.FunctionDef)
            and node.name == "__getattr__")


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never executed) and in
    a module-level ``__getattr__`` (:func:`is_lazy_hook`)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                pending.extend(child.orelse)
            elif not is_lazy_hook(child, node):
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
    assert "ncpvae.sections" in graph["ncpvae.factory"]
    assert "ncpvae.metrics.likelihood" in graph["ncpvae.evaluation.compare"]
    assert "ncpvae.registry" not in graph["ncpvae.component"]
    assert len(graph) > 40


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


#: The core: what a component needs to be written, registered, built and sampled. The
#: ``ncpvae.mcmc`` package counts with all its modules.
CORE = ("ncpvae", "ncpvae.component", "ncpvae.data", "ncpvae.errors", "ncpvae.factory",
        "ncpvae.fitting", "ncpvae.hookspecs", "ncpvae.io", "ncpvae.kinds", "ncpvae.model",
        "ncpvae.modes", "ncpvae.objective", "ncpvae.optim", "ncpvae.plugin_manager",
        "ncpvae.prior", "ncpvae.prior_fitting", "ncpvae.registry", "ncpvae.sampler",
        "ncpvae.sections", "ncpvae.sharding", "ncpvae.splits", "ncpvae.testing", "ncpvae.tilted",
        "ncpvae.units", "ncpvae.hierarchical")
#: What the core must not reach, directly or through another module.
OUTER_LAYERS = ("ncpvae.config", "ncpvae.experiment", "ncpvae.cli", "ncpvae.run",
                "ncpvae.evaluation", "ncpvae.metrics", "ncpvae.plots", "ncpvae.api")


def in_layer(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not, each with the module that imports it."""
    via: dict[str, str] = {}
    pending = [start]
    while pending:
        node = pending.pop()
        for child in sorted(graph.get(node, ())):
            if child not in via and child != start:
                via[child] = node
                pending.append(child)
    return via


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``core -> ... -> outer`` import chains, one per core module that has one."""
    core = [m for m in graph if in_layer(m, CORE[1:]) or m == "ncpvae" or in_layer(m, ("ncpvae.mcmc",))]
    bad = []
    for module in sorted(core):
        via = reachable(graph, module)
        outer = sorted(m for m in via if in_layer(m, OUTER_LAYERS))
        if outer:
            chain = [outer[0]]
            while chain[-1] != module:
                chain.append(via[chain[-1]])
            bad.append(" -> ".join(reversed(chain)))
    return bad


def test_core_modules_exist():
    graph = import_graph()
    assert [m for m in CORE if m not in graph] == []


def test_core_imports_no_config_run_evaluation_or_metric_module():
    bad = layer_violations(import_graph())
    assert not bad, "core reaches an outer layer: " + "; ".join(bad)


def test_layer_check_flags_an_indirect_import():
    graph = {"ncpvae.factory": {"ncpvae.sections"}, "ncpvae.sections": {"ncpvae.config"},
             "ncpvae.config": {"ncpvae.evaluation.config"}, "ncpvae.evaluation.config": set()}
    assert layer_violations(graph) == ["ncpvae.factory -> ncpvae.sections -> ncpvae.config",
                                       "ncpvae.sections -> ncpvae.config"]


def test_import_ncpvae_loads_no_evaluation_metric_config_or_run_module():
    # a fresh interpreter: this process has imported everything already
    code = "import sys, ncpvae; print(' '.join(m for m in sys.modules if m.startswith('ncpvae')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FRAMEWORK), str(PLUGINS),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert "ncpvae.sampler" in out and "ncpvae.mcmc.kernels" in out  # the probe sees modules
    assert [m for m in out if in_layer(m, OUTER_LAYERS)] == []


def lazy_imports(path: Path) -> list[str]:
    """What the module-level ``__getattr__`` of ``path`` imports (``from X import Y`` as X.Y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hooks = [node for node in tree.body if is_lazy_hook(node, tree)]
    return sorted(f"{node.module}.{alias.name}" for hook in hooks for node in ast.walk(hook)
                  if isinstance(node, ast.ImportFrom) for alias in node.names)


def test_the_top_level_loads_only_the_notebook_api_lazily():
    """``ncpvae.open_run`` / ``ncpvae.train`` load ncpvae.api on first use (PEP 562), the one
    import of the top level that the layer check does not count; the probe above shows that
    ``import ncpvae`` does not load it."""
    assert lazy_imports(FRAMEWORK / "ncpvae" / "__init__.py") == ["ncpvae.api"]
    assert "ncpvae.api" not in import_graph()["ncpvae"]
    code = ("import sys, ncpvae; assert 'ncpvae.api' not in sys.modules; ncpvae.open_run; "
            "assert 'ncpvae.api' in sys.modules")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FRAMEWORK), str(PLUGINS),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.parametrize("name", sorted(n for n in source_modules() if not n.endswith("__main__")))
def test_module_file_path_ends_with_its_dotted_name(name: str):
    path = source_modules()[name]
    parts = path.with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    assert parts[-len(name.split(".")):] == tuple(name.split("."))
    # and the import system finds that very file under that name (no import hook in between)
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == path.resolve()


#: The namespaces a plugin author may import from, each with its own ``__all__``.
PUBLIC_NAMESPACES = ("ncpvae", "ncpvae.mcmc", "ncpvae.mcmc.fastpath", "ncpvae.testing",
                     "ncpvae.tilted", "ncpvae.splits", "ncpvae.modes", "ncpvae.prior_fitting",
                     "ncpvae.hierarchical")


def public_names() -> dict[str, set[str]]:
    return {ns: set(getattr(importlib.import_module(ns), "__all__", ())) for ns in PUBLIC_NAMESPACES}


def plugin_import_violations(path: Path) -> list[str]:
    """Imports in a built-in plugin module that a third-party plugin could not write."""
    public = public_names()
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
            bad += [f"import {a.name}" for a in node.names
                    if a.name.startswith("ncpvae.") and a.name not in public]
    return bad


@pytest.mark.parametrize("path", sorted(PLUGINS.rglob("*.py")), ids=lambda p: p.stem)
def test_builtin_plugins_use_only_the_public_api(path: Path):
    bad = plugin_import_violations(path)
    assert not bad, f"{path.relative_to(ROOT)} reaches into framework internals: {bad}"


@pytest.mark.parametrize("namespace", PUBLIC_NAMESPACES)
def test_public_namespace_all_is_exact(namespace: str):
    module = importlib.import_module(namespace)
    assert hasattr(module, "__all__"), f"{namespace} has no __all__"
    names = list(module.__all__)
    assert len(names) == len(set(names)), f"{namespace}.__all__ repeats a name"
    assert [n for n in names if not hasattr(module, n)] == []
    # each public name has one home: no namespace re-exports another one's names
    others = set().union(*(v for k, v in public_names().items() if k != namespace))
    assert sorted(set(names) & others) == []


TUTORIAL = "docs/tutorials/python_api.md"


def test_top_level_all_is_what_plugins_and_the_readme_need():
    """Every top-level name is imported by a built-in plugin or shown in the plugin guide
    (docs/tutorials/write_plugin.md) or the Python API tutorial: the top level holds what a
    plugin author (or a notebook) needs, not every helper."""
    used: set[str] = set()
    for path in PLUGINS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ncpvae" and not node.level:
                used |= {a.name for a in node.names}
    readme = (ROOT / "docs/tutorials/write_plugin.md").read_text() + (ROOT / TUTORIAL).read_text()
    unused = [n for n in ncpvae.__all__ if n not in used and f"`{n}`" not in readme
              and f"ncpvae.{n}" not in readme]
    assert unused == []


def test_plugin_import_check_flags_internal_imports(tmp_path: Path):
    module = tmp_path / "plugin.py"
    module.write_text("from ncpvae.config import PriorSection\nfrom ncpvae import Prior, nope\n"
                      "from ncpvae.mcmc import langevin_move, select_rows\nimport ncpvae.run\n")
    assert plugin_import_violations(module) == [
        "from ncpvae.config import ...", "from ncpvae import nope (not in ncpvae.__all__)",
        "from ncpvae.mcmc import select_rows (not in ncpvae.mcmc.__all__)", "import ncpvae.run"]


#: The modules that hold a run's defaults; the defaults that name built-in plugins are data
#: (ncpvae/configs/defaults.toml), so none of these spells a built-in component's name.
DEFAULTS_MODULES = ("ncpvae.config", "ncpvae.evaluation.config", "ncpvae.evaluation.compare",
                    "ncpvae.run.sample_command", "ncpvae.cli", "ncpvae.experiment")


def builtin_names_in_code(path: Path, names: set[str]) -> list[str]:
    """String literals of ``path`` (docstrings aside) that equal one of ``names``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [f"{path.name}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and node.value in names]


def test_framework_code_names_no_builtin_plugin_as_a_default(registry):
    from ncpvae.kinds import KINDS

    names = {name for kind in KINDS for name in registry.names(kind)}
    assert {"gaussian", "langevin", "sprites"} <= names  # the probe sees the built-ins
    modules = source_modules()
    found = [hit for m in DEFAULTS_MODULES for hit in builtin_names_in_code(modules[m], names)]
    assert found == []


def test_builtin_name_check_flags_a_default_in_code(tmp_path: Path):
    module = tmp_path / "config.py"
    module.write_text('"""Mentions "gaussian" in a docstring."""\n'
                      'PRIOR = {"name": "gaussian"}\n')
    assert builtin_names_in_code(module, {"gaussian"}) == ["config.py:2 'gaussian'"]


def test_the_evaluation_imports_no_training_stage():
    """The VAE's held-out numbers live in ncpvae.run.vae_eval, which the training stage and the
    evaluation share; the evaluation does not reach into the stage that trains."""
    graph = import_graph()
    assert "ncpvae.run.vae_eval" in graph["ncpvae.evaluation.pipeline"]
    bad = {m: sorted(graph[m] & {"ncpvae.run.train", "ncpvae.run.stages"})
           for m in graph if in_layer(m, ("ncpvae.evaluation",))}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_old_plugin_path_is_a_deprecated_alias_of_the_same_modules():
    """``ncpvae.plugins.X`` (the pre-0.2 path) is ``ncpvae_plugins.X`` itself, with a warning."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from ncpvae.plugins.ncp import NCPPrior\n"
        "    import ncpvae.plugins.datasets.sprites as old_sprites\n"
        "import ncpvae_plugins.ncp, ncpvae_plugins.datasets.sprites\n"
        "assert NCPPrior is ncpvae_plugins.ncp.NCPPrior\n"
        "assert old_sprites is ncpvae_plugins.datasets.sprites\n"
        "assert [w.category for w in caught] == [DeprecationWarning], caught\n"
        "assert 'ncpvae_plugins' in str(caught[0].message)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
