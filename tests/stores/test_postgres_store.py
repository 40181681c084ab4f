"""The PostgreSQL store beyond the conformance suite: URL options, the table, pool mode, the
sweep, the row-lock design of transactional mode, batching, and a real server outage."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from unittest import mock

import anyio
import asyncpg
import pytest

import oncely.stores.postgres as postgres_module
from oncely.errors import ConfigError, LeaseLost, StoreError, StoreUnavailable
from oncely.stores._postgres_sql import RETRY_SOON
from oncely.stores.base import Begin, Outcome
from oncely.stores.postgres import PostgresStore
from oncely.stores.registry import store_from_url
from tests._wait import eventually
from tests.stores._pg_server import _free_port

URL = os.environ.get("ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely")
LONG = 30.0


async def script(query: str, url: str = URL) -> None:
    """Run several statements (the simple protocol takes a script)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


async def sql(query: str, *args: Any, url: str = URL) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[Any] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


@pytest.fixture
async def table(unique: str, anyio_backend: object) -> AsyncIterator[str]:
    name = f"oncely_{unique.replace('-', '_')}"
    yield name
    await sql(f"DROP TABLE IF EXISTS {name}")
    await sql(f"DROP TABLE IF EXISTS {name}_effects")


@pytest.fixture
async def store(table: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=4") as store:
        yield store


@pytest.fixture
async def other(table: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=4") as other:
        yield other


@pytest.fixture
async def effects(table: str) -> str:
    name = f"{table}_effects"
    await sql(f"CREATE TABLE {name} (key text NOT NULL)")
    return name


async def own(store: PostgresStore, key: str, lease: float = LONG) -> str:
    begun = await store.begin(key, "fp", lease)
    assert begun.outcome is Outcome.NEW and begun.token, begun
    return begun.token


async def count(table: str, where: str = "true", *args: Any) -> int:
    [row] = await sql(f"SELECT count(*) FROM {table} WHERE {where}", *args)
    return int(row[0])


# -- URLs and configuration -------------------------------------------------------------------


def test_url_options_are_read_and_libpq_ones_pass_through() -> None:
    store = PostgresStore.from_url(
        "postgres://u:pw@db.example:5433/app?table=keys&schema=jobs&pool_min=2&pool_max=5"
        "&command_timeout=3&sweep_interval=7&sweep_batch=9&create_table=false"
        "&sslmode=require&application_name=worker"
    )
    assert (store.table, store.schema) == ("keys", "jobs")
    assert (store.pool_min, store.pool_max, store.command_timeout) == (2, 5, 3.0)
    assert (store.sweep_interval, store.sweep_batch, store.create_table) == (7.0, 9, False)
    assert store._dsn == (
        "postgresql://u:pw@db.example:5433/app?sslmode=require&application_name=worker"
    )
    assert '"jobs"."keys"' in store.sql.claim
    assert store.url.startswith("postgres://u:pw@")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("tabel=x", "unknown option 'tabel'"),
        ("connect_timeout=5", "unknown option 'connect_timeout'"),
        ("table=x&table=y", "'table' is given twice"),
        ("table=bad-name", "must be 1-63 letters"),
        ("schema=1x", "must be 1-63 letters"),
        ("pool_max=1", "pool_max must be >= 2"),
        ("pool_min=0", "pool_min must be >= 1"),
        ("pool_min=4&pool_max=3", "pool_min=4 and pool_max=3"),
        ("pool_max=two", "pool_max='two' is not a whole number"),
        ("command_timeout=0", "command_timeout must be > 0"),
        ("sweep_interval=-1", "sweep_interval must be >= 0"),
        ("sweep_batch=1.5", "sweep_batch='1.5' is not a whole number"),
        ("create_table=maybe", "create_table='maybe' must be true or false"),
    ],
)
def test_bad_url_options_are_precise_config_errors(query: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        PostgresStore.from_url(f"postgresql://u:secret@host/db?{query}")
    assert "secret" not in str(raised.value)


def test_registry_builds_the_store_for_both_schemes() -> None:
    assert isinstance(store_from_url("postgres://h/db"), PostgresStore)
    assert isinstance(store_from_url("postgresql://h/db?table=t"), PostgresStore)
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        PostgresStore.from_url("mysql://h/db")
    with pytest.raises(ConfigError, match="Port could not be cast"):
        PostgresStore.from_url("postgresql://u:secret@h:port/db")


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        PostgresStore()
    with pytest.raises(ConfigError, match="pool_max >= 2"):
        PostgresStore("postgresql://h/db", pool_max=1)
    with pytest.raises(ConfigError, match="sweep_interval must be >= 0"):
        PostgresStore("postgresql://h/db", sweep_interval=-1)


@pytest.mark.anyio
async def test_unreachable_server_is_store_unavailable(table: str) -> None:
    store = PostgresStore(f"postgresql://oncely@127.0.0.1:{_free_port()}/oncely", table=table)
    with pytest.raises(StoreUnavailable):
        await store.connect()
    with pytest.raises(StoreUnavailable):
        await store.begin("k", "fp", LONG)


@pytest.mark.anyio
async def test_wrong_password_is_a_store_error_not_an_outage(table: str) -> None:
    url = re.sub(r"://([^:]+):[^@]*@", r"://\1:wrong-password@", URL)
    with pytest.raises(StoreError) as raised:
        await PostgresStore.from_url(f"{url}?table={table}").connect()
    assert not isinstance(raised.value, StoreUnavailable)


# -- the table --------------------------------------------------------------------------------


def migration_sql(table: str) -> str:
    """The migration as the module docstring documents it, for ``table``."""
    doc = postgres_module.__doc__ or ""
    block = doc.split("The migration (what ``connect`` runs with ``create_table=true``)::")[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return "\n".join(lines).replace("oncely_idempotency", table)


@pytest.mark.anyio
async def test_without_create_table_the_documented_migration_is_what_it_needs(
    table: str,
) -> None:
    url = f"{URL}?table={table}&create_table=false"
    with pytest.raises(StoreError, match="run the migration"):
        await PostgresStore.from_url(url).connect()
    assert await count("pg_tables", "tablename = $1", table) == 0
    await script(migration_sql(table))
    async with PostgresStore.from_url(url) as store:
        token = await own(store, "k")
        await store.complete("k", token, b"r", LONG)
        assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")
    # The auto-created table is the documented one, index included.
    [index] = await sql(
        "SELECT indexdef FROM pg_indexes WHERE indexname = $1", f"{table}_expires_at"
    )
    assert "(expires_at)" in index[0]


@pytest.mark.anyio
async def test_a_schema_option_puts_the_table_there(unique: str, anyio_backend: object) -> None:
    schema = f"s_{unique.replace('-', '_')}"
    await sql(f"CREATE SCHEMA {schema}")
    try:
        async with PostgresStore.from_url(f"{URL}?schema={schema}&table=keys") as store:
            await own(store, "k")
        assert await count(f"{schema}.keys") == 1
    finally:
        await sql(f"DROP SCHEMA {schema} CASCADE")


# -- an application's own pool ----------------------------------------------------------------


@pytest.mark.anyio
async def test_an_application_pool_is_used_and_left_open(table: str, effects: str) -> None:
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=3)
    try:
        store = PostgresStore(pool=pool, table=table)
        async with store:
            token = await own(store, "k")
            async with store.transaction("k", token, LONG) as tx:
                await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
                tx.result = b"done"
            assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"done")
        assert await pool.fetchval("SELECT count(*) FROM " + effects) == 1  # still open
        with pytest.raises(StoreUnavailable):
            await store.begin("k", "fp", LONG)
    finally:
        await pool.close()
    small = await asyncpg.create_pool(URL, min_size=1, max_size=1)
    try:
        with pytest.raises(ConfigError, match="max_size >= 2"):
            PostgresStore(pool=small, table=table)
    finally:
        await small.close()


