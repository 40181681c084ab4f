"""Every third-party package oncely imports is declared in pyproject.toml (core or an extra),
not merely installed because another package depends on it today: a new release of that
package may drop it, and oncely would then fail to import on a clean install."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distribution names in ``dependencies`` and the user-facing extras (not ``dev``)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(meta["dependencies"])
    for extra, deps in meta["optional-dependencies"].items():
        if extra != "dev":
            specs += deps
    return {_norm(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs}


def imported() -> dict[str, set[str]]:
    """Top-level third-party modules imported at run time (not under ``TYPE_CHECKING``), with
    the files that import them."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "oncely").rglob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "oncely" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared() -> None:
    providers = packages_distributions()
    names = declared()
    found = imported()
    assert {"msgspec", "aio_pika", "aiokafka", "redis"} <= set(found)  # the scan sees imports
    undeclared = {
        module: sorted(files)
        for module, files in found.items()
        if not {_norm(d) for d in providers.get(module, [])} & names
    }
    assert undeclared == {}
