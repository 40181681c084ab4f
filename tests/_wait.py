"""Bounded waiting for tests: a condition polled until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(cond: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``cond()`` holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
