"""The transactional outbox on a real PostgreSQL and on SQLite, relayed to real brokers.

Each test has its own outbox table (agents share the PostgreSQL database). Multi-process,
crash and outage tests against RabbitMQ are in ``test_outbox_relays.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from oncely.brokers.base import Broker, Delivery, Headers, Subscription
from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.errors import ConfigError, UnknownScheme
from oncely.runtime._cli_outbox import parse_duration
from oncely.stores.outbox import Outbox, OutboxRelay
from tests._wait import eventually
from tests.stores._outbox_support import (
    PG_URL,
    FaultProxy,
    RefusingBroker,
    UserDb,
    db,
    drop,
    pg_behind_proxy,
    table_name,
)

pytestmark = pytest.mark.anyio

__all__ = ["db"]  # the fixture (from _outbox_support), used by name


async def take(sub: Subscription, n: int, within: float = 10.0) -> list[Delivery]:
    """The next ``n`` deliveries, each acked."""
    out = []
    async with asyncio.timeout(within):
        for _ in range(n):
            delivery = await sub.__anext__()
            await delivery.ack()
            out.append(delivery)
    return out


async def test_rolled_back_add_publishes_nothing_and_a_committed_one_publishes_once(
    db: UserDb, tmp_path: Path
) -> None:
    ob = db.outbox
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await db.insert_biz(conn, "order-1")
            await ob.add(conn, "orders", {"id": "order-1"}, key="k")
            raise RuntimeError("the business logic failed")
    async with db.transaction() as conn:
        await db.insert_biz(conn, "order-2")
        mid = await ob.add(conn, "orders", {"id": "order-2"}, key="k")
    # Behind the committed message in the same key, so once it arrives nothing else can.
    async with db.transaction() as conn:
        await ob.add(conn, "orders", b"sentinel", key="k")
    assert await db.fetch(f"SELECT id FROM {db.biz}") == [("order-2",)]

    # SQLite users may stay on the embedded broker; PostgreSQL ones relay to memory:// here.
    broker: Broker = (
        SqliteBroker(tmp_path / "queue.db") if ob.dialect == "sqlite" else MemoryBroker()
    )
    async with broker, OutboxRelay(ob, broker, poll=0.05) as relay:
        async with broker.consume("orders", prefetch=10, visibility=30) as sub:
            first, second = await take(sub, 2)
        await eventually(lambda: relay.stats.published == 2)
        assert await ob.pending() == 0
    assert msgspec.json.decode(first.body) == {"id": "order-2"}
    assert first.id == mid and first.headers[Headers.KEY] == "k"
    assert second.body == b"sentinel"
    # Sent rows stay until their retention (a week by default) runs out.
    rows = await db.fetch(f"SELECT attempts, sent_at IS NOT NULL FROM {ob.table} ORDER BY id")
    assert rows == [(1, True), (1, True)]


async def test_message_id_and_headers_come_from_the_row(db: UserDb) -> None:
    ob = db.outbox
    async with db.transaction() as conn:
        mine = await ob.add(conn, "t", b"\x00raw", message_id="my-id", headers={"x-a": "1"})
        auto = await ob.add(conn, "t", [1, 2])
        keyed = await ob.add(conn, "t", "s", key="order-9")
    assert mine == "my-id" and len(auto) == 32 and auto != keyed
    broker = MemoryBroker()
    async with broker, OutboxRelay(ob, broker, poll=0.05):
        async with broker.consume("t", prefetch=10, visibility=30) as sub:
            got = {d.id: d for d in await take(sub, 3)}
    assert got["my-id"].body == b"\x00raw"
    assert got["my-id"].headers["x-a"] == "1"
    # Without a key, the stable message id is the consumer's default idempotency key.
    assert got["my-id"].key == "my-id" and got[auto].key == auto
    assert got[auto].body == b"[1,2]"
    assert got[keyed].key == "order-9" and got[keyed].body == b'"s"'
    assert float(got[auto].headers[Headers.PUBLISHED_AT]) > 0


async def test_bad_input_is_refused_before_anything_is_written(db: UserDb) -> None:
    ob = db.outbox
    async with db.transaction() as conn:
        with pytest.raises(TypeError, match="cannot encode payload of type object"):
            await ob.add(conn, "t", object())
        with pytest.raises(TypeError, match="headers must map str to str"):
            await ob.add(conn, "t", {}, headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="topic"):
            await ob.add(conn, "", {})
        with pytest.raises(ValueError, match="key"):
            await ob.add(conn, "t", {}, key="")
    with pytest.raises(TypeError, match="connection"):
        await ob.add(object(), "t", {})
    assert await db.fetch(f"SELECT count(*) FROM {ob.table}") == [(0,)]

    missing = Outbox.from_url(db.url, table=table_name())
    with pytest.raises(ConfigError, match=r"migrate\(\)"):
        async with db.transaction() as conn:
            await missing.add(conn, "t", {})
    await drop(missing)


def test_urls_and_table_names_are_checked() -> None:
    with pytest.raises(UnknownScheme, match="outbox URL"):
        Outbox.from_url("redis://localhost/0")
    with pytest.raises(ConfigError, match="bad outbox table name"):
        Outbox.from_url("sqlite:///x.db", table="Orders; DROP TABLE x")
    with pytest.raises(ConfigError, match="takes no schema"):
        Outbox.from_url("sqlite:///x.db", table="main.outbox")
    with pytest.raises(ConfigError, match="unknown option"):
        Outbox.from_url("sqlite:///x.db?nope=1")
    ob = Outbox.from_url("postgresql://u:secret@db/app", table="app.outbox")
    assert "secret" not in repr(ob) and ob.table == "app.outbox"
    assert any("CREATE TABLE IF NOT EXISTS app.outbox" in s for s in ob.schema())
    with pytest.raises(ConfigError, match="batch"):
        OutboxRelay(ob, "memory://", batch=0)
    with pytest.raises(ConfigError, match="retention"):
        OutboxRelay(ob, "memory://", retention=-1)
    assert parse_duration("7d") == 7 * 86400 and parse_duration("1.5h") == 5400
    assert parse_duration("30") == 30 and parse_duration("forever") is None
    with pytest.raises(ConfigError, match="bad duration"):
        parse_duration("3 weeks")


async def test_a_failing_publish_is_retried_never_dropped_and_holds_back_only_its_key(
    db: UserDb,
) -> None:
    """While ``poison`` is refused: the rest of key k1 waits behind it, key k2 and unkeyed
    rows go through, and retention (0 s here) deletes exactly the sent rows."""
    ob = db.outbox
    async with db.transaction() as conn:
        await ob.add(conn, "poison", {"n": 1}, key="k1")
        await ob.add(conn, "ok", {"n": 2}, key="k1")
        await ob.add(conn, "ok", {"n": 3}, key="k2")
        await ob.add(conn, "ok", {"n": 4}, key="k2")
        await ob.add(conn, "ok", {"n": 5})
    broker = RefusingBroker(MemoryBroker(), refuse={"poison"})
    relay = OutboxRelay(ob, broker, poll=0.05, retention=0, retry_base=0.05, retry_cap=0.2)
    async with broker, relay:
        async with broker.consume("ok", prefetch=10, visibility=30) as sub:
            passed = [msgspec.json.decode(d.body)["n"] for d in await take(sub, 3)]
            assert passed == [3, 4, 5]
            # Retried with backoff, and never dropped: still unsent, with the last error.
            await eventually(lambda: broker.refused >= 3)

            async def purged() -> list[tuple[Any, ...]]:
                return await db.fetch(
                    f"SELECT topic, sent_at IS NULL, last_error FROM {ob.table} ORDER BY id"
                )

            rows: list[tuple[Any, ...]] = []

            async def only_unsent_left() -> bool:
                rows[:] = await purged()
                return len(rows) == 2

            await eventually_async(only_unsent_left)
            assert rows[0][:2] == ("poison", True) and "refused by the test" in rows[0][2]
            assert rows[1] == ("ok", True, None)  # never tried: it waits behind row 1
            broker.refuse.clear()
            async with broker.consume("poison", prefetch=10, visibility=30) as poison:
                await take(poison, 1)
            (late,) = await take(sub, 1)
            assert msgspec.json.decode(late.body) == {"n": 2}

            async def empty() -> bool:
                return not await purged()

            await eventually_async(empty)
    attempts = relay.stats.failed
    assert attempts == broker.refused and relay.stats.published == 5


async def eventually_async(cond: Any, within: float = 10.0) -> None:
    """``eventually`` for an async condition."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await cond():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