# -- the sweep --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sweep_interval_0_turns_the_background_sweeper_off(table: str) -> None:
    """For deployments that sweep from one place (cron calling ``sweep()``) and for tests
    that count what their own sweep deletes. Both spellings: the URL and the argument."""
    async with PostgresStore.from_url(f"{URL}?table={table}&sweep_interval=0") as store:
        assert store.sweep_interval == 0
        assert "oncely:pg-sweep" not in {t.get_name() for t in asyncio.all_tasks()}
        await store.complete("gone", await own(store, "gone"), None, 0.05)
        await anyio.sleep(0.2)  # past the ttl: only an explicit sweep deletes it
        assert await count(table) == 1
        assert await store.sweep() == 1
    again = PostgresStore(URL, table=table, sweep_interval=0)
    async with again:
        assert "oncely:pg-sweep" not in {t.get_name() for t in asyncio.all_tasks()}


@pytest.mark.anyio
async def test_sweep_deletes_expired_rows_in_batches_skipping_locked_ones(table: str) -> None:
    # sweep_interval=0: the counts below are this sweep's alone (a background sweeper's first
    # run falls anywhere in its first interval and took the rows first about one run in fifty).
    url = f"{URL}?table={table}&sweep_batch=7&sweep_interval=0"
    async with PostgresStore.from_url(url) as store:
        for i in range(30):
            await store.complete(f"old{i}", await own(store, f"old{i}"), b"r", 0.1)
        for i in range(5):
            await store.complete(f"live{i}", await own(store, f"live{i}"), b"r", LONG)
        await own(store, "running")  # a live lease
        await anyio.sleep(0.4)  # past the 0.1 s result ttl
        holder = await asyncpg.connect(URL)
        try:
            async with holder.transaction():
                await holder.execute(f"SELECT 1 FROM {table} WHERE key = 'old0' FOR UPDATE")
                with mock.patch.object(store, "_execute", wraps=store._execute) as calls:
                    with anyio.fail_after(5):  # the locked row is skipped, not waited for
                        assert await store.sweep() == 29
                assert calls.call_count == 5  # 7 + 7 + 7 + 7 + 1
                assert await count(table) == 1 + 5 + 1
        finally:
            await holder.close()
        assert await store.sweep() == 1
        assert await count(table, "key LIKE 'old%'") == 0
        assert await count(table) == 6


