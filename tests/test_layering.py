"""The package is layered and every import points down (the house style):

    oncely.errors, the contracts (brokers/base.py with brokers/_capabilities.py,
      brokers/_headers.py and brokers/_dead_letters.py, stores/base.py)
      < backends (oncely/brokers/*, oncely/stores/*, and the private oncely/_*.py they share)
      < the runtime (oncely/runtime/*)
      < the CLI and oncely.testing

Imports are read with ``ast`` from every module of the package, wherever they appear: at the
top, inside functions, and in ``if TYPE_CHECKING:`` blocks (a type-only import still ties the
two modules together for a reader, and is one edit away from a runtime cycle). A package's
own ``__init__`` running when a submodule is imported is Python's doing, not an edge.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oncely"

CONTRACTS = {
    "oncely.errors",
    "oncely.brokers.base",
    "oncely.brokers._capabilities",  # split out of base, which re-exports them
    "oncely.brokers._headers",
    "oncely.brokers._dead_letters",
    "oncely.stores.base",
}
CLI = {"oncely.runtime.cli", "oncely.cli", "oncely.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The oncely module ``name`` refers to: itself, or the package holding the attribute."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> Iterator[str]:
    """Every oncely module ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target == "oncely" or target.startswith("oncely."):
                found = resolve(target)
                if found is not None and found != module:
                    yield found


GRAPH: dict[str, set[str]] = {m: set(imports(m)) for m in MODULES}


def layer_of(module: str) -> str:
    if module in CONTRACTS:
        return "contract"
    if module in CLI:
        return "cli"
    if module == "oncely.testing" or module.startswith("oncely.testing."):
        return "testing"
    if module.startswith("oncely.runtime."):
        return "runtime"
    if module.startswith(("oncely.brokers.", "oncely.stores.")):
        return "backend"
    if module == "oncely._version":
        # A constant that imports nothing: every layer may read it (the CLI's --version, the
        # SQS client's User-Agent).
        return "leaf"
    if module.startswith("oncely._"):
        # Private plumbing the backends share (_sqlite, _postgres, _registry, _batch, _codec,
        # _options): the backends' layer.
        return "backend"
    return "top"  # oncely/__init__.py


def test_the_scan_sees_the_package() -> None:
    assert {"oncely.errors", "oncely.brokers.amqp", "oncely.runtime.worker"} <= set(MODULES)
    assert "oncely.brokers.base" in GRAPH["oncely.brokers.amqp"]
    assert "oncely.brokers._amqp_consume" in GRAPH["oncely.brokers.amqp"]
    assert layer_of("oncely.brokers.amqp") == "backend"
    assert GRAPH["oncely._version"] == set()  # what makes it a leaf any layer may import


def test_no_module_imports_itself_back_through_any_chain() -> None:
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert cycles == [], f"import cycles: {cycles}"


def test_errors_and_contracts_import_nothing_of_oncely_but_errors() -> None:
    # Other contract modules aside: brokers/base.py re-exports the parts split out of it.
    bad = {m: GRAPH[m] - {"oncely.errors"} - CONTRACTS for m in CONTRACTS}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_backends_never_import_the_runtime_or_testing() -> None:
    bad = {
        m: {d for d in GRAPH[m] if layer_of(d) in ("runtime", "testing", "cli", "top")}
        for m in MODULES
        if layer_of(m) == "backend"
    }
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_the_runtime_never_imports_testing_or_the_cli() -> None:
    bad = {
        m: {d for d in GRAPH[m] if layer_of(d) in ("testing", "cli", "top")}
        for m in MODULES
        if layer_of(m) == "runtime"
    }
    assert {m: deps for m, deps in bad.items() if deps} == {}
