"""Two handlers of one topic compete for its messages (README, Keys): each message goes to
one of them, so a duplicate reaching the other is not absorbed. The worker says so at start
when one of them is effectively-once."""

from __future__ import annotations

import logging

import pytest

import oncely
from tests._wait import eventually

pytestmark = pytest.mark.anyio


def _app(topic: str, *, idempotent: bool) -> tuple[oncely.App, dict[str, int]]:
    app = oncely.App()
    runs = {"a": 0, "b": 0}

    @app.handler(topic, name="a", idempotent=idempotent, key="payload:id")
    async def a(_: dict[str, str]) -> None:
        runs["a"] += 1

    @app.handler(topic, name="b", idempotent=idempotent, key="payload:id")
    async def b(_: dict[str, str]) -> None:
        runs["b"] += 1

    return app, runs


async def test_effectively_once_handlers_sharing_a_topic_are_warned_about(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "oncely.worker")
    app, runs = _app(unique, idempotent=True)
    url = f"memory://{unique}"
    async with oncely.Worker(app, broker=url, store=url) as worker:
        for _ in range(10):
            await app.publish(unique, {"id": "same"})
        await eventually(lambda: worker.stats.acked == 10)
    # What the warning is about: each copy went to one handler, each deduped on its own (one
    # key, an effect in every handler that got a copy).
    assert runs["a"] <= 1 and runs["b"] <= 1 and runs["a"] + runs["b"] >= 1
    (line,) = [r.getMessage() for r in caplog.records if "share topic" in r.getMessage()]
    assert f"handlers a, b share topic {unique!r}" in line, line


async def test_at_least_once_handlers_sharing_a_topic_are_not_warned_about(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "oncely.worker")
    app, _ = _app(unique, idempotent=False)
    async with oncely.Worker(app, broker=f"memory://{unique}"):
        pass
    assert not [r for r in caplog.records if "share topic" in r.getMessage()]
