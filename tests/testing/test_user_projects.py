"""``oncely.testing`` and the memory broker in a user's project, under each way asyncio projects
run their tests: anyio's pytest plugin, pytest-asyncio in strict mode, and in auto mode.

Each case writes a small project to a temporary directory and runs pytest on it in a
subprocess, with the project's own settings: conformance subclasses over ``memory://`` and a
few tests of an app on a ``memory://`` worker, as a user would write them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUITES = """
import uuid

import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.stores.memory import MemoryStore
from oncely.testing import (
    BrokerConformance, BrokerFactory, BrokerFeatures, StoreConformance, StoreFactory,
    StoreFeatures,
)


class TestMyMemoryBroker(BrokerConformance):
    features = BrokerFeatures(latency=1.0)

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        hub = f"h-{uuid.uuid4().hex}"

        async def make() -> MemoryBroker:
            broker = MemoryBroker.from_url(f"memory://{hub}")
            await broker.connect()
            return broker

        return make


class TestMyMemoryStore(StoreConformance):
    features = StoreFeatures()

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        url = f"memory://s-{uuid.uuid4().hex}"
        return lambda: MemoryStore.from_url(url)
"""

APP_TESTS = """
import asyncio

import pytest

import oncely
from oncely.brokers.memory import MemoryBroker

{mark}


async def run(n: int, broker: object) -> list[int]:
    app = oncely.App(idempotent=True)
    seen: list[int] = []

    @app.handler("jobs")
    async def handle(job: dict[str, int]) -> None:
        seen.append(job["n"])

    async with oncely.Worker(app, broker=broker) as worker:
        for _ in range(2):  # the second is a duplicate the store absorbs
            await app.publish("jobs", {{"n": n}}, key=f"k{{n}}")
        async with asyncio.timeout(10):
            while worker.stats.processed + worker.stats.duplicates < 2:
                await asyncio.sleep(0.01)
    return seen


# Each test runs on its own event loop; the default memory hub outlives them all.
async def test_default_hub_first() -> None:
    assert await run(1, "memory://") == [1]


async def test_default_hub_again_on_another_loop() -> None:
    assert await run(2, "memory://") == [2]


async def test_private_broker_instance() -> None:
    assert await run(3, MemoryBroker()) == [3]
"""

LOOP_SCOPE = ["-o", "asyncio_default_fixture_loop_scope=function"]  # else pytest-asyncio warns

EXPLICIT_PLUGINS = ["-p", "anyio.pytest_plugin", "-p", "pytest_asyncio.plugin"]

# pytest's "in 12.34s", and past a minute (a loaded machine) "in 61.02s (0:01:01)".
TOOK = r"in [\d.]+s(?: \(\d+:\d\d:\d\d\))?"

MODES = {
    # anyio's plugin alone; pytest-asyncio is not in this project.
    "anyio": ("pytestmark = pytest.mark.anyio", ["-p", "no:asyncio"], {}),
    "pytest-asyncio-strict": (
        "pytestmark = pytest.mark.asyncio",
        ["-p", "asyncio", "-o", "asyncio_mode=strict", *LOOP_SCOPE],
        {},
    ),
    "pytest-asyncio-auto": ("", ["-p", "asyncio", "-o", "asyncio_mode=auto", *LOOP_SCOPE], {}),
    # A project that turns plugin autoloading off names both plugins, as README says.
    "no-autoload-strict": (
        "pytestmark = pytest.mark.asyncio",
        [*EXPLICIT_PLUGINS, "-o", "asyncio_mode=strict", *LOOP_SCOPE],
        {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_suites_and_memory_broker_in_a_user_project(tmp_path: Path, mode: str) -> None:
    mark, args, env = MODES[mode]
    project = tmp_path / f"proj_{uuid.uuid4().hex[:8]}"
    project.mkdir()
    (project / "pytest.ini").write_text(
        textwrap.dedent(
            """\
            [pytest]
            addopts = --strict-markers -p no:cacheprovider
            filterwarnings = error
            """
        )
    )
    (project / "test_suites.py").write_text(SUITES)
    (project / "test_app.py").write_text(APP_TESTS.format(mark=mark))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ONCELY_"))}

    def pytest_(*extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", *args, *extra],
            capture_output=True,
            text=True,
            cwd=project,
            env={**base, **env},
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    collected = re.fullmatch(rf"(\d+) tests collected {TOOK}", pytest_("--collect-only"))
    assert collected and int(collected.group(1)) > 30
    summary = pytest_()
    # Every collected case passed once: nothing skipped, failed, run twice or warned about.
    assert re.fullmatch(rf"{collected.group(1)} passed {TOOK}", summary), summary


def test_without_anyio_plugin_the_suites_do_not_pass_silently(tmp_path: Path) -> None:
    """Autoloading off and no ``-p anyio``: the run fails; nothing is skipped as passed."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "test_suites.py").write_text(SUITES)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ONCELY_"))}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=project,
        env={**base, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        timeout=300,
    )
    assert out.returncode == 1, out.stdout[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ (failed|errors?)", summary), summary
