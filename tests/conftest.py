"""Shared fixtures: every async test runs on asyncio and on uvloop."""

from __future__ import annotations

import os
import uuid
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