@pytest.mark.anyio
async def test_the_background_sweeper_runs_and_survives_failures(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "oncely.stores.postgres")
    url = f"{URL}?table={table}&sweep_interval=0.1"
    async with PostgresStore.from_url(url) as store:
        await store.complete("a", await own(store, "a"), None, 0.05)
        await _until_rows(table, 0)
        await sql(f"DROP TABLE {table}")  # every sweep now fails
        await eventually(lambda: any("sweep of" in r.message for r in caplog.records))
        async with PostgresStore.from_url(url) as again:  # creates the table anew
            await again.complete("b", await own(again, "b"), None, 0.05)
        await _until_rows(table, 0)  # the first store's sweeper kept going


async def _until_rows(table: str, n: int) -> None:
    for _ in range(200):  # 10 s
        if await count(table) == n:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"{table} did not reach {n} rows within 10 s")


# -- transactional mode: the row-lock design ---------------------------------------------------


@pytest.mark.anyio
async def test_begin_during_an_open_transaction_is_in_progress_at_once(
    store: PostgresStore, other: PostgresStore, effects: str
) -> None:
    token = await own(store, "k")
    async with store.transaction("k", token, LONG) as tx:
        await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
        # Waiting for the row lock would last the 10 s command_timeout and fail; 8 s tells that
        # apart and leaves a loaded machine's stalls room.
        with anyio.fail_after(8):
            found = await other.begin("k", "fp", LONG)
        assert found.outcome is Outcome.IN_PROGRESS and found.retry_after > LONG - 5
        tx.result = b"ok"
    assert await other.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"ok")


