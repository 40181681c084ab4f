"""Errors no broker can carry as they are: an exception message of 300,000 characters (an
HTTP error quoting a response body) and one holding a lone surrogate (bytes decoded with
``surrogateescape``). The retry and the dead letter still happen, on every broker, with the
error clipped and escaped; before, the AMQP reject broke the connection (frame too large) and
the message came back for ever, and every driver refused the surrogate."""

from __future__ import annotations

from typing import Any

import pytest

import oncely
from oncely.brokers.base import (
    ERROR_LIMIT,
    REASON_LIMIT,
    DeadLetterAdmin,
    Headers,
    clip_error,
)
from tests._wait import eventually
from tests.brokers.test_dlq_errors import BROKERS, dead_letters, target

__all__ = ["target"]  # the fixture, used by name

pytestmark = pytest.mark.anyio

HUGE = "x" * 300_000 + " \udcff end"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("target", BROKERS, indirect=True)
async def test_a_huge_undecodable_error_is_retried_and_dead_lettered(
    target: tuple[str, str, str],
) -> None:
    _, url, topic = target
    app = oncely.App()
    seen: list[tuple[str | None, str | None]] = []

    @app.handler(topic, retry=oncely.RetryPolicy(max_attempts=2, base=0.01, cap=0.01))
    async def fail(payload: dict[str, Any], ctx: oncely.Context) -> None:
        headers = ctx.delivery.headers
        seen.append((headers.get(Headers.FIRST_ERROR), headers.get(Headers.LAST_ERROR)))
        raise ValueError(HUGE)

    async with oncely.Worker(app, broker=url) as worker:
        admin = worker.broker
        assert isinstance(admin, DeadLetterAdmin) and admin is not None
        await app.publish(topic, {"n": 1})
        await eventually(lambda: worker.stats.dead_lettered == 1, within=60)
        # Counted when the reject returned; on Kafka exactly-once the dead letter commits
        # with the partition's next transaction, and read_committed shows it only then.
        letters = await dead_letters(admin, topic)
        carries = admin.capabilities.carries_errors
        assert worker.stats.settle_errors == 0

    assert len(seen) == 2
    if carries:
        first, last = seen[1]
        assert first == last == clip_error(f"ValueError: {HUGE}")
        assert first is not None and len(first) == ERROR_LIMIT
    [letter] = letters
    assert len(letter.reason) == REASON_LIMIT
    assert letter.reason.startswith("ValueError: xxx")
    assert letter.reason.endswith(" \\udcff end (gave up after 2 attempts)")


def test_clip_error_escapes_then_clips_keeping_the_tail() -> None:
    assert clip_error("ok é") == "ok é"
    assert clip_error("a\udcffb") == "a\\udcffb"
    assert clip_error("abcdefghij", 5) == "abcd…"
    assert clip_error("abcdefghij", 5, tail=2) == "ab…ij"
    assert clip_error("abc", 5, tail=2) == "abc"
