"""Shared fixtures: every async test runs on asyncio and on uvloop."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


@pytest.fixture
def unique() -> str:
    """A short name no other test (or earlier run against a long-lived server) has used."""
    return f"t{os.getpid()}-{uuid.uuid4().hex[:10]}"


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