@pytest.mark.anyio
async def test_begin_never_waits_for_an_expired_row_another_session_locked(
    store: PostgresStore, other: PostgresStore, table: str
) -> None:
    await own(store, "k", 0.2)
    await anyio.sleep(0.4)  # the lease is over
    holder = await asyncpg.connect(URL)
    try:
        async with holder.transaction():
            await holder.execute(f"SELECT 1 FROM {table} WHERE key = 'k' FOR UPDATE")
            with anyio.fail_after(8):  # under the 10 s command_timeout a lock wait would hit
                found = await other.begin("k", "fp", LONG)
            assert found == Begin(Outcome.IN_PROGRESS, retry_after=RETRY_SOON)
    finally:
        await holder.close()
    await own(other, "k")  # lock gone: the expired lease is taken over


@pytest.mark.anyio
async def test_takeover_during_a_transaction_rolls_it_back(
    store: PostgresStore, other: PostgresStore, effects: str
) -> None:
    token = await own(store, "k", 0.3)
    with pytest.raises(LeaseLost):
        async with store.transaction("k", token, LONG) as tx:
            await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
            await anyio.sleep(0.5)  # the lease runs out, unrenewed
            # The open transaction does not hold the takeover up (a lock wait would last the
            # 10 s command_timeout).
            with anyio.fail_after(8):
                fresh = await own(other, "k")
            tx.result = b"stale"
    assert await count(effects) == 0
    await other.complete("k", fresh, b"fresh", LONG)
    assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"fresh")


@pytest.mark.anyio
async def test_a_transaction_longer_than_its_lease_keeps_it_through_renewals(
    table: str, effects: str, other: PostgresStore
) -> None:
    # pool_max=2: the transaction holds one connection, renewals get the one held back.
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=2") as store:
        # A 1.5 s lease renewed every 0.15 s: a stall of the test process under a second
        # (a loaded CI machine) must not let the contender take the key over.
        token = await own(store, "k", 1.5)
        seen: Counter[Outcome] = Counter()
        # Answered once the transaction began to commit: COMPLETED is right there too.
        late: Counter[Outcome] = Counter()
        committing = False
        done = anyio.Event()

        async def heartbeat() -> None:
            while not done.is_set():
                with anyio.fail_after(2):
                    try:
                        await store.renew("k", token, 1.5)
                    except LeaseLost:
                        # As in the runtime: answered after the context exited, it is moot.
                        if not done.is_set():
                            raise
                await anyio.sleep(0.15)

        async def contender() -> None:
            while not done.is_set():
                outcome = (await other.begin("k", "fp", LONG)).outcome
                (late if committing else seen)[outcome] += 1
                await anyio.sleep(0.1)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                tg.start_soon(contender)
                async with store.transaction("k", token, LONG) as tx:
                    await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
                    await anyio.sleep(3.0)  # two leases long
                    tx.result = b"ok"
                    committing = True
                done.set()
        assert set(seen) == {Outcome.IN_PROGRESS} and seen[Outcome.IN_PROGRESS] >= 3
        assert set(late) <= {Outcome.IN_PROGRESS, Outcome.COMPLETED}
        assert await other.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"ok")
        assert await count(effects) == 1


@pytest.mark.anyio
async def test_a_connection_lost_mid_transaction_commits_nothing(
    store: PostgresStore, other: PostgresStore, effects: str
) -> None:
    token = await own(store, "k", 0.3)
    with pytest.raises(StoreUnavailable):
        async with store.transaction("k", token, LONG) as tx:
            await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
            tx.connection.terminate()  # as if the worker's host vanished
            tx.result = b"never"
    assert await count(effects) == 0
    await anyio.sleep(0.5)
    await own(other, "k")  # the lease ran out; the key is free for another worker


@pytest.mark.anyio
async def test_a_handler_session_change_does_not_leak_into_the_next_transaction(
    table: str,
) -> None:
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=2") as store:
        for i in range(4):  # one transaction slot: the pool hands the same connection back
            token = await own(store, f"k{i}")
            async with store.transaction(f"k{i}", token, LONG) as tx:
                assert await tx.connection.fetchval("SHOW statement_timeout") == "0"
                await tx.connection.execute("SET statement_timeout = '1234ms'")


