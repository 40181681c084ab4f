"""What the conformance suite does not cover for ``sqlite://``: URLs, several processes on one
file, durability across a process exit, ack batching, error mapping."""

from __future__ import annotations

import sqlite3
import sys
import textwrap
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from oncely.brokers._sqlite_queue import AckBatcher
from oncely.brokers.base import Delivery, Subscription
from oncely.brokers.registry import broker_from_url
from oncely.brokers.sqlite import SqliteBroker
from oncely.errors import ConfigError, ConnectionLost, DeliveryExpired

LONG = 60.0
ROOT = Path(__file__).resolve().parents[2]


async def next_within(sub: Subscription, seconds: float = 3.0) -> Delivery:
    with anyio.fail_after(seconds):
        return await sub.__anext__()


async def assert_quiet(sub: Subscription, seconds: float = 0.15) -> None:
    with anyio.move_on_after(seconds):
        d = await sub.__anext__()
        pytest.fail(f"unexpected delivery {d.id}")


def rows(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as db:
        return list(db.execute(sql, params))


# -- URLs ------------------------------------------------------------------------------------


def test_from_url_reads_path_and_options() -> None:
    broker = SqliteBroker.from_url("sqlite:///data/q.db?poll_interval=0.1&max_poll_interval=2")
    assert broker.path == Path("data/q.db")
    assert (broker.poll_interval, broker.max_poll_interval) == (0.1, 2.0)
    absolute = SqliteBroker.from_url("sqlite:////var/lib/q.db")
    assert absolute.path == Path("/var/lib/q.db")
    assert (absolute.poll_interval, absolute.max_poll_interval) == (0.05, 0.25)
    # A slow poll alone raises the ceiling with it rather than failing.
    assert SqliteBroker.from_url("sqlite:///q.db?poll_interval=1").max_poll_interval == 1.0
    assert isinstance(broker_from_url("sqlite:///q.db"), SqliteBroker)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///q.db?pol_interval=1", r"unknown option\(s\) pol_interval"),
        ("sqlite:///q.db?poll_interval=1&x=2&a=3", r"unknown option\(s\) a, x"),
        ("sqlite:///q.db?poll_interval=fast", "option poll_interval='fast' is not a number"),
        ("sqlite:///q.db?poll_interval=0", "option poll_interval must be > 0"),
        ("sqlite:///q.db?max_poll_interval=-1", "option max_poll_interval must be > 0"),
        (
            "sqlite:///q.db?poll_interval=0.5&max_poll_interval=0.1",
            "max_poll_interval must be >= poll_interval",
        ),
        ("sqlite://host/q.db", "has a host"),
        ("sqlite://", "names no file"),
    ],
)
def test_from_url_errors_are_precise(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SqliteBroker.from_url(url)


def test_constructor_does_no_io(tmp_path: Path) -> None:
    SqliteBroker(tmp_path / "never" / "q.db")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="poll_interval"):
        SqliteBroker(tmp_path / "q.db", poll_interval=1, max_poll_interval=0.5)


# -- errors and lifecycle --------------------------------------------------------------------


@pytest.mark.anyio
async def test_unopenable_and_corrupt_files_are_connection_lost(tmp_path: Path) -> None:
    with pytest.raises(ConnectionLost, match="sqlite"):
        await SqliteBroker(tmp_path).connect()  # a directory
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConnectionLost, match="not a database"):
        await SqliteBroker(garbage).connect()


@pytest.mark.anyio
async def test_use_before_connect_and_after_close_is_connection_lost(tmp_path: Path) -> None:
    broker = SqliteBroker(tmp_path / "q.db")
    with pytest.raises(ConnectionLost, match="not connected"):
        await broker.publish("t", b"x")
    with pytest.raises(ConnectionLost):
        await broker.consume("t", prefetch=1, visibility=1).__anext__()
    await broker.connect()
    await broker.connect()
    await broker.publish("t", b"x")
    sub = broker.consume("t", prefetch=1, visibility=LONG)
    d = await next_within(sub)
    await broker.aclose()
    await broker.aclose()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()
    for settle in (d.ack(), d.nack(), d.reject("x"), d.extend(1)):
        with pytest.raises(ConnectionLost):
            await settle
    with pytest.raises(ConnectionLost):
        await broker.dead_letters("t")


