"""Outbox fixes found in review: lease-bounded batches, per-row dedupe under one key, a
second stop, a signal during start, and PostgreSQL marks timed at the mark."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

import oncely
from oncely.brokers.base import Headers
from oncely.brokers.memory import MemoryBroker
from oncely.stores.outbox import Outbox, OutboxRelay
from tests._wait import eventually
from tests.stores._outbox_support import (
    PG_URL,
    RefusingBroker,
    UserDb,
    db,
    drop,
    table_name,
)
from tests.stores.test_outbox import eventually_async

pytestmark = pytest.mark.anyio


__all__ = ["db"]  # the fixture (from _outbox_support), used by name


async def test_sqlite_a_batch_slower_than_its_lease_stops_in_time_no_takeover(
    tmp_path: Path, anyio_backend: object
) -> None:
    """A SQLite claim is a lease that nobody renews. A batch whose publishes outlast it would
    be claimed again by a second relay while the first still publishes: every row of the key
    twice, out of order. The relay stops starting publishes halfway through its lease and
    releases the rest, so each row reaches the broker once, in order.

    The lease is seconds, not tenths: what keeps a batch out of the next relay's claim is the
    half lease between the last publish a batch starts and the lease's end, and a loaded CI
    machine has stalled this process for more than 0.3 s (a 0.6 s lease failed there)."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    ob = Outbox.from_url(url, table=table_name())
    await ob.migrate()
    user = UserDb(ob, url)
    await user.open()
    rows = 20
    async with user.transaction() as conn:
        for n in range(rows):
            await ob.add(conn, "t", {"n": n}, key="k")
    await user.close()
    published: list[int] = []

    class Recording(RefusingBroker):
        async def publish(
            self,
            topic: str,
            body: bytes,
            *,
            headers: Any = None,
            message_id: str | None = None,
            delay: float = 0.0,
        ) -> str:
            await asyncio.sleep(0.2)  # a broker far away
            mid = await super().publish(topic, body, headers=headers, message_id=message_id)
            published.append(msgspec.json.decode(body)["n"])
            return mid

    # 4 s of publishing for the key, against a 3 s lease.
    broker = Recording(MemoryBroker())
    relays = [
        OutboxRelay(Outbox.from_url(url, table=ob.table), broker, batch=100, poll=0.02)
        for _ in range(2)
    ]
    async with broker:
        for relay in relays:
            relay.lease = 3.0
            await relay.start()
        try:

            async def all_sent_and_idle() -> bool:
                return await relays[0].outbox.pending() == 0 and all(r.idle for r in relays)

            await eventually_async(all_sent_and_idle, within=60)
        finally:
            for relay in relays:
                await relay.stop()
    assert published == list(range(rows))
    # More than one batch: the first one did stop at half its lease.
    assert sum(r.stats.batches for r in relays) >= 2


async def test_distinct_messages_under_one_key_each_run_once_at_a_default_consumer(
    db: UserDb,
) -> None:
    """``key`` orders several distinct messages ("placed", then "shipped" for one order); a
    consumer with the default key source runs each once, and absorbs a re-publish of either
    (the relay's crash window: published, not marked)."""
    ob = db.outbox
    ids = []
    for event in ("placed", "shipped"):
        async with db.transaction() as conn:
            ids.append(await ob.add(conn, "orders", {"event": event}, key="order-1"))
    effects: list[str] = []
    keys: list[str | None] = []
    app = oncely.App("orders-consumer")

    @app.handler("orders", idempotent=True, concurrency=1)
    async def on_order(payload: dict[str, str], ctx: oncely.Context) -> None:
        effects.append(payload["event"])
        keys.append(ctx.delivery.headers.get(Headers.KEY))

    broker = MemoryBroker()
    async with broker, oncely.Worker(app, broker=broker, store=f"memory://{ob.table}") as worker:

        def settled() -> int:
            s = worker.stats
            return s.processed + s.duplicates + s.dead_lettered

        async with OutboxRelay(ob, broker, poll=0.05):
            await eventually(lambda: settled() == 2)
            # Both rows again, with the same ids: as after a relay died before its mark.
            await db.conn.execute(f"UPDATE {ob.table} SET sent_at = NULL")
            await eventually(lambda: settled() == 4)
    assert effects == ["placed", "shipped"]
    assert keys == ["order-1", "order-1"]  # still the key brokers group and order by
    assert worker.stats.duplicates == 2 and worker.stats.dead_lettered == 0


