"""SQLite-store behaviour beyond the conformance suite: URLs, failures, purging, and how the
transactional mode shares SQLite's single write lock with the plain calls."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import anyio
import pytest

from oncely.errors import ConfigError, LeaseLost, StoreUnavailable
from oncely.stores import sqlite as sqlite_module
from oncely.stores._key_batch import BeginCall, CompleteCall, Fetch
from oncely.stores._sqlite_keys import CLAIM_ROUNDS, RETRY_SOON, write_begins, write_completes
from oncely.stores.base import Begin, Outcome
from oncely.stores.registry import store_from_url
from oncely.stores.sqlite import SqliteStore

LONG = 30.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE effects (marker TEXT PRIMARY KEY)")
    db.close()
    return path


@pytest.fixture
async def store(db_path: Path, anyio_backend: object) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(db_path) as store:
        yield store


async def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    async with aiosqlite.connect(path) as db:
        return [tuple(row) for row in await db.execute_fetchall(sql)]


T = TypeVar("T")


async def gather(*calls: Awaitable[T]) -> list[T]:
    """Run ``calls`` concurrently, as tasks of one task group; results in call order."""
    results: list[T | None] = [None] * len(calls)

    async def run(i: int, call: Awaitable[T]) -> None:
        results[i] = await call

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(run, i, call)
    return cast("list[T]", results)


async def held_token(store: SqliteStore, key: str) -> str:
    begun = await store.begin(key, "fp", LONG)
    assert begun.outcome is Outcome.NEW and begun.token
    return begun.token


# -- URLs ---------------------------------------------------------------------------------


def test_from_url_reads_path_and_options(tmp_path: Path) -> None:
    relative = SqliteStore.from_url("sqlite:///state/idem.db")
    assert (relative.path, relative.pool, relative.purge_interval) == (
        Path("state/idem.db"),
        1,
        60.0,
    )
    url = f"sqlite:///{tmp_path}/idem.db?pool=3&purge_interval=0.5"
    absolute = SqliteStore.from_url(url)
    assert (absolute.path, absolute.pool, absolute.purge_interval) == (
        tmp_path / "idem.db",
        3,
        0.5,
    )
    assert absolute.url == url
    assert not (tmp_path / "idem.db").exists(), "constructors do no I/O"


def test_registry_builds_a_sqlite_store(tmp_path: Path) -> None:
    store = store_from_url(f"sqlite:///{tmp_path}/idem.db")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "idem.db"


def test_constructed_store_url_round_trips(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "idem.db", pool=2, purge_interval=5)
    again = SqliteStore.from_url(store.url)
    assert (again.path, again.pool, again.purge_interval) == (tmp_path / "idem.db", 2, 5.0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "sqlite:///x.db?pool=0",
            "'sqlite:///x.db?pool=0': option pool='0' must be a whole number >= 1",
        ),
        (
            "sqlite:///x.db?pool=two",
            "'sqlite:///x.db?pool=two': option pool='two' must be a whole number >= 1",
        ),
        (
            "sqlite:///x.db?purge_interval=-1",
            "'sqlite:///x.db?purge_interval=-1': option purge_interval must be > 0, got -1",
        ),
        (
            "sqlite:///x.db?purge_interval=soon",
            "'sqlite:///x.db?purge_interval=soon': option purge_interval='soon' is not a number",
        ),
        (
            "sqlite:///x.db?pool=2&colour=red&busy=1",
            "'sqlite:///x.db?pool=2&colour=red&busy=1': unknown option(s) busy, colour; "
            "known: pool, purge_interval",
        ),
        (
            "sqlite://host/x.db",
            "sqlite URL 'sqlite://host/x.db' has a host; "
            "write sqlite:///relative.db or sqlite:////abs.db",
        ),
        ("sqlite://", "sqlite URL 'sqlite://' names no file; write sqlite:///path/to.db"),
    ],
)
def test_bad_urls_are_rejected_precisely(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SqliteStore.from_url(url)
    assert str(caught.value) == message


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pool must be >= 1, got 0"):
        SqliteStore(tmp_path / "x.db", pool=0)
    with pytest.raises(ConfigError, match="purge_interval must be > 0, got 0"):
        SqliteStore(tmp_path / "x.db", purge_interval=0)


# -- an unreachable store -----------------------------------------------------------------


@pytest.mark.anyio
async def test_path_under_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a directory")
    store = SqliteStore(tmp_path / "plain" / "idem.db")
    with pytest.raises(StoreUnavailable, match="cannot open") as caught:
        await store.connect()
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.anyio
async def test_directory_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unable to open database file"):
        await SqliteStore(tmp_path).connect()


@pytest.mark.anyio
async def test_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"definitely not sqlite " * 50)
    store = SqliteStore(tmp_path / "junk.db")
    with pytest.raises(StoreUnavailable, match="file is not a database"):
        await store.connect()
    with pytest.raises(StoreUnavailable, match="not connected"):
        await store.begin("k", "fp", LONG)


@pytest.mark.anyio
async def test_transaction_on_a_closed_store_is_unavailable(store: SqliteStore) -> None:
    token = await held_token(store, "k")
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        async with store.transaction("k", token, LONG):
            pass


# -- time and purging ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_leases_use_the_wall_clock(store: SqliteStore, db_path: Path) -> None:
    await store.begin("k", "fp", 100.0)
    [(lease_until,)] = await rows(db_path, "SELECT lease_until FROM oncely_idempotency")
    assert isinstance(lease_until, float)
    assert abs(lease_until - (time.time() + 100.0)) < 5.0


@pytest.mark.anyio
async def test_expired_but_untaken_lease_still_completes(store: SqliteStore) -> None:
    begun = await store.begin("k", "fp", 0.1)
    assert begun.token
    await anyio.sleep(0.25)  # not synchronisation: the 0.1 s lease under test runs out
    await store.renew("k", begun.token, LONG)
    await store.complete("k", begun.token, b"late", LONG)
    assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"late")


@pytest.mark.anyio
async def test_purge_deletes_expired_results_and_dead_leases(
    store: SqliteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.complete("short", await held_token(store, "short"), b"r", 0.1)
    await store.complete("long", await held_token(store, "long"), b"r", LONG)
    await store.begin("expired-lease", "fp", 0.1)  # within the stale grace: kept
    monkeypatch.setattr(sqlite_module, "STALE_LEASE_GRACE", 0.0)
    await store.begin("dead-lease", "fp", 0.1)
    await anyio.sleep(0.25)  # not synchronisation: the 0.1 s deadlines under test pass
    assert await store.purge() == 2
    assert await store.purge() == 0
    left = await rows(db_path, "SELECT key FROM oncely_idempotency ORDER BY key")
    assert left == [("expired-lease",), ("long",)]


@pytest.mark.anyio
@pytest.mark.parametrize(("interval", "left"), [(0.1, 1), (LONG, 2)])
async def test_begin_purges_opportunistically(
    db_path: Path, anyio_backend: object, interval: float, left: int
) -> None:
    async with SqliteStore(db_path, purge_interval=interval) as store:
        await store.complete("old", await held_token(store, "old"), b"r", 0.05)
        await anyio.sleep(0.2)  # not synchronisation: the 0.05 s TTL (and 0.1 s interval) pass
        await store.begin("new", "fp", LONG)  # purges "old" only if the interval passed
        assert len(await rows(db_path, "SELECT key FROM oncely_idempotency")) == left


# -- cancellation -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_begin_cancelled_while_waiting_for_the_write_lock_leaves_no_transaction(
    store: SqliteStore, db_path: Path
) -> None:
    async with aiosqlite.connect(db_path, isolation_level=None) as blocker:
        await blocker.execute("BEGIN IMMEDIATE")
        with anyio.move_on_after(0.2) as scope:
            await store.begin("k", "fp", LONG)
        assert scope.cancelled_caught
        await blocker.execute("ROLLBACK")
    with anyio.fail_after(5):
        assert (await store.begin("k", "fp", LONG)).outcome is Outcome.NEW


@pytest.mark.anyio
async def test_cancelled_transaction_rolls_back_and_its_connection_is_reused(
    store: SqliteStore, db_path: Path
) -> None:
    token = await held_token(store, "k")
    with anyio.move_on_after(0.2) as scope:
        async with store.transaction("k", token, LONG) as tx:
            await tx.connection.execute("INSERT INTO effects VALUES ('cancelled')")
            await anyio.sleep(LONG)
    assert scope.cancelled_caught
    with anyio.fail_after(5):
        async with store.transaction("k", token, LONG) as tx:
            await tx.connection.execute("INSERT INTO effects VALUES ('kept')")
    assert await rows(db_path, "SELECT marker FROM effects") == [("kept",)]


# -- transactional mode and the single writer ----------------------------------------------


@pytest.mark.anyio
async def test_lease_lost_before_the_transaction_skips_the_body(store: SqliteStore) -> None:
    begun = await store.begin("k", "fp", 0.1)
    assert begun.token
    await anyio.sleep(0.25)  # not synchronisation: the 0.1 s lease under test runs out
    assert (await store.begin("k", "fp", LONG)).outcome is Outcome.NEW
    ran = False
    with pytest.raises(LeaseLost):
        async with store.transaction("k", begun.token, LONG):
            ran = True
    assert not ran


@pytest.mark.anyio
async def test_renew_during_an_open_transaction_does_not_wait(store: SqliteStore) -> None:
    token = await held_token(store, "k")
    async with store.transaction("k", token, LONG) as tx:
        await tx.connection.execute("INSERT INTO effects VALUES ('m')")
        # Waiting on the transaction's write lock would last the 30 s busy timeout: 10 s
        # tells that apart and leaves a loaded machine's stalls room.
        with anyio.fail_after(10):
            await store.renew("k", token, LONG)  # from the handler's own task
            async with anyio.create_task_group() as tg:  # and from another one
                tg.start_soon(store.renew, "k", token, LONG)
    with pytest.raises(LeaseLost):  # completed now
        await store.renew("k", token, LONG)


@pytest.mark.anyio
async def test_renew_in_flight_when_a_transaction_starts_goes_first(
    store: SqliteStore, db_path: Path
) -> None:
    """Not stuck behind the transaction: without the drain before BEGIN, the renew and the
    BEGIN race for the write lock once it is free, and a lost race parks the heartbeat."""
    token = await held_token(store, "k")
    events: list[str] = []

    async def renew() -> None:
        await store.renew("k", token, LONG)
        events.append("renewed")

    async def handle() -> None:
        async with store.transaction("k", token, LONG):
            events.append("body")

    with anyio.fail_after(10):
        async with aiosqlite.connect(db_path, isolation_level=None) as blocker:
            await blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            async with anyio.create_task_group() as tg:
                tg.start_soon(renew)
                await anyio.wait_all_tasks_blocked()  # renew waits on the plain connection
                tg.start_soon(handle)
                await anyio.wait_all_tasks_blocked()
                await blocker.execute("ROLLBACK")
    assert events == ["renewed", "body"]


@pytest.mark.anyio
async def test_other_callers_wait_for_the_transaction_then_see_its_outcome(
    store: SqliteStore, db_path: Path
) -> None:
    token = await held_token(store, "k")
    seen: dict[str, Begin] = {}

    async def begin(on: SqliteStore, key: str) -> None:
        seen[key] = await on.begin(key, "fp", LONG)

    with anyio.fail_after(10):
        async with SqliteStore(db_path) as elsewhere, anyio.create_task_group() as tg:
            async with store.transaction("k", token, LONG) as tx:
                tg.start_soon(begin, elsewhere, "k")  # another process, the same key
                tg.start_soon(begin, store, "k2")  # this process, another key
                await anyio.wait_all_tasks_blocked()
                # Before its first write, the transaction already holds the file's write
                # lock (BEGIN IMMEDIATE): a writer that will not wait is refused now.
                async with aiosqlite.connect(db_path, isolation_level=None, timeout=0) as probe:
                    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                        await probe.execute("BEGIN IMMEDIATE")
                await tx.connection.execute("INSERT INTO effects VALUES ('m')")
                tx.result = b"r"
    # The other process's begin answers COMPLETED with the result: it can only have read the
    # key after the commit, so it waited for the lock rather than see the lease held.
    assert seen == {
        "k": Begin(Outcome.COMPLETED, result=b"r"),
        "k2": Begin(Outcome.NEW, token=seen["k2"].token),
    }


@pytest.mark.anyio
async def test_pooled_transactions_on_different_keys_all_commit(db_path: Path) -> None:
    async with SqliteStore(db_path, pool=2) as store:
        tokens = {f"k{i}": await held_token(store, f"k{i}") for i in range(6)}

        async def handle(key: str) -> None:
            async with store.transaction(key, tokens[key], LONG) as tx:
                await tx.connection.execute("INSERT INTO effects VALUES (?)", (key,))
                await anyio.sleep(0.01)
                tx.result = key.encode()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for key in tokens:
                    tg.start_soon(handle, key)
        assert len(await rows(db_path, "SELECT marker FROM effects")) == 6
        for key in tokens:
            assert await store.begin(key, "fp", LONG) == Begin(
                Outcome.COMPLETED, result=key.encode()
            )


@pytest.mark.anyio
async def test_store_calls_from_inside_the_transaction_fail_fast(store: SqliteStore) -> None:
    token = await held_token(store, "k")
    with anyio.fail_after(10):  # waiting on its own write lock would last the 30 s busy timeout
        async with store.transaction("k", token, LONG) as tx:
            with pytest.raises(RuntimeError, match="would wait for its own write lock"):
                await store.begin("k2", "fp", LONG)
            with pytest.raises(RuntimeError, match="would wait for its own write lock"):
                async with store.transaction("k", token, LONG):
                    pass
            tx.result = b"r"
    assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")


@pytest.mark.anyio
async def test_handler_database_errors_propagate_unchanged(
    store: SqliteStore, db_path: Path
) -> None:
    token = await held_token(store, "k")
    with pytest.raises(sqlite3.IntegrityError):
        async with store.transaction("k", token, LONG) as tx:
            await tx.connection.execute("INSERT INTO effects VALUES ('dup')")
            await tx.connection.execute("INSERT INTO effects VALUES ('dup')")
    assert await rows(db_path, "SELECT marker FROM effects") == []
    assert (await store.begin("k", "fp", LONG)).outcome is Outcome.IN_PROGRESS


# -- batched begins and completes ----------------------------------------------------------


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The size of every batch the store writes, by kind."""
    sizes: dict[str, list[int]] = {"begin": [], "complete": []}

    async def begins(fetch: Fetch, calls: list[BeginCall], grace: float) -> list[Any]:
        sizes["begin"].append(len(calls))
        return await write_begins(fetch, calls, grace)

    async def completes(fetch: Fetch, calls: list[CompleteCall]) -> list[Any]:
        sizes["complete"].append(len(calls))
        return await write_completes(fetch, calls)

    monkeypatch.setattr(sqlite_module, "write_begins", begins)
    monkeypatch.setattr(sqlite_module, "write_completes", completes)
    return sizes