@pytest.mark.anyio
async def test_keys_with_nul_and_backslashes_are_kept_apart(store: PostgresStore) -> None:
    keys = ["a\x00b", "a\\0b", "a\\\x00b", "a\\\\0b", "a0b", "\x00"]
    tokens = [await own(store, key) for key in keys]  # all distinct keys: all NEW
    for key, token in zip(keys, tokens, strict=True):
        await store.renew(key, token, LONG)
        await store.complete(key, token, key.encode(), LONG)
    for key in keys:
        assert await store.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=key.encode())


@pytest.mark.anyio
async def test_a_re_sent_completion_succeeds_and_a_stranger_s_does_not(
    store: PostgresStore,
) -> None:
    """``Keys.complete`` re-sends a completion whose reply the connection lost. If the first
    had committed, the retry must not read as a lost lease: the worker would log that the
    effect may run again, and count it unrecorded, for a completion that was recorded. As on
    Redis, a completed row keeps its token. Alone and in a batch with a claim (the statement
    that completes and claims together)."""
    token = await own(store, "k")
    await store.complete("k", token, b"r", LONG)
    await store.complete("k", token, b"r", LONG)
    with pytest.raises(LeaseLost):
        await store.complete("k", "someone-else", b"x", LONG)
    with pytest.raises(LeaseLost):  # still no lease to renew once completed
        await store.renew("k", token, LONG)
    again, begun = await asyncio.gather(
        store.complete("k", token, b"r", LONG), store.begin("other", "fp", LONG)
    )
    assert again is None and begun.outcome is Outcome.NEW
    assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")


# -- batching ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_begins_and_completes_share_statements(store: PostgresStore) -> None:
    keys = [f"k{i}" for i in range(200)]
    with mock.patch.object(store, "_fetch", wraps=store._fetch) as fetches:
        begun = await asyncio.gather(*(store.begin(k, "fp", LONG) for k in keys))
        assert {b.outcome for b in begun} == {Outcome.NEW}
        claims = fetches.call_count
        await asyncio.gather(
            *(
                store.complete(k, b.token or "", k.encode(), LONG)
                for k, b in zip(keys, begun, strict=True)
            )
        )
        completes = fetches.call_count - claims
    assert claims <= 2 and completes <= 2, (claims, completes)
    assert await store.begin("k7", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"k7")


@pytest.mark.anyio
async def test_batches_over_the_same_new_keys_in_opposite_orders_do_not_deadlock(
    store: PostgresStore, other: PostgresStore
) -> None:
    """Two workers claim the same absent keys at once, in opposite orders. Each batch inserts
    in key order, so neither waits for a row the other waits on (which PostgreSQL would end
    by failing one of them with a deadlock, a whole batch of StoreUnavailable)."""
    for round_ in range(5):
        keys = [f"r{round_}-{i:03}" for i in range(100)]
        ours = [store.begin(k, "fp", LONG) for k in keys]
        theirs = [other.begin(k, "fp", LONG) for k in reversed(keys)]
        begun = await asyncio.gather(*ours, *theirs)
        assert Counter(b.outcome for b in begun) == {Outcome.NEW: 100, Outcome.IN_PROGRESS: 100}


@pytest.mark.anyio
async def test_one_key_many_times_in_one_batch(store: PostgresStore) -> None:
    begun = await asyncio.gather(*(store.begin("same", "fp", LONG) for _ in range(30)))
    assert Counter(b.outcome for b in begun) == {Outcome.NEW: 1, Outcome.IN_PROGRESS: 29}
    [token] = [b.token for b in begun if b.token]
    done = await asyncio.gather(
        store.complete("same", token, b"r", LONG),
        store.complete("same", token, b"r", LONG),  # the second round finds it completed
        store.complete("same", "not-the-token", b"x", LONG),
        return_exceptions=True,
    )
    assert [type(d).__name__ for d in done] == ["NoneType", "NoneType", "LeaseLost"]
    assert await store.begin("same", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")