@pytest.mark.anyio
async def test_a_queued_message_id_is_not_enqueued_twice(tmp_path: Path) -> None:
    async with SqliteBroker(tmp_path / "q.db") as broker:
        assert await broker.publish("t", b"one", message_id="m") == "m"
        assert await broker.publish("t", b"two", message_id="m") == "m"
        await broker.publish("other", b"same id, other topic", message_id="m")
        async with broker.consume("t", prefetch=5, visibility=LONG) as sub:
            d = await next_within(sub)
            assert d.body == b"one"
            await assert_quiet(sub)
            await d.ack()
            await broker.publish("t", b"after ack", message_id="m")
            again = await next_within(sub)
            assert (again.body, again.attempt) == (b"after ack", 1)
            await again.ack()
        assert rows(tmp_path / "q.db", "SELECT topic, body FROM oncely_messages") == [
            ("other", b"same id, other topic")
        ]


@pytest.mark.anyio
async def test_closing_a_subscription_gives_buffered_claims_back_uncounted(
    tmp_path: Path,
) -> None:
    async with SqliteBroker(tmp_path / "q.db") as broker:
        for i in range(4):
            await broker.publish("t", b"%d" % i)
        sub = broker.consume("t", prefetch=10, visibility=LONG)
        first = await next_within(sub)
        # One claim took all four; three wait in the buffer.
        claimed = "SELECT COUNT(*) FROM oncely_messages WHERE claim_token IS NOT NULL"
        assert rows(tmp_path / "q.db", claimed) == [(4,)]
        await sub.aclose()
        assert (
            rows(
                tmp_path / "q.db", "SELECT attempts, claim_token IS NULL FROM oncely_messages"
            ).count((0, 1))
            == 3
        )
        async with broker.consume("t", prefetch=10, visibility=LONG) as again:
            rest = [await next_within(again) for _ in range(3)]
            assert [d.attempt for d in rest] == [1, 1, 1]
            for d in (first, *rest):
                await d.ack()


@pytest.mark.anyio
async def test_concurrent_acks_share_a_batch_and_a_stale_one_fails_alone(tmp_path: Path) -> None:
    async with SqliteBroker(tmp_path / "q.db") as broker:
        for i in range(20):
            await broker.publish("t", b"%d" % i)
        stale_sub = broker.consume("t", prefetch=1, visibility=0.2)
        stale = await next_within(stale_sub)
        await stale_sub.aclose()
        sub = broker.consume("t", prefetch=20, visibility=LONG)
        # Twenty: the stale one's visibility runs out and it is claimed again here.
        held = [await next_within(sub) for _ in range(20)]
        (fresh,) = [d for d in held if d.id == stale.id]
        assert fresh.attempt == 2
        results: dict[str, BaseException | None] = {}

        async def ack(d: Delivery, name: str) -> None:
            try:
                await d.ack()
                results[name] = None
            except DeliveryExpired as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(ack, stale, "stale")
            for i, d in enumerate(held):
                tg.start_soon(ack, d, f"d{i}")
        assert isinstance(results.pop("stale"), DeliveryExpired)
        assert set(results.values()) == {None} and len(results) == 20
        assert rows(tmp_path / "q.db", "SELECT COUNT(*) FROM oncely_messages") == [(0,)]
        await sub.aclose()