@pytest.mark.anyio
async def test_concurrent_begins_share_a_statement_and_each_gets_its_outcome(
    store: SqliteStore, batch_sizes: dict[str, list[int]]
) -> None:
    await store.complete("done", await held_token(store, "done"), b"r", LONG)
    await held_token(store, "held")
    batch_sizes["begin"].clear()
    calls = [
        *[(f"free{i}", "fp") for i in range(10)],
        ("dup", "fp"),
        ("dup", "fp"),  # the same key twice in one batch: the first wins
        ("done", "fp"),
        ("done", "other-fp"),
        ("held", "fp"),
        ("held", "other-fp"),
    ]
    with anyio.fail_after(10):
        results = await gather(*(store.begin(key, fp, LONG) for key, fp in calls))
    assert batch_sizes["begin"] == [len(calls)]
    outcomes = [r.outcome for r in results]
    assert outcomes[:10] == [Outcome.NEW] * 10
    assert len({r.token for r in results[:10]}) == 10
    assert outcomes[10:12] == [Outcome.NEW, Outcome.IN_PROGRESS]
    assert results[12:14] == [Begin(Outcome.COMPLETED, result=b"r"), Begin(Outcome.MISMATCH)]
    assert outcomes[14:] == [Outcome.IN_PROGRESS, Outcome.MISMATCH]


