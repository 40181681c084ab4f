"""Exactly-once: an output the broker refuses for good dead-letters its input record instead of
replaying the partition's transaction for ever. Real Kafka.

The output topic takes record batches of at most ``LIMIT`` bytes (the client's own check is
1 MiB, so the broker is the one to refuse). A few inputs make the handler produce an output over
that; every other output is small. Before, the transaction holding such an output failed, the
partition rewound, the same records produced the same output, and it failed again: nothing
after it was ever committed and nothing reached the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import oncely
from oncely.brokers import _kafka_eos
from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers._kafka_eos import ExactlyOnce
from oncely.brokers._kafka_options import dlq_topic
from oncely.brokers._kafka_refused import blame as real_blame
from oncely.brokers.base import Headers
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import DeliveryExpired
from tests._wait import eventually
from tests.brokers.kafka_support import (
    create_compacted_topic,
    create_small_topic,
    kafka_url,
    last_stable_and_end,
    publish_plain,
    read_topic,
)
from tests.brokers.test_kafka import committed_offsets
from tests.brokers.test_kafka_eos import eventually_offsets_within

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

LIMIT = 4000
"""The output topic's ``max.message.bytes``. A transaction of ``txn_messages=20`` small outputs
(about 80 bytes each) stays well under it, so only a batch holding a big output is refused."""

BIG = 5000
"""A poison input's output: over ``LIMIT``, and small enough to share a 16 KB producer batch with
the small outputs of its transaction (so that batch, not the big record alone, is refused)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def copier(
    src: str,
    out: str,
    poison: set[bytes],
    runs: Counter[bytes],
    *,
    compacted: bool,
    pair: bool = False,
) -> oncely.App:
    """Copies each input to ``out``; a poison input's output is too big for ``out``, or (to a
    compacted ``out``) has no key, which the broker refuses as INVALID_RECORD. ``pair``: a
    poison input sends a small output first, so its big one never has a batch to itself."""
    app = oncely.App()

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        runs[body] += 1
        if pair and body in poison:
            await ctx.produce(out, b"out-" + body)
        if not compacted:
            await ctx.produce(out, b"x" * BIG if body in poison else b"out-" + body)
        elif body in poison:
            await ctx.produce(out, b"out-" + body)
        else:
            await ctx.produce(out, b"out-" + body, key=body.decode())

    return app


async def copy_with_poison(
    unique: str,
    txn_messages: int,
    caplog: pytest.LogCaptureFixture,
    *,
    compacted: bool = False,
    pair: bool = False,
) -> None:
    src, out, group = unique, f"{unique}-out", f"g-{unique}"
    if compacted:
        await create_compacted_topic(out)
    else:
        await create_small_topic(out, LIMIT)
    poison = {b"13", b"37"}
    runs: Counter[bytes] = Counter()
    app = copier(src, out, poison, runs, compacted=compacted, pair=pair)
    url = kafka_url(group, exactly_once=src, txn_messages=txn_messages)
    caplog.set_level(logging.INFO, logger="oncely.brokers.kafka")
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        for i in range(50):
            await broker.publish(src, str(i).encode())
        async with oncely.Worker(app, broker=broker):
            await eventually_offsets_within(group, src, {0: 50}, 90)
            # The worker goes on: later records still flow through the same partition.
            for i in range(50, 60):
                await broker.publish(src, str(i).encode())
            await eventually_offsets_within(group, src, {0: 60}, 90)
    good = [str(i).encode() for i in range(60) if str(i).encode() not in poison]
    committed = [r.value for r in await read_topic(out)]
    assert committed == [b"out-" + body for body in good], "each once, in input order"
    dead = await read_topic(dlq_topic(src))
    assert sorted(r.value for r in dead) == sorted(poison), "the poison inputs, each once"
    for record in dead:
        reason = dict(record.headers)[Headers.REASON].decode()
        error = "INVALID_RECORD, errno 87" if compacted else "MessageSizeTooLargeError"
        assert error in reason and out in reason and " bytes " in reason, reason
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for record in dead:
        assert any(f"offset {record.value.decode()}" in m and "dead-letter" in m for m in warned)
    assert all(runs[body] >= 2 for body in poison), "ran again after the refusal"


