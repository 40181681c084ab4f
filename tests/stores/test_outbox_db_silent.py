"""A PostgreSQL that stops answering without closing anything (a host that froze, a network
partition: no RST, no FIN) must not stall the outbox relay for good.

The relay's own statements (claim, marks, commit, retention, backlog) carry a timeout: a
statement that gets no answer fails the batch (``StoreUnavailable``, counted in
``RelayStats.errors``, its connection dropped), and the relay carries on with fresh
connections once the database answers again. Before, those statements had no bound, and the
relay waited on a dead connection with no log line for as long as the kernel kept it open
(for ever, when nothing was left to retransmit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest

import oncely.stores._outbox_pg as outbox_pg
from oncely.brokers.memory import MemoryBroker
from oncely.errors import StoreUnavailable
from oncely.stores.outbox import Outbox, OutboxRelay
from tests._wait import eventually
from tests.stores._freeze import pg_behind_freezing_proxy
from tests.stores._outbox_support import PG_URL, UserDb, drop, table_name

pytestmark = pytest.mark.anyio


async def test_a_relay_whose_database_stops_answering_errors_out_and_resumes(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: object, report: Callable[[str], None]
) -> None:
    monkeypatch.setattr(outbox_pg, "STATEMENT_TIMEOUT", 1.0)
    proxy, via_proxy = await pg_behind_freezing_proxy()
    ob = Outbox.from_url(PG_URL, table=table_name())
    await ob.migrate()
    user = UserDb(ob, PG_URL)  # the application reaches the database directly
    await user.open()
    broker = MemoryBroker()
    relay = OutboxRelay(
        Outbox.from_url(via_proxy, table=ob.table),
        broker,
        poll=0.05,
        retry_cap=0.5,
        retention=0.5,  # the retention sweep meets the frozen database too
    )
    got: list[int] = []
    try:
        async with broker:
            await relay.start()
            try:
                async with broker.consume("t", prefetch=10, visibility=30) as sub:

                    async def drain() -> None:
                        async for d in sub:
                            got.append(msgspec.json.decode(d.body)["n"])
                            await d.ack()

                    consumer = asyncio.create_task(drain())
                    async with user.transaction() as conn:
                        await ob.add(conn, "t", {"n": 1}, key="k")
                    await eventually(lambda: got == [1])
                    proxy.freeze()
                    async with user.transaction() as conn:
                        await ob.add(conn, "t", {"n": 2}, key="k")
                    # The next claim meets the silence: it must fail, not wait for ever.
                    await eventually(lambda: relay.stats.errors >= 1, within=20)
                    errors = relay.stats.errors
                    proxy.thaw()
                    # Row 1 again too, when the freeze caught its mark: same id, absorbed.
                    await eventually(lambda: 2 in got, within=30)
                    consumer.cancel()
            finally:
                await relay.stop(grace=1.0)
    finally:
        await proxy.aclose()
        await user.close()
        await drop(ob)
    assert set(got) == {1, 2} and got.index(1) < got.index(2)
    report(
        f"[outbox db silent] relay errors while PostgreSQL was silent: {errors}; delivered {got}"
    )


async def test_a_backlog_read_that_meets_a_silent_database_fails_within_bounds(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: object
) -> None:
    """``pending``/``backlog``/``purge`` (the metrics sampler and the retention sweep) give
    their connection back within the bound too; after their statement timed out, the pool's
    own ``fetch`` waited for the server to answer the cancel request, for ever."""
    monkeypatch.setattr(outbox_pg, "STATEMENT_TIMEOUT", 1.0)
    proxy, via_proxy = await pg_behind_freezing_proxy()
    ob = Outbox.from_url(PG_URL, table=table_name())
    await ob.migrate()
    watched = Outbox.from_url(via_proxy, table=ob.table)
    try:
        await watched.connect()
        assert await watched.pending() == 0
        proxy.freeze()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(20):  # the test's bound, far above the outbox's
                await watched.pending()
        proxy.thaw()
        assert await watched.backlog() == (0, None)
        assert await watched.backend.purge(0.0, 10) == 0
    finally:
        proxy.thaw()
        await watched.aclose()
        await proxy.aclose()
        await drop(ob)