@pytest.mark.anyio
async def test_concurrent_completes_share_a_statement_and_a_stale_token_fails_alone(
    store: SqliteStore, batch_sizes: dict[str, list[int]]
) -> None:
    stale = (await store.begin("taken", "fp", 0.1)).token
    assert stale
    await anyio.sleep(0.25)  # not synchronisation: the 0.1 s lease under test runs out
    fresh = await held_token(store, "taken")  # taken over: ``stale`` lost it
    tokens = {f"k{i}": await held_token(store, f"k{i}") for i in range(10)}
    outcomes: dict[str, BaseException | None] = {}

    async def complete(name: str, key: str, token: str) -> None:
        try:
            await store.complete(key, token, name.encode(), LONG)
            outcomes[name] = None
        except LeaseLost as exc:
            outcomes[name] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(complete, "stale", "taken", stale)
            for key, token in tokens.items():
                tg.start_soon(complete, key, key, token)
            tg.start_soon(complete, "again", "k0", tokens["k0"])  # completed a second time
            tg.start_soon(complete, "fresh", "taken", fresh)
    # One statement for the batch, then one for the keys it met twice (in arrival order).
    assert batch_sizes["complete"] == [13]
    assert isinstance(outcomes.pop("stale"), LeaseLost)
    assert isinstance(outcomes.pop("again"), LeaseLost)
    assert outcomes == dict.fromkeys([*tokens, "fresh"])
    assert await store.begin("taken", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"fresh")
    for key in tokens:
        assert await store.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=key.encode())