async def test_a_second_stop_with_no_grace_stops_a_relay_stuck_in_a_batch(
    tmp_path: Path, anyio_backend: object
) -> None:
    """The CLI's second signal: ``stop(0)`` while a ``stop(grace)`` waits for a batch whose
    publish hangs. Both return, the relay is stopped, and the batch is released unsent."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    ob = Outbox.from_url(url, table=table_name())
    await ob.migrate()
    user = UserDb(ob, url)
    await user.open()
    async with user.transaction() as conn:
        await ob.add(conn, "t", {"n": 1}, key="k")
    await user.close()
    hung = asyncio.Event()

    class Hanging(RefusingBroker):
        async def publish(self, topic: str, body: bytes, **kwargs: Any) -> str:
            hung.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    broker = Hanging(MemoryBroker())
    relay = OutboxRelay(ob, broker, poll=0.05, publish_timeout=3600)
    async with broker:
        await relay.start()
        async with asyncio.timeout(10):
            await hung.wait()
        first = asyncio.ensure_future(relay.stop(grace=3600))
        await eventually(lambda: relay._stopping is not None and relay._stopping.is_set())
        async with asyncio.timeout(10):
            await relay.stop(0)
            await first
            await relay.wait_stopped()
    assert relay.stats.published == 0
    async with Outbox.from_url(url, table=ob.table) as check:
        assert await check.pending() == 1
        (row,) = (await check.backend.claim(10, 60)).rows  # released: claimable at once
        assert row.key == "k"


async def test_cli_sigterm_while_the_relay_is_still_connecting_exits_0(
    anyio_backend: object, tmp_path: Path
) -> None:
    """A pod stopped while its relay starts: the database accepts the connection but never
    answers (the relay is inside ``start()``). SIGTERM gives up the start and exits 0,
    instead of killing the process with the default action."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def black_hole(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    cmd = [
        sys.executable, "-m", "oncely", "outbox", "relay",
        "--broker", f"sqlite:///{tmp_path / 'queue.db'}",
        "--db", f"postgresql://oncely:oncely@127.0.0.1:{port}/oncely",
    ]  # fmt: skip
    proc = spawn(cmd, env)
    try:
        async with asyncio.timeout(60):
            await accepted.wait()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)


async def test_postgresql_a_failed_row_backs_off_from_when_it_failed_not_from_the_claim(
    anyio_backend: object,
) -> None:
    """The claim transaction stays open while its batch publishes; a failure's backoff (and
    a mark) must count from the moment it is recorded, not from the claim's ``now()``."""
    ob = Outbox.from_url(PG_URL, table=table_name())
    await ob.migrate()
    user = UserDb(ob, PG_URL)
    await user.open()
    release = asyncio.Event()

    class Gated(RefusingBroker):
        async def publish(self, topic: str, body: bytes, **kwargs: Any) -> str:
            if topic == "slow":
                await release.wait()
            return await super().publish(topic, body, **kwargs)

    try:
        async with user.transaction() as conn:
            await ob.add(conn, "slow", {"n": 1}, key="a")
            await ob.add(conn, "bad", {"n": 2}, key="b")
        broker = Gated(MemoryBroker(), refuse={"bad"})
        relay = OutboxRelay(ob, broker, poll=0.05, retry_base=3600, retry_cap=3600)
        async with broker, relay:
            await eventually(lambda: broker.refused == 1)
            # The failure happened after this instant, inside the claim still held open.
            after_failure = await user.conn.fetchval("SELECT clock_timestamp()")
            release.set()
            await eventually(lambda: relay.stats.published == 1)
        available_at = await user.conn.fetchval(
            f"SELECT available_at FROM {ob.table} WHERE topic = 'bad'"
        )
        assert (available_at - after_failure).total_seconds() >= 3600
    finally:
        await user.close()
        await drop(ob)


async def test_a_row_with_undecodable_headers_fails_alone_and_does_not_stop_the_outbox(
    db: UserDb,
) -> None:
    """A row written around ``add`` (a migration, hand-written SQL) with headers that are not
    a JSON object of strings: it is recorded as failed, holding back its own key only, and
    the rows after it are published."""
    ob = db.outbox
    bad = '{"x-count": 1}'
    async with db.transaction() as conn:
        if ob.dialect == "postgresql":
            await conn.execute(
                f"INSERT INTO {ob.table} (message_id, topic, key, headers, body)"
                " VALUES ('bad', 't', 'k1', $1::jsonb, '\\x7b7d')",
                bad,
            )
        else:
            await conn.execute(
                f"INSERT INTO {ob.table} (message_id, topic, key, headers, body, created_at)"
                " VALUES ('bad', 't', 'k1', ?, x'7b7d', 0)",
                (bad,),
            )
        await ob.add(conn, "t", {"n": 1}, key="k2")
        await ob.add(conn, "t", {"n": 2})
    broker = MemoryBroker()
    async with broker, OutboxRelay(ob, broker, poll=0.05, retry_base=3600, retry_cap=3600):
        async with broker.consume("t", prefetch=10, visibility=30) as sub:
            got = []
            async with asyncio.timeout(10):
                for _ in range(2):
                    d = await sub.__anext__()
                    await d.ack()
                    got.append(msgspec.json.decode(d.body)["n"])
    assert sorted(got) == [1, 2]
    rows = await db.fetch(f"SELECT sent_at IS NULL, attempts, last_error FROM {ob.table}")
    unsent = [r for r in rows if r[0]]
    assert len(unsent) == 1 and unsent[0][1] == 1
    assert "undecodable headers" in unsent[0][2]


async def test_an_unexpected_error_in_the_relay_loop_is_logged_with_its_traceback(
    tmp_path: Path, anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay loop retries every failure itself, so the supervisor never sees it: a bug
    (not a database or broker error) must still reach the log with its traceback."""
    ob = Outbox.from_url(f"sqlite:///{tmp_path / 'app.db'}", table=table_name())
    broker = MemoryBroker()
    relay = OutboxRelay(ob, broker, poll=0.05, retry_base=0.05)
    async with broker, relay:
        backend: Any = ob.backend
        real = backend.claim
        calls = 0

        async def claim_with_a_bug(limit: int, lease: float) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ZeroDivisionError("a bug")
            return await real(limit, lease)

        backend.claim = claim_with_a_bug
        relay._wake.set()  # type: ignore[union-attr]
        await eventually(lambda: calls >= 2)
    bugs = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert len(bugs) == 1 and relay.stats.errors == 1