@pytest.mark.anyio
async def test_a_failed_ack_batch_fails_each_ack_with_its_own_error() -> None:
    cause = sqlite3.OperationalError("disk I/O error")
    statements = 0

    async def fetch(sql: str, params: tuple[Any, ...]) -> list[Any]:
        nonlocal statements
        statements += 1
        raise ConnectionLost(f"sqlite: {cause}") from cause

    acks = AckBatcher(fetch)
    errors: list[ConnectionLost] = []

    async def ack(rowid: int) -> None:
        with pytest.raises(ConnectionLost) as caught:
            await acks.ack(rowid, f"token{rowid}")
        errors.append(caught.value)

    async with anyio.create_task_group() as tg:
        for rowid in range(3):
            tg.start_soon(ack, rowid)
    assert statements == 1, "the three acks share one statement"
    assert len({id(e) for e in errors}) == 3
    assert all(e.__cause__ is cause and str(e) == "sqlite: disk I/O error" for e in errors)


@pytest.mark.anyio
async def test_dead_letters_and_replay_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    async with SqliteBroker(path) as broker:
        await broker.publish("t", b"poison", headers={"h": "v"}, message_id="p")
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            await (await next_within(sub)).reject("unparseable")
    async with SqliteBroker(path) as broker:
        (letter,) = await broker.dead_letters("t")
        assert (letter.id, letter.body, letter.reason, letter.attempt) == (
            "p",
            b"poison",
            "unparseable",
            1,
        )
        assert await broker.replay("t", ids=["p"]) == 1
    async with SqliteBroker(path) as broker:
        assert await broker.dead_letters("t") == []
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            d = await next_within(sub)
            # Replay restores the original headers, not the dead-letter annotations, and
            # marks the replay.
            headers = dict(d.headers)
            assert headers.pop("oncely-replay-count") == "1"
            assert float(headers.pop("oncely-replayed-at")) > 0
            assert (d.id, d.body, headers, d.attempt) == ("p", b"poison", {"h": "v"}, 1)
            await d.ack()


@pytest.mark.anyio
async def test_replay_leaves_a_dead_letter_whose_id_is_queued_again(tmp_path: Path) -> None:
    async with SqliteBroker(tmp_path / "q.db") as broker:
        await broker.publish("t", b"v1", message_id="m")
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            await (await next_within(sub)).reject("bad")
            await broker.publish("t", b"v2", message_id="m")
            assert await broker.replay("t") == 0
            assert [x.body for x in await broker.dead_letters("t")] == [b"v1"]
            await (await next_within(sub)).ack()
            assert await broker.replay("t") == 1
            d = await next_within(sub)
            assert (d.body, d.attempt) == (b"v1", 1)
            await d.ack()


# -- several processes -------------------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import asyncio, sqlite3, sys, time
    from contextlib import closing
    from pathlib import Path
    from oncely.brokers.sqlite import SqliteBroker
    from oncely.errors import DeliveryExpired

    db, topic, workers, me = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    barrier = Path(db).parent
    (barrier / f"ready-{me}").touch()
    give_up = time.monotonic() + 30
    while len(list(barrier.glob("ready-*"))) < workers:  # start together, to contend
        if time.monotonic() > give_up:
            sys.exit("barrier timed out")
        time.sleep(0.002)

    def remaining():
        with closing(sqlite3.connect(db, timeout=30)) as c:
            sql = "SELECT COUNT(*) FROM oncely_messages WHERE topic = ?"
            return c.execute(sql, (topic,)).fetchone()[0]

    async def main():
        claimed = []
        async with SqliteBroker(db, poll_interval=0.005) as broker:
            async with broker.consume(topic, prefetch=4, visibility=120) as sub:
                while True:
                    try:
                        d = await asyncio.wait_for(sub.__anext__(), 0.2)
                    except TimeoutError:
                        if remaining() == 0:  # everything acked by someone
                            break
                        continue
                    claimed.append(d.id)
                    await asyncio.sleep(0.0005)  # a little work, so claims interleave
                    try:
                        await d.ack()
                    except DeliveryExpired:  # only if someone else claimed it too
                        pass
        sys.stdout.write("\\n".join(claimed))

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.anyio
async def test_processes_sharing_a_file_claim_each_message_exactly_once(tmp_path: Path) -> None:
    path, workers, n = tmp_path / "q.db", 3, 900
    async with SqliteBroker(path) as broker:
        ids = {await broker.publish("jobs", b"%d" % i) for i in range(n)}
    outputs: list[str] = []

    async def work(me: int) -> None:
        argv = [sys.executable, "-c", CLAIMER, str(path), "jobs", str(workers), str(me)]
        done = await anyio.run_process(argv, cwd=ROOT, check=False)
        assert done.returncode == 0, done.stderr.decode()
        outputs.append(done.stdout.decode())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for me in range(workers):
                tg.start_soon(work, me)
    claims = [line for out in outputs for line in out.splitlines()]
    assert len(claims) == len(set(claims)), "a message was claimed by two consumers"
    assert set(claims) == ids
    assert sum(1 for out in outputs if out) >= 2, "the processes never ran concurrently"
    assert rows(path, "SELECT COUNT(*) FROM oncely_messages") == [(0,)]


PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from oncely.brokers.sqlite import SqliteBroker

    async def main():
        async with SqliteBroker(sys.argv[1]) as broker:
            for i in range(5):
                await broker.publish("t", b"%d" % i, headers={"i": str(i)}, message_id=f"m{i}")
            await broker.publish("t", b"later", message_id="late", delay=0.2)

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.anyio
async def test_another_process_publishes_to_an_idle_consumer(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    async with SqliteBroker(path, poll_interval=0.02, max_poll_interval=0.1) as broker:
        async with broker.consume("t", prefetch=10, visibility=LONG) as sub:
            await assert_quiet(sub, 0.3)  # idle long enough to back off to the ceiling
            argv = [sys.executable, "-c", PUBLISHER, str(path)]
            done = await anyio.run_process(argv, cwd=ROOT, check=False)
            assert done.returncode == 0, done.stderr.decode()
            got = {}
            with anyio.fail_after(1.0):  # polling at most every 0.1s finds them quickly
                for _ in range(6):
                    d = await sub.__anext__()
                    got[d.id] = (d.body, dict(d.headers))
                    await d.ack()
    assert got == {f"m{i}": (b"%d" % i, {"i": str(i)}) for i in range(5)} | {"late": (b"later", {})}


# -- settling when the file is locked ---------------------------------------------------------


@pytest.mark.anyio
async def test_settles_failing_on_a_locked_file_free_their_slots(tmp_path: Path) -> None:
    """Another process holds the write lock longer than the busy timeout while every held
    delivery is settled: each settle fails with ``ConnectionLost``, frees its prefetch slot and
    leaves its message to come back after its visibility. Once the lock is released, every
    queued message is processed."""
    path = tmp_path / "q.db"
    async with SqliteBroker.from_url(f"sqlite:///{path}?busy_timeout=0.05") as broker:
        assert broker.busy_timeout == 0.05
        ids = {await broker.publish("t", b"%d" % i) for i in range(12)}
        acked: set[str] = set()
        async with broker.consume("t", prefetch=4, visibility=0.5) as sub:
            held = [await next_within(sub) for _ in range(4)]
            with closing(sqlite3.connect(path, isolation_level=None)) as blocker:
                blocker.execute("BEGIN IMMEDIATE")
                settles = (held[0].ack(), held[1].nack(), held[2].reject("x"), held[3].ack())
                for settle in settles:
                    with pytest.raises(ConnectionLost, match="database is locked") as caught:
                        await settle
                    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
                blocker.execute("ROLLBACK")
            assert not any(d.settled for d in held)
            while acked != ids:
                d = await next_within(sub, 5.0)
                await d.ack()
                acked.add(d.id)
            await assert_quiet(sub)
    assert rows(path, "SELECT COUNT(*) FROM oncely_messages") == [(0,)]
    assert rows(path, "SELECT COUNT(*) FROM oncely_dead_letters") == [(0,)]


def test_busy_timeout_option_is_checked() -> None:
    assert SqliteBroker.from_url("sqlite:///q.db").busy_timeout == 30.0
    with pytest.raises(ConfigError, match="busy_timeout must be > 0"):
        SqliteBroker.from_url("sqlite:///q.db?busy_timeout=0")
