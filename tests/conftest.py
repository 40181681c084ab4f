"""Shared fixtures: every async test runs on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest

ASYNCIO_ONLY = pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio")
one_loop = pytest.mark.parametrize("anyio_backend", [ASYNCIO_ONLY])
"""For a test whose subject runs outside the test's event loop (an oncely CLI subprocess, the
status page's script in a browser): the test's own loop only sets up and checks, on paths
other tests cover on both loops, so a uvloop run of it tests nothing the asyncio one does not."""


@pytest.fixture(
    params=[
        ASYNCIO_ONLY,
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


RUN_MARK = f"t{os.getpid()}-"
"""What every name ``unique`` gives in this run starts with."""


@pytest.fixture
def unique() -> str:
    """A short name no other test (or earlier run against a long-lived server) has used."""
    return f"{RUN_MARK}{uuid.uuid4().hex[:10]}"


_FIGURES: list[str] = []


@pytest.fixture
def report() -> Callable[[str], None]:
    """Record a measured figure; all of them are printed in the run's terminal summary."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only where Kafka tests ran (they all get their URL from kafka_support): a run without
    # them must not wait on a broker it never used.
    support = sys.modules.get("tests.brokers.kafka_support")
    if support is None or not support.used:
        return
    try:
        line = f"kafka: deleted this run's {asyncio.run(support.drop_topics(RUN_MARK))} topics"
    except Exception as exc:  # the tests' verdict stands; the clean-up is housekeeping
        line = f"kafka: could not delete this run's topics: {exc!r}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")  # off the progress line
        reporter.write_sep("-", line)
