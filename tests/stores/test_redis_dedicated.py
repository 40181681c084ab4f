"""The Redis store's batch connection (``oncely.stores._redis_dedicated.Dedicated``): one connection
made from the client's pool options and kept out of the pool. It must heal as a pooled one
does (a connection the server closed is opened again), never hand one batch another's reply,
and take the given client's options."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from oncely.stores._redis_dedicated import _Watch
from oncely.stores._redis_url import parse_redis_url
from oncely.stores.base import Outcome
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.stores._redis_support import (
    REDIS_URL,
    batch_connection,
    cut_batch,
    private_redis,
    reading,
    spawned_batches,
    with_options,
)

LONG = 30.0


def _client_addr(store: RedisStore) -> str:
    """The batch connection's own address, as ``CLIENT LIST`` and ``CLIENT KILL`` name it."""
    host, port = batch_connection(store)._writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def _given_client(**kwargs: Any) -> Redis:
    options = parse_redis_url(REDIS_URL)
    [(host, port)] = options.nodes
    return Redis(host=host, port=port, **kwargs)


@pytest.mark.anyio
async def test_a_batch_connection_the_server_closed_is_opened_again(
    unique: str, anyio_backend: object
) -> None:
    # A client of the user's that retries nothing: a batch connection the server closed
    # while idle (an idle timeout, a proxy) must not fail the next batch, every call in it
    # failing closed; it is seen closed and opened again before the batch goes out.
    client = _given_client(retry=Retry(NoBackoff(), 0))
    admin = _given_client()
    try:
        async with RedisStore(client, prefix=f"{unique}:") as store:
            assert (await store.begin("a", "fp", LONG)).outcome is Outcome.NEW
            addr = _client_addr(store)
            assert await admin.client_kill(addr)  # as an idle timeout or a proxy would
            conn = batch_connection(store)
            await eventually(lambda: conn._reader is None or conn._reader.at_eof())
            assert (await store.begin("b", "fp", LONG)).outcome is Outcome.NEW
            assert _client_addr(store) != addr
    finally:
        await admin.aclose()
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["callback", "task"])
async def test_a_batch_cancelled_mid_read_leaves_no_reply_for_the_next(
    path: str, tmp_path: Path, anyio_backend: object
) -> None:
    # A batch is sent from a callback and answered from the connection's protocol; one that
    # needs a coroutine (a retry) runs on a task. Cut off on either, the reply still due must
    # not be read as the next batch's.
    async with private_redis(tmp_path) as server, RedisStore(server.url) as store:
        done = await store.begin("done", "fp", LONG)
        assert done.token is not None
        await store.complete("done", done.token, b"result", LONG)
        if path == "task":
            store._batch._start = None  # every batch on a task, as a retried one is
        sent = reading(store)
        server.pause()
        cut = asyncio.ensure_future(store.begin("fresh", "fp", LONG))
        await asyncio.wait_for(sent.wait(), 10)  # the batch is out; its reply is on its way
        cut_batch(store, path, cut)
        with pytest.raises(asyncio.CancelledError):
            await cut
        server.resume()  # the server now answers the cut batch ("fresh" is NEW)
        # The next batch must read its own reply, not the cut one's.
        again = await store.begin("done", "fp", LONG)
        assert (again.outcome, again.result) == (Outcome.COMPLETED, b"result")


@pytest.mark.anyio
async def test_the_batch_connection_takes_the_given_clients_database(
    unique: str, anyio_backend: object
) -> None:
    client = _given_client(db=5)
    db0 = _given_client(db=0)
    try:
        async with RedisStore(client, prefix=f"{unique}:") as store:
            assert (await store.begin("k", "fp", LONG)).outcome is Outcome.NEW
            assert await client.exists(store.redis_key("k")) == 1
            assert await db0.exists(store.redis_key("k")) == 0
            # Opened again (after the server closed it), it selects that database again.
            assert await db0.client_kill(_client_addr(store))
            assert (await store.begin("k2", "fp", LONG)).outcome is Outcome.NEW
            assert await client.exists(store.redis_key("k2")) == 1
            assert await db0.exists(store.redis_key("k2")) == 0
        # The store leaves a given client open, and its own connection closed.
        assert await client.ping()
        assert store._wire is None
    finally:
        await db0.aclose()
        await client.aclose()


@pytest.mark.anyio
async def test_aclose_closes_thebatch_connection(unique: str, anyio_backend: object) -> None:
    store = RedisStore(with_options(REDIS_URL, prefix=f"{unique}:"))
    await store.connect()
    conn = batch_connection(store)
    assert (await store.begin("k", "fp", LONG)).outcome is Outcome.NEW
    assert conn.is_connected
    await store.aclose()
    assert not conn.is_connected


@pytest.mark.anyio
async def test_the_deadline_timer_aborts_only_an_exchange_past_its_deadline(
    anyio_backend: object,
) -> None:
    # One timer per connection, re-armed only when it fires: an exchange that ended in time
    # is never cut off by it, one that did not is, even while the timer was armed for an
    # earlier exchange's (earlier) deadline.
    options = parse_redis_url(REDIS_URL)
    [(host, port)] = options.nodes
    _, writer = await asyncio.open_connection(host, port)
    watch = _Watch()
    try:
        watch.start(writer, 0.05)
        assert watch.stop() is False  # over in time
        await eventually(lambda: watch._timer is None)  # the timer fired, on nothing
        assert not writer.transport.is_closing()
        watch.start(writer, 0.05)
        assert watch.stop() is False
        loop = asyncio.get_running_loop()
        started = loop.time()
        watch.start(writer, 0.2)  # armed for the first deadline, it must wait for this one
        await eventually(lambda: writer.transport.is_closing())
        assert loop.time() - started >= 0.2  # not cut off when the earlier deadline fired
        assert watch.stop() is True
    finally:
        watch.cancel()
        writer.close()


@pytest.mark.anyio
async def test_batches_are_sent_and_answered_without_a_task(
    unique: str, anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast path: a batch is written from the batcher's callback and answered from the
    # connection's protocol. A task per batch (its coroutine layers, the stream's reads) cost
    # more than the batch's own I/O.
    spawned = spawned_batches(monkeypatch)
    async with RedisStore(with_options(REDIS_URL, prefix=f"{unique}:")) as store:
        for i in range(5):
            begun = await store.begin(f"k{i}", "fp", LONG)
            assert begun.outcome is Outcome.NEW and begun.token is not None
            await store.complete(f"k{i}", begun.token, b"r", LONG)
        together = await asyncio.gather(*(store.begin(f"k{i}", "fp", LONG) for i in range(5)))
        assert {(b.outcome, b.result) for b in together} == {(Outcome.COMPLETED, b"r")}
        assert spawned == []
        # A batch that needs a coroutine (the connection to open again) goes on a task.
        await batch_connection(store).disconnect()
        assert (await store.begin("after", "fp", LONG)).outcome is Outcome.NEW
        assert spawned == [1]
        assert (await store.begin("again", "fp", LONG)).outcome is Outcome.NEW
        assert spawned == [1]  # and the next is back on the fast path
