"""``Context.produce``: its per-class check of ``TransactionalDelivery`` and the
``oncely-published-at`` text it reuses for a millisecond (``oncely.runtime.context``)."""

from __future__ import annotations

import time

import pytest

import oncely
from oncely.runtime import context
from tests._wait import eventually


def test_published_at_is_reused_for_a_millisecond_and_read_afresh_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])  # context reads time.time()
    monkeypatch.setattr(context, "_stamp", (0.0, ""))
    assert context._published_at() == "1000.0"
    now[0] = 1000.0009
    assert context._published_at() == "1000.0", "within the millisecond: the same text"
    now[0] = 1000.0015
    assert context._published_at() == "1000.0015"
    now[0] = 999.5  # the clock went back: never a text from the future
    assert context._published_at() == "999.5"
    now[0] = 999.5004
    assert context._published_at() == "999.5"


@pytest.mark.anyio
async def test_produce_on_a_delivery_without_transactions_publishes(unique: str) -> None:
    # The memory broker's deliveries are not TransactionalDelivery: ``produce`` is
    # ``publish``, whether or not the class was seen (and cached) before.
    app = oncely.App()
    got: list[tuple[int, str | None]] = []

    @app.handler(f"{unique}-in")
    async def copy(n: int, ctx: oncely.Context) -> None:
        await ctx.produce(f"{unique}-out", n * 10, key=f"k{n}")

    @app.handler(f"{unique}-out")
    async def sink(n: int, ctx: oncely.Context) -> None:
        got.append((n, ctx.headers.get("oncely-key")))

    async with oncely.Worker(app, broker="memory://") as worker:
        for n in range(3):
            await app.publish(f"{unique}-in", n)
        await eventually(lambda: len(got) == 3, 30)
        assert worker.stats.processed == 6
    assert sorted(got) == [(0, "k0"), (10, "k1"), (20, "k2")]
