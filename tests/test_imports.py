"""The package's import graph has no cycles: every `import`/`from ... import` of a `fedhpro` module, at module
level or inside a function (a late import hides a cycle without removing it) or through `lazy_module("fedhpro...")`,
except those under `if TYPE_CHECKING:` (never executed)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedhpro"
# No cycle is known: aggregate <-> figures (shared labels in fedhpro.labels) and the dataset registry
# (fedhpro.data.registry, which the loader modules import) were removed by issue 14; keep it that way.
KNOWN_CYCLES: list[list[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == \
                    "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (a name imported from a package counts as its submodule if one
    exists, else as the package)."""
    this = module_name(path)
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_module" and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value in modules):
            out.add(node.args[0].value)  # fedhpro.lazy: imported on first use, an import all the same
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    out.add(sub)
                elif node.module in modules:
                    out.add(node.module)
    out.discard(this)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path a -> ... -> a."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_cycle_finder_finds_a_hidden_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_and_type_checking_imports(tmp_path):
    path = PACKAGE / "engine.py"
    graph = imports_of(path, {"fedhpro.engine", "fedhpro.batched", "fedhpro.local"})
    assert "fedhpro.batched" in graph and "fedhpro.local" in graph
    # batched imports Engine only for type hints: no edge back
    assert "fedhpro.engine" not in imports_of(PACKAGE / "batched.py", {"fedhpro.engine", "fedhpro.local"})
    # an import inside a function counts
    assert "fedhpro.methods" in imports_of(PACKAGE / "config.py", {"fedhpro.methods", "fedhpro.errors"})


def test_package_has_no_import_cycles():
    cycles = [c for c in find_cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert not cycles, "import cycles among fedhpro modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_engine_config_and_methods_import_no_cycle():
    """The cycles issue 14 removed: engine <-> clientstore, engine <-> batched, config <-> methods."""
    graph = import_graph()
    for a, b in [("fedhpro.engine", "fedhpro.clientstore"), ("fedhpro.engine", "fedhpro.batched"),
                 ("fedhpro.config", "fedhpro.methods")]:
        assert not any(a in c and b in c for c in find_cycles(graph)), (a, b)


def test_figures_and_dataset_loaders_import_no_cycle():
    """The two cycles issue 14 removed last: aggregate <-> figures, and the dataset registry <-> its loaders."""
    graph = import_graph()
    assert "fedhpro.aggregate" not in graph["fedhpro.figures"]
    loaders = [m for m in graph if m.startswith("fedhpro.data.") and m != "fedhpro.data.registry"]
    assert loaders and all("fedhpro.data" not in graph[m] for m in loaders), loaders
    assert "fedhpro.data" not in graph["fedhpro.data.registry"]
