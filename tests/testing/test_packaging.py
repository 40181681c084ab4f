"""``oncely.testing`` is an extra: its dependencies are declared there, and only there."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import oncely.testing

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "oncely"


def project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        data: dict[str, object] = tomllib.load(fh)["project"]
    return data


def test_the_testing_extra_declares_what_oncely_testing_imports() -> None:
    meta = project()
    extras = meta["optional-dependencies"]
    assert isinstance(extras, dict)
    assert sorted(d.split(">")[0] for d in extras["testing"]) == ["anyio", "pytest"]
    assert any("testing" in d for d in extras["dev"]), "dev must include the testing extra"
    core = meta["dependencies"]
    assert isinstance(core, list)
    assert not [d for d in core if d.startswith(("anyio", "pytest"))]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_only_oncely_testing_imports_anyio_or_pytest() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts]
    assert len(core) > 20
    offenders = {str(p.relative_to(ROOT)) for p in core if imports(p) & {"anyio", "pytest"}}
    assert offenders == set()


@pytest.mark.parametrize("missing", ["pytest", "anyio"])
def test_importing_oncely_testing_without_the_extra_names_it(missing: str) -> None:
    # A None entry in sys.modules makes that import fail, as if it were not installed.
    code = f"import sys; sys.modules[{missing!r}] = None\nimport oncely.testing\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"oncely.errors.MissingExtra: oncely.testing needs the {missing!r} package, which is "
        "not installed; run: pip install 'oncely[testing]'"
    )
    # And oncely itself imports fine without them.
    code = f"import sys; sys.modules[{missing!r}] = None\nimport oncely, oncely.runtime.cli\n"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_the_suite_modules_are_assert_rewritten() -> None:
    """A failed assert inside a case shows its values, in every module the suite is split into."""
    modules = [
        "oncely.testing.brokers",
        "oncely.testing._broker_base",
        "oncely.testing._broker_delivery",
        "oncely.testing._broker_settle",
        "oncely.testing._broker_visibility",
        "oncely.testing._broker_dlq",
        "oncely.testing.runtime",
        "oncely.testing.stores",
        "oncely.testing._store_base",
        "oncely.testing._store_tx",
        "oncely.testing._store_processes",
    ]
    suite_files = {p.stem for p in (PACKAGE / "testing").glob("*.py")} - {"__init__", "_select"}
    assert {m.rsplit(".", 1)[1] for m in modules} >= suite_files
    for name in modules:
        assert "@pytest_ar" in vars(sys.modules[name]), f"{name} is not assert-rewritten"
    assert oncely.testing.BrokerConformance.__module__ == "oncely.testing.brokers"
