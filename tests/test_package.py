"""The package's shape: no module of nmfjax imports, directly or through others, a module that imports it."""

import ast
import pathlib

from tests.conftest import ROOT

PACKAGE = ROOT / "nmfjax"


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path) -> set[str]:
    """The modules of nmfjax that ``path`` imports anywhere in it (a function's import included);
    ``from nmfjax import ops`` is the module ``nmfjax.ops``.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "nmfjax":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    return found


def _import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of ``graph`` (module -> modules it imports), each as the path around it."""
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                circles.append([*path[path.index(imported) :], imported])
            elif imported not in done:
                visit(imported, [*path, imported])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return circles


def test_the_circle_finder_finds_a_circle():
    assert _import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _import_circles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_nmfjax_imports_itself_through_others():
    # The package itself re-exports its modules' names: importing it is importing the package, not a circle.
    graph = {module: _imports(path) - {"nmfjax", module} for module, path in MODULES.items()}
    assert {"nmfjax.ops", "nmfjax.kernels", "nmfjax.numerics"} <= set(graph)
    assert "nmfjax.kernels" in graph["nmfjax.ops"] and "nmfjax.numerics" in graph["nmfjax.kernels"]
    assert _import_circles(graph) == []
