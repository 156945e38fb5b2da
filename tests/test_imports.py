"""The package's import graph: no cycles, Hypercorn internals in one package, the agent
library free of the command line.

Every module of ``tunnel/`` is read with :mod:`ast` (nothing is imported), so a module
added or moved later is checked the same way. Every ``import`` and ``from ... import``
counts, also inside functions: an import deferred into a function is still a dependency,
only a later one. Only imports under ``if TYPE_CHECKING:`` are left out, as they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import tunnel

PACKAGE = Path(tunnel.__file__).parent
HYPERCORN_PACKAGE = "tunnel.server.hypercorn"

# The only imports of Hypercorn outside tunnel.server.hypercorn, each of a public entry
# point (documented by Hypercorn for embedding), with the reason it is not routed through
# that package.
PUBLIC_HYPERCORN: dict[tuple[str, str], str] = {
    # The agent's inspector is a small web app of the agent's own; importing the server's
    # package for it would make the agent library depend on the server.
    ("tunnel.client._inspector", "hypercorn.config"): "Config, to bind the inspector",
    ("tunnel.client._inspector", "hypercorn.trio"): "serve(), to run the inspector",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _runtime_imports_of(other)
            continue
        yield from _runtime_imports_of(child)


def _runtime_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _runtime_imports(node)


def imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules outside tunnel that ``path`` imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif not node.level and node.module is not None:
            found.add(node.module)
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """The absolute names of the modules that ``name`` imports at run time.

    ``from x import y`` counts as importing ``x.y`` when that is a module, else ``x``.
    """
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            # The package that the leading dots are relative to.
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join([*base, node.module] if node.module else base)
        else:
            assert node.module is not None
            origin = node.module
        found.add(origin)
        found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def dependencies(name: str, path: Path, modules: Iterable[str]) -> set[str]:
    """What ``name`` imports: tunnel's modules, and the other packages' modules named."""
    internal = imported_names(name, path) & set(modules)
    external = {module for module in imported_modules(path) if not _in_package(module, "tunnel")}
    return internal | external


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def internal_graph() -> dict[str, set[str]]:
    """Module -> the tunnel modules it imports (a package counts as its ``__init__``).

    Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so those
    count too, except the importing module's own packages, which are being imported
    already when it runs.
    """
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = {name, *_ancestors(name)}
        targets = set()
        for imported in imported_names(name, path):
            if imported not in modules:
                continue
            targets.update(
                module for module in (*_ancestors(imported), imported) if module not in own
            )
        graph[name] = targets & modules.keys()
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for target in sorted(graph[node]):
            if colour[target] == grey:
                return [*stack[stack.index(target) :], target]
            if colour[target] == white and (cycle := visit(target)):
                return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white and (cycle := visit(node)):
            return cycle
    return None


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_walk_sees_the_package() -> None:
    # A walk that found nothing would pass every check below.
    graph = internal_graph()
    assert "tunnel.server._app" in graph
    assert "tunnel.client._client" in graph
    assert sum(len(targets) for targets in graph.values()) > 100


def test_find_cycle_names_a_cycle() -> None:
    # The checker itself, on graphs whose answer is known.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_relative_imports_resolve(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from . import x\nfrom .. import y\nfrom ..z import w\nimport q.r\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .hidden import h\n"
        "def f():\n    from .late import l\n"
    )
    names = imported_names("tunnel.server.m", path)
    assert {"tunnel.server.x", "tunnel.y", "tunnel.z.w", "q.r", "tunnel.server.late"} <= names
    assert not any("hidden" in name for name in names)


def test_no_import_cycles() -> None:
    cycle = find_cycle(internal_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_hypercorn_internals_only_in_the_hypercorn_package() -> None:
    offenders = []
    for name, path in all_modules().items():
        if _in_package(name, HYPERCORN_PACKAGE):
            continue
        for imported in sorted(imported_modules(path)):
            if _in_package(imported, "hypercorn") and (name, imported) not in PUBLIC_HYPERCORN:
                offenders.append(f"{name} imports {imported}")
    assert offenders == [], "\n".join(offenders)


def test_agent_library_does_not_import_the_command_line() -> None:
    # tunnel.client is a library that programs embed: the panel, the CLI and their
    # terminal dependencies (rich) belong to tunnel.cli on top of it.
    offenders = []
    modules = all_modules()
    for name, path in modules.items():
        if not _in_package(name, "tunnel.client"):
            continue
        for imported in sorted(dependencies(name, path, modules)):
            if _in_package(imported, "tunnel.cli") or _in_package(imported, "rich"):
                offenders.append(f"{name} imports {imported}")
    assert offenders == [], "\n".join(offenders)


#: Package -> the packages its modules must not import: the server and the agent are
#: separate sides, the command line sits on top of both, and the sans-IO protocol
#: rules, the config and the ASGI types sit below everything.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "tunnel.server": ("tunnel.client", "tunnel.cli"),
    "tunnel.client": ("tunnel.server", "tunnel.cli"),
    "tunnel._protocol": ("tunnel.server", "tunnel.client", "tunnel.cli", "trio"),
    "tunnel._config": ("tunnel.server", "tunnel.client", "tunnel.cli"),
    "tunnel._asgi": ("tunnel.server", "tunnel.client", "tunnel.cli", "hypercorn"),
}


def test_imports_point_down_the_layers() -> None:
    offenders = []
    modules = all_modules()
    for name, path in modules.items():
        for package, forbidden in FORBIDDEN.items():
            if not _in_package(name, package):
                continue
            for imported in sorted(dependencies(name, path, modules)):
                if any(_in_package(imported, below) for below in forbidden):
                    offenders.append(f"{name} imports {imported}")
    assert offenders == [], "\n".join(offenders)