async def test_an_add_wakes_an_idle_relay_long_before_its_poll(db: UserDb) -> None:
    """PostgreSQL: LISTEN/NOTIFY, delivered on commit. SQLite: an add in this process wakes
    the relay directly. The poll is 30 s; delivery within 15 s proves the wake-up (and leaves
    a loaded machine room for the notification, the claim and the publish)."""
    ob = db.outbox
    broker = MemoryBroker()
    async with broker, OutboxRelay(ob, broker, poll=30.0) as relay:
        backend: Any = ob.backend
        if ob.dialect == "postgresql":
            await eventually(lambda: backend.listening)
        # The relay is idle now: its first look found nothing.
        await eventually(lambda: relay.stats.published == 0 and relay.idle)
        async with broker.consume("t", prefetch=10, visibility=30) as sub:
            for n in range(3):
                async with db.transaction() as conn:
                    await ob.add(conn, "t", {"n": n})
                (d,) = await take(sub, 1, within=15.0)
                assert msgspec.json.decode(d.body) == {"n": n}
                await eventually(lambda: relay.idle)


@pytest.mark.parametrize("relays", [3])
async def test_per_key_order_with_several_relays(db: UserDb, relays: int) -> None:
    """Three relays race over one table in small batches; every key's rows reach the broker
    once each and in the order they were added."""
    ob = db.outbox
    keys, per_key = 12, 25
    sequence = [(f"k{i % keys}", i // keys) for i in range(keys * per_key)]
    # Publishes that take a while, so that the relays' batches overlap.
    broker = RefusingBroker(MemoryBroker(), slow=0.003)
    outboxes = [Outbox.from_url(db.url, table=ob.table) for _ in range(relays)]
    started = [OutboxRelay(o, broker, batch=7, poll=0.02) for o in outboxes]
    async with broker:
        for relay in started:
            await relay.start()
        try:
            # Added in small transactions while the relays run, so claims interleave.
            for i in range(0, len(sequence), 10):
                async with db.transaction() as conn:
                    for key, seq in sequence[i : i + 10]:
                        await ob.add(conn, "ordered", {"key": key, "seq": seq}, key=key)
            async with broker.consume("ordered", prefetch=1, visibility=30) as sub:
                got = [msgspec.json.decode(d.body) for d in await take(sub, len(sequence), 60)]
        finally:
            for relay in started:
                await relay.stop()
    by_key: dict[str, list[int]] = {}
    for message in got:
        by_key.setdefault(message["key"], []).append(message["seq"])
    assert by_key == {f"k{k}": list(range(per_key)) for k in range(keys)}
    assert sum(r.stats.published for r in started) == len(sequence)


async def test_the_relay_listens_again_after_its_listen_connection_is_killed(
    tmp_path: Path, anyio_backend: object
) -> None:
    ob = Outbox.from_url(PG_URL, table=table_name())
    await ob.migrate()
    user = UserDb(ob, PG_URL)
    await user.open()
    broker = MemoryBroker()
    try:
        async with broker, OutboxRelay(ob, broker, poll=30.0) as relay:
            backend: Any = ob.backend
            await eventually(lambda: backend.listening)
            killed = await user.conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                f"oncely-outbox-relay:{os.getpid()}",
            )
            assert killed == 1
            await eventually(lambda: not backend.listening)
            await eventually(lambda: backend.listening and relay.idle)
            async with broker.consume("t", prefetch=10, visibility=30) as sub:
                async with user.transaction() as conn:
                    await ob.add(conn, "t", {"n": 1})
                (d,) = await take(sub, 1, within=15.0)  # the poll is 30 s
            assert msgspec.json.decode(d.body) == {"n": 1}
    finally:
        await user.close()
        await drop(ob)


async def test_sqlite_rows_of_a_relay_that_died_are_taken_over_when_its_lease_ends(
    tmp_path: Path, anyio_backend: object
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    ob = Outbox.from_url(url, table=table_name())
    await ob.migrate()
    user = UserDb(ob, url)
    await user.open()
    async with user.transaction() as conn:
        for n in range(3):
            await ob.add(conn, "t", {"n": n}, key="k")
    await user.close()
    # A relay that claimed everything with a short lease, then died without a word.
    dead = Outbox.from_url(url, table=ob.table)
    await dead.connect()
    claim = await dead.backend.claim(10, 0.5)
    assert [r.id for r in claim.rows] == [1, 2, 3]
    await dead.aclose()
    broker = MemoryBroker()
    async with broker, OutboxRelay(ob, broker, poll=0.05) as relay:
        async with broker.consume("t", prefetch=10, visibility=30) as sub:
            got = [msgspec.json.decode(d.body)["n"] for d in await take(sub, 3)]
        await eventually(lambda: relay.stats.published == 3)
    assert got == [0, 1, 2]


def test_cli_exit_codes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    broker = f"sqlite:///{tmp_path / 'queue.db'}"  # the CLI refuses memory:// (lost messages)
    base = [sys.executable, "-m", "oncely", "outbox", "relay", "--broker", broker]
    bad = subprocess.run(
        [*base, "--db", "sqlite:///x.db", "--retention", "soon"], capture_output=True, env=env
    )
    assert bad.returncode == 2 and b"bad duration 'soon'" in bad.stderr
    assert b"Traceback" not in bad.stderr
    scheme = subprocess.run([*base, "--db", "mysql://db/x"], capture_output=True, env=env)
    assert scheme.returncode == 2 and b"unknown outbox URL" in scheme.stderr
    down = subprocess.run(
        [*base, "--db", "postgresql://oncely:oncely@127.0.0.1:1/oncely"],
        capture_output=True,
        env=env,
    )
    assert down.returncode == 1 and b"StoreUnavailable" in down.stderr
    assert b"Traceback" not in down.stderr


async def test_the_relay_rides_out_a_database_outage(
    tmp_path: Path, anyio_backend: object, report: Callable[[str], None]
) -> None:
    """PostgreSQL behind a TCP fault proxy, cut mid-run (the shared server keeps running):
    the relay counts errors, backs off, reconnects, and every row arrives with its id."""
    proxy, via_proxy = await pg_behind_proxy(FaultProxy)
    ob = Outbox.from_url(PG_URL, table=table_name())
    await ob.migrate()
    user = UserDb(ob, PG_URL)
    await user.open()
    rows = 600
    ids: dict[int, str] = {}
    for i in range(0, rows, 50):
        async with user.transaction() as conn:
            for n in range(i, i + 50):
                ids[n] = await ob.add(conn, "t", {"n": n}, key=f"k{n % 5}")
    broker = RefusingBroker(MemoryBroker(), slow=0.01)
    relay = OutboxRelay(
        Outbox.from_url(via_proxy, table=ob.table), broker, batch=20, poll=0.05, retry_cap=0.5
    )
    got: dict[int, set[str]] = {}
    try:
        async with broker, relay:
            async with broker.consume("t", prefetch=100, visibility=30) as sub:

                async def drain() -> None:
                    async for d in sub:
                        got.setdefault(msgspec.json.decode(d.body)["n"], set()).add(d.id)
                        await d.ack()

                consumer = asyncio.create_task(drain())
                await eventually(lambda: relay.stats.published >= rows // 4, within=60)
                proxy.cut()
                await eventually(lambda: relay.stats.errors >= 2, within=60)
                published_at_cut = relay.stats.published
                proxy.restore()

                async def none_pending() -> bool:
                    (row,) = await user.fetch(
                        f"SELECT count(*) FROM {ob.table} WHERE sent_at IS NULL"
                    )
                    return bool(row[0] == 0)

                await eventually_async(none_pending, within=60)
                await eventually(lambda: len(got) == rows, within=30)
                consumer.cancel()
    finally:
        await proxy.aclose()
        await user.close()
        await drop(ob)
    report(
        f"[outbox db outage] {rows} rows; PostgreSQL cut after {published_at_cut} "
        f"published: {relay.stats.errors} relay errors, all {rows} delivered"
    )
    assert sorted(got) == list(range(rows))
    assert all(got[n] == {ids[n]} for n in got)  # every copy of a row carried its one id