async def test_a_refused_batch_of_several_outputs_dead_letters_only_the_culprit(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Transactions of 20 records: a big output shares its batch with other small outputs
    (its own record's small one at least, so even a transaction of one record has several),
    and the broker refuses the whole batch. The records whose outputs were in it are only
    suspects: the next attempt sends their outputs one per batch, which finds the culprit;
    the innocent ones are copied, each exactly once."""
    await copy_with_poison(unique, 20, caplog, pair=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any("one per batch" in m for m in messages), "the aggregate path was exercised"


async def test_a_refused_output_alone_in_its_batch_dead_letters_its_input(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``txn_messages=1``: transactions as small as they get (records passed while one commits
    still join the next, so a refused batch may still hold several outputs)."""
    await copy_with_poison(unique, 1, caplog)


async def test_the_only_output_to_its_topic_is_named_at_once(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The poison input's output is the transaction's only one to its topic: the refused
    batch held it alone, so its input is named at once, without a round of one output per
    batch."""
    src, out, big, group = unique, f"{unique}-out", f"{unique}-big", f"g-{unique}"
    await create_small_topic(big, LIMIT)
    app = oncely.App()

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        if body == b"13":
            await ctx.produce(big, b"x" * BIG)
        else:
            await ctx.produce(out, b"out-" + body)

    url = kafka_url(group, exactly_once=src, txn_messages=20)
    caplog.set_level(logging.INFO, logger="oncely.brokers.kafka")
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        for i in range(30):
            await broker.publish(src, str(i).encode())
        async with oncely.Worker(app, broker=broker):
            await eventually_offsets_within(group, src, {0: 30}, 90)
    committed = [r.value for r in await read_topic(out)]
    assert committed == [b"out-%d" % i for i in range(30) if i != 13], "each once, in order"
    assert [r.value for r in await read_topic(big)] == []
    dead = await read_topic(dlq_topic(src))
    assert [r.value for r in dead] == [b"13"]
    reason = dict(dead[0].headers)[Headers.REASON].decode()
    assert "MessageSizeTooLargeError" in reason and big in reason, reason
    assert f"{BIG} bytes (its value)" in reason, reason
    messages = [r.getMessage() for r in caplog.records]
    assert not any("one per batch" in m for m in messages), messages


async def test_an_invalid_record_dead_letters_its_input(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record without a key on a compacted topic is refused as INVALID_RECORD (errno 87,
    which aiokafka 0.14 does not know: oncely registers it, so that only this code, and not
    every code aiokafka lacks, counts as a refusal)."""
    await copy_with_poison(unique, 20, caplog, compacted=True)


async def test_keyed_outputs_over_several_partitions_keep_their_order(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two input partitions, an output topic of three, keyed outputs: a refused batch makes
    suspects only of the records whose key maps to its partition. Every other output is
    committed once, in input order per key; the poison inputs are dead-lettered."""
    src, out, group = unique, f"{unique}-out", f"g-{unique}"
    await create_small_topic(out, LIMIT, partitions=3)
    poison = {b"13", b"37", b"41"}
    app = oncely.App()

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        value = b"x" * BIG if body in poison else b"out-" + body
        await ctx.produce(out, value, key=ctx.headers.get("oncely-key"))

    url = kafka_url(group, exactly_once=src, txn_messages=20, partitions=2)
    n, keys = 80, 7
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        for i in range(n):
            await broker.publish(src, str(i).encode(), headers={"oncely-key": f"k{i % keys}"})
        ends = {0: 0, 1: 0}
        for record in await read_topic(src):
            ends[record.partition] = record.offset + 1
        async with oncely.Worker(app, broker=broker):
            await eventually_offsets_within(group, src, ends, 90)
    by_key: dict[bytes, list[bytes]] = {}
    for record in await read_topic(out):
        by_key.setdefault(record.key, []).append(record.value)
    expected: dict[bytes, list[bytes]] = {}
    for i in range(n):
        if str(i).encode() not in poison:
            expected.setdefault(f"k{i % keys}".encode(), []).append(f"out-{i}".encode())
    assert by_key == expected, "each once, in input order per key"
    dead = await read_topic(dlq_topic(src))
    assert sorted(r.value for r in dead) == sorted(poison)


async def test_a_batch_refused_only_for_its_total_size_dead_letters_nobody(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every output is small, but a transaction's batch of them is over the topic's limit:
    the broker refuses the batch, and sent one per batch each output is accepted. No record
    is to blame, so none is dead-lettered: all are copied, each once and in order."""
    src, out, group = unique, f"{unique}-out", f"g-{unique}"
    await create_small_topic(out, LIMIT)
    app = oncely.App()

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, b"out-" + body + b"." * 200)

    caplog.set_level(logging.INFO, logger="oncely.brokers.kafka")
    n = 120
    url = kafka_url(group, exactly_once=src, txn_messages=60)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out, dlq_topic(src)])  # to read it empty
        for i in range(n):
            await broker.publish(src, str(i).encode())
        async with oncely.Worker(app, broker=broker):
            await eventually_offsets_within(group, src, {0: n}, 90)
    committed = [r.value for r in await read_topic(out)]
    assert committed == [f"out-{i}".encode() + b"." * 200 for i in range(n)]
    assert await read_topic(dlq_topic(src)) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("one per batch" in m for m in messages), "a batch was refused"


async def held_at_offset_1(
    app: oncely.App,
    names: tuple[str, str, str],
    caplog: pytest.LogCaptureFixture,
    says: Callable[[str], bool],
    *,
    publish: bool = True,
) -> None:
    """Run ``app`` exactly-once (a transaction per record) until an ERROR that ``says`` is
    logged twice (tried again, refused again) while the input partition holds at offset 1;
    then only ``a``'s output is out, nothing is dead-lettered and nothing past ``a`` is
    committed. ``names``: the input topic, the output topic and the group; ``publish``:
    publish ``a``, a 1,500-byte record and ``b`` first (else the caller did)."""
    src, out, group = names
    caplog.set_level(logging.INFO, logger="oncely.brokers.kafka")
    url = kafka_url(group, exactly_once=src, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        if publish:
            for body in (b"a", b"y" * 1500, b"b"):  # one key: one at a time, a commits alone
                await broker.publish(src, body, headers={"oncely-key": "k"})
        async with oncely.Worker(app, broker=broker):

            def stuck() -> int:
                return sum(
                    r.levelno == logging.ERROR and says(r.getMessage()) for r in caplog.records
                )

            await eventually(lambda: stuck() >= 2, 60)
            assert await committed_offsets(group, src) == {0: 1}
    assert [r.value for r in await read_topic(out)] == [b"out-a"]
    assert await read_topic(dlq_topic(src)) == []
    assert await committed_offsets(group, src) == {0: 1}


async def test_a_refused_dead_letter_record_holds_the_partition_and_loses_nothing(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """If the dead-letter topic refuses the poison record's copy too, nothing is left to
    commit in its place: the partition stays at that offset and says so at ERROR, rather than
    committing past a record that went nowhere."""
    src, out, group = unique, f"{unique}-out", f"g-{unique}"
    await create_small_topic(out, LIMIT)
    await create_small_topic(dlq_topic(src), 1000)
    app = oncely.App()

    @app.handler(src)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, b"x" * BIG if len(body) > 1000 else b"out-" + body)

    await held_at_offset_1(app, (src, out, group), caplog, lambda m: "its dead-letter record" in m)


async def test_a_rejected_record_whose_dead_letter_is_refused_says_so_at_error(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's own ``Reject`` whose dead-letter record the broker refuses: as for a poison
    record's copy, nothing is left to send instead, so the partition holds at that offset with
    an ERROR on each attempt. It used to be taken for a new poison record (a WARNING that its
    dead-letter record replaces its outputs, which it never did), the partition stuck for good
    with no ERROR at all."""
    src, out, group = unique, f"{unique}-out", f"g-{unique}"
    await create_small_topic(dlq_topic(src), 1000)
    app = oncely.App()

    @app.handler(src)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        if len(body) > 1000:
            raise oncely.Reject("too big to keep")
        await ctx.produce(out, b"out-" + body)

    says = "offset 1: its dead-letter record"
    await held_at_offset_1(app, (src, out, group), caplog, lambda m: says in m)
    misleading = [m for r in caplog.records if "replaces its outputs" in (m := r.getMessage())]
    assert misleading == []


@pytest.mark.parametrize("failure", ["reject", "retry"])
@pytest.mark.parametrize("size", [1_200_000, 1_048_576 - 200], ids=["over", "just-under"])
async def test_a_failing_record_too_large_to_copy_is_dead_lettered_without_its_body(
    unique: str, caplog: pytest.LogCaptureFixture, size: int, failure: str
) -> None:
    """An input topic that allows records over the producer's 1 MiB ``max_request_size``: a
    failing handler's record can then have no retry or dead-letter copy (the client refuses
    it before it goes out), and every replay fails the same way. It held the partition at
    that offset for good, the handler running again and again (an ERROR each attempt). Now
    it is dead-lettered without its body, at ERROR once, the letter naming the original's
    offset and size, and the partition goes on; ``replay`` skips such a letter (an empty
    body is not the message). ``just-under``: a record the producer could send, whose
    dead-letter headers take its copy over the limit."""
    src, out, group = unique, f"{unique}-out", f"g-{unique}"
    await create_small_topic(src, 4_000_000)  # larger records allowed than oncely sends
    app = oncely.App()

    @app.handler(src, retry=oncely.RetryPolicy(max_attempts=5, base=0.01, cap=0.01))
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        if len(body) > 1000:
            if failure == "reject":
                raise oncely.Reject("too big to keep")
            raise RuntimeError("try again")
        await ctx.produce(out, b"out-" + body)

    # One key: one at a time.
    await publish_plain(src, [b"a", b"y" * size, b"b"], key=b"k", max_request_size=4_000_000)
    caplog.set_level(logging.INFO, logger="oncely.brokers.kafka")
    url = kafka_url(group, exactly_once=src, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually_offsets_within(group, src, {0: 3}, 60)
        # The counters say what happened: a dead letter, not a retry (before, the retry's
        # nack counted as retried and nacked, and no dead letter).
        assert worker.stats.dead_lettered == 1, worker.stats
        assert worker.stats.retried == 0 and worker.stats.nacked == 0, worker.stats
        errors = [
            m
            for r in caplog.records
            if r.levelno == logging.ERROR and "offset 1: its" in (m := r.getMessage())
        ]
        assert len(errors) == 1, errors
        assert "dead-lettered without its body" in errors[0]
        assert [r.value for r in await read_topic(out)] == [b"out-a", b"out-b"]
        (letter,) = await read_topic(dlq_topic(src))
        headers = {k: v.decode() for k, v in letter.headers}
        assert letter.value == b""
        assert headers["oncely-dead-letter-body-dropped"] == str(size)
        where = (headers["oncely-original-partition"], headers["oncely-original-offset"])
        assert where == ("0", "1")
        assert "max_request_size" in headers[Headers.REASON]
        assert await broker.replay(src) == 0
        assert "not replaying 1 dead letter without a body" in caplog.text


async def test_at_least_once_a_refused_output_fails_the_handler(unique: str) -> None:
    """At-least-once, ``produce`` publishes at once: the handler sees the refusal, so its
    retries and then the dead-letter topic apply (the exactly-once bug never arises), and the
    records after it are copied: the refused batch spent sequence numbers the broker never
    wrote, and before the broker restarted its idempotent producer after a refusal, every
    later record of that partition failed with OutOfOrderSequenceNumber (and was
    dead-lettered in turn).

    Handlers run one at a time: a batch the big output shares with others is refused whole
    (aiokafka does not split it), so those would fail and be retried; not what this checks."""
    out = f"{unique}-out"
    await create_small_topic(out, LIMIT)
    runs: Counter[bytes] = Counter()
    app = oncely.App()

    @app.handler(
        unique, concurrency=1, retry=oncely.RetryPolicy(max_attempts=2, base=0.01, cap=0.01)
    )
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        runs[body] += 1
        await ctx.produce(out, b"x" * BIG if body == b"big" else body)

    async with KafkaBroker.from_url(kafka_url()) as broker:
        await broker.ensure_topics([unique, out])
        for body in (b"a", b"b", b"big", b"c", b"d"):
            await broker.publish(unique, body)
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(lambda: worker.stats.dead_lettered == 1, 60)
            await eventually(lambda: worker.stats.processed == 4, 60)
    assert runs[b"big"] == 2
    assert [r.value for r in await read_topic(out)] == [b"a", b"b", b"c", b"d"]
    assert runs[b"c"] == runs[b"d"] == 1
    [dead] = await read_topic(dlq_topic(unique))
    assert dead.value == b"big"


async def test_a_commit_failing_while_its_partition_is_released_is_aborted(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscription closes while a commit is failing (a refused output): the release
    waits for the partition's lock, and the failed commit gives the partition up instead of
    starting it over. Its transaction is still open on the broker (the outputs written before
    the refusal in it), and nobody takes the partition after a close: unless the release
    aborts it, read-committed readers of those outputs' partitions stay stuck until the
    broker's transaction timeout (60 s) ends it. Seen on ``side``: its last stable offset must
    reach its end, well before that timeout.

    ``blame`` is held (after it ran) until the release has begun: only the order of the two
    is pinned, Kafka and the producers are real."""
    group, out, side = f"g-{unique}", f"{unique}-out", f"{unique}-side"
    await create_small_topic(out, LIMIT)
    reached, released = asyncio.Event(), asyncio.Event()
    real_release = ExactlyOnce.release

    async def held_blame(*args: Any) -> bool:
        found = await real_blame(*args)
        reached.set()
        await asyncio.wait_for(released.wait(), 30)
        return found

    async def noted_release(self: ExactlyOnce, tracks: list[Any]) -> None:
        if tracks:  # (the group's first join revokes nothing)
            released.set()  # nothing runs before it takes the partition out and waits its lock
        await real_release(self, tracks)

    monkeypatch.setattr(_kafka_eos, "blame", held_blame)
    monkeypatch.setattr(ExactlyOnce, "release", noted_release)
    url = kafka_url(group, exactly_once=unique, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([side, out])
        await broker.publish(unique, b"a")
        sub = broker.consume(unique, prefetch=1, visibility=30)
        d = await asyncio.wait_for(sub.__anext__(), 15)
        assert isinstance(d, ExactlyOnceDelivery)
        await d.produce(side, b"side-a")
        await d.produce(out, b"x" * BIG)
        acking = asyncio.create_task(d.ack())
        await asyncio.wait_for(reached.wait(), 30)
        await sub.aclose()
        with pytest.raises(DeliveryExpired):
            await acking
    assert await committed_offsets(group, unique) == {}
    deadline = asyncio.get_running_loop().time() + 20  # a third of the transaction timeout
    while (ends := await last_stable_and_end(side))[0] != ends[1]:
        assert asyncio.get_running_loop().time() < deadline, f"last stable, end: {ends}"
        await asyncio.sleep(0.2)
    assert await read_topic(side) == [], "the transaction was aborted, not committed"