@pytest.mark.anyio
async def test_begin_cancelled_after_it_took_the_key_gives_it_back(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch granted the key, but the caller was cancelled before it could see that: no
    one would ever use or release the lease, so the store releases it."""
    caller: list[asyncio.Task[Any]] = []

    async def write_then_cancel(fetch: Fetch, calls: list[BeginCall], grace: float) -> list[Any]:
        outcomes = await write_begins(fetch, calls, grace)
        # Runs before the caller wakes up to its outcome.
        asyncio.get_running_loop().call_soon(caller[0].cancel)
        return outcomes

    monkeypatch.setattr(sqlite_module, "write_begins", write_then_cancel)

    async def begin() -> Begin:
        caller.append(cast("asyncio.Task[Any]", asyncio.current_task()))
        return await store.begin("k", "fp", LONG)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(begin())
    monkeypatch.setattr(sqlite_module, "write_begins", write_begins)
    with anyio.fail_after(5):
        assert (await store.begin("k", "fp", LONG)).outcome is Outcome.NEW


@pytest.mark.anyio
async def test_a_failed_statement_fails_only_the_calls_it_concerns() -> None:
    """A statement that fails committed nothing: its callers get StoreUnavailable, and callers
    answered by an earlier statement of the same batch keep their outcome."""
    statements: list[str] = []

    async def fetch(sql: str, params: tuple[Any, ...]) -> list[Any]:
        statements.append(sql.split()[0])
        if len(statements) == 1:  # the first round completes "a" and (stale) "b"
            return [("a",)]
        raise StoreUnavailable("sqlite: disk I/O error")

    calls = [
        CompleteCall("a", "t1", None, LONG),
        CompleteCall("b", "t2", None, LONG),
        CompleteCall("a", "t3", None, LONG),  # met twice: waits for the second statement
    ]
    first, second, third = await write_completes(fetch, calls)
    assert first is None
    assert isinstance(second, LeaseLost)
    assert isinstance(third, StoreUnavailable)
    assert statements == ["WITH", "WITH"]


@pytest.mark.anyio
async def test_a_row_that_vanishes_between_claim_and_read_is_claimed_again() -> None:
    """The claim met a row, which was gone (released, purged) by the time it was read: the key
    is free now, and IN_PROGRESS could be wrong (the row may have been a completed one)."""
    statements: list[str] = []

    async def fetch(sql: str, params: tuple[Any, ...]) -> list[Any]:
        statements.append(sql.split()[0])
        if len(statements) == 3:  # the second claim
            return [(params[2],)]  # grants the token it was given
        return []  # first claim: blocked; the read: no row any more

    [begun] = await write_begins(fetch, [BeginCall("k", "fp", LONG)], 0.0)
    assert statements == ["INSERT", "SELECT", "INSERT"]
    assert isinstance(begun, Begin) and begun.outcome is Outcome.NEW and begun.token
    statements.clear()

    async def never(sql: str, params: tuple[Any, ...]) -> list[Any]:
        statements.append(sql.split()[0])
        return []

    [busy] = await write_begins(never, [BeginCall("k", "fp", LONG)], 0.0)
    assert busy == Begin(Outcome.IN_PROGRESS, retry_after=RETRY_SOON)
    assert statements == ["INSERT", "SELECT"] * CLAIM_ROUNDS
