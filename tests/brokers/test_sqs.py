"""SQS broker on a real SQS-compatible server (ElasticMQ from ``scripts/services.sh``; never
skipped: a missing server fails these tests). The URL comes from ``ONCELY_TEST_SQS_URL``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from typing import TYPE_CHECKING, Any

import pytest
from aiobotocore.session import AioSession

import oncely
from oncely.brokers._sqs_delivery import SqsDelivery
from oncely.brokers._sqs_options import parse_url
from oncely.brokers._sqs_wire import MAX_VISIBILITY, dlq_name, queue_name
from oncely.brokers.sqs import SqsBroker
from oncely.errors import NotSupported, PublishFailed
from tests._wait import eventually

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from types_aiobotocore_sqs import SQSClient

# ElasticMQ takes any credentials; real AWS ones in the environment are left alone.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "oncely-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "oncely-test")

ENDPOINT = os.environ.get("ONCELY_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")
SQS_URL = os.environ.get(
    "ONCELY_TEST_SQS_URL", f"sqs://?region=us-east-1&endpoint={ENDPOINT}&wait=1"
)

pytestmark = pytest.mark.sqs


@contextlib.asynccontextmanager
async def plain_client(endpoint: str = ENDPOINT) -> AsyncIterator[SQSClient]:
    """A bare aiobotocore client, as a user without oncely would have."""
    async with AioSession().create_client(
        "sqs", region_name="us-east-1", endpoint_url=endpoint
    ) as client:
        yield client


async def delete_queues(topics: list[str], url: str = SQS_URL) -> None:
    """Remove the queues tests created (ElasticMQ keeps them until it restarts)."""
    options = parse_url(url)
    async with plain_client(options.endpoint or ENDPOINT) as client:
        for topic in topics:
            for name in (queue_name(topic, options), dlq_name(topic, options)):
                with contextlib.suppress(Exception):
                    got = await client.get_queue_url(QueueName=name)
                    await client.delete_queue(QueueUrl=got["QueueUrl"])


async def queue_counts(topic: str, url: str = SQS_URL) -> tuple[str, str]:
    """``topic``'s queue as the server counts it: (visible, in flight) messages."""
    options = parse_url(url)
    async with plain_client(options.endpoint or ENDPOINT) as client:
        queue = (await client.get_queue_url(QueueName=queue_name(topic, options)))["QueueUrl"]
        got = await client.get_queue_attributes(
            QueueUrl=queue,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    counts = got["Attributes"]
    return counts["ApproximateNumberOfMessages"], counts["ApproximateNumberOfMessagesNotVisible"]


@pytest.fixture
async def topics() -> AsyncIterator[list[str]]:
    """Topics a test uses; their queues are deleted afterwards."""
    made: list[str] = []
    yield made
    await delete_queues(made)


@pytest.fixture
async def broker(topics: list[str]) -> AsyncIterator[SqsBroker]:
    # Closed before ``topics`` deletes the queues: ElasticMQ does not answer a long poll on a
    # queue deleted under it.
    async with SqsBroker.from_url(SQS_URL) as b:
        yield b


# ------------------------------------------------------------------------------ the broker


@pytest.mark.anyio
async def test_too_many_headers_fail_naming_the_limit_and_send_nothing(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    topics.append(unique)
    headers = {f"x-h{i}": "v" for i in range(7)}
    with pytest.raises(PublishFailed, match=r"at most 10 message attributes.*x-h0, x-h1"):
        await broker.publish(unique, b"{}", headers=headers)
    # A binary body needs one attribute more, so six headers no longer fit either.
    with pytest.raises(PublishFailed, match="oncely-body-encoding"):
        await broker.publish(unique, b"\xff", headers={f"x-h{i}": "v" for i in range(6)})
    six = {f"x-h{i}": "v" for i in range(6)}
    mid = await broker.publish(unique, b"{}", headers=six)
    async with broker.consume(unique, prefetch=10, visibility=30) as sub:
        d = await anext(sub)
        assert d.id == mid and {k: d.headers[k] for k in six} == six
        await d.ack()
    assert broker.api_calls["send"] == 1, "a refused publish must not reach SQS"


@pytest.mark.anyio
async def test_oversized_payload_fails_naming_size_and_limit(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    topics.append(unique)
    limit = broker.options.max_message_size
    with pytest.raises(PublishFailed, match=rf"is \d+ bytes.*limit is {limit} bytes"):
        await broker.publish(unique, b"x" * limit)
    with pytest.raises(PublishFailed, match="base64-encoded"):
        await broker.publish(unique, b"\xff" * (limit * 3 // 4))
    assert broker.api_calls["send"] == 0


@pytest.mark.anyio
async def test_plain_sender_is_consumed_and_plain_reader_reads_oncely(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    topics.append(unique)
    url, _ = await broker.queue_urls(unique)
    async with plain_client() as client:
        sent = await client.send_message(
            QueueUrl=url,
            MessageBody='{"from": "plain"}',
            MessageAttributes={"origin": {"DataType": "String", "StringValue": "boto"}},
        )
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            d = await anext(sub)
            assert (d.id, d.body, d.attempt) == (sent["MessageId"], b'{"from": "plain"}', 1)
            assert d.headers == {"origin": "boto"} and d.key == d.id
            await d.ack()

        mid = await broker.publish(unique, b'{"from": "oncely"}', headers={"oncely-key": "k1"})
        got = await client.receive_message(
            QueueUrl=url, WaitTimeSeconds=5, MessageAttributeNames=["All"]
        )
        (m,) = got["Messages"]
        assert m["Body"] == '{"from": "oncely"}'
        attrs = {k: v["StringValue"] for k, v in m["MessageAttributes"].items()}
        assert attrs == {"oncely-key": "k1", "oncely-message-id": mid}
        await client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


@pytest.mark.anyio
async def test_partial_delete_batch_failure_is_surfaced_per_entry(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """Three stale receipt handles and three fresh ones go out in one DeleteMessageBatch:
    SQS answers 200 with three entries Failed; exactly those acks raise, the rest delete."""
    topics.append(unique)
    ids = {await broker.publish(unique, f"m{i}".encode()) for i in range(3)}
    first = broker.consume(unique, prefetch=3, visibility=1)
    stale = [await anext(first) for _ in range(3)]
    second = broker.consume(unique, prefetch=3, visibility=60)
    fresh = [await anext(second) for _ in range(3)]  # after the first visibility ran out
    assert {d.id for d in fresh} == ids and {d.attempt for d in fresh} == {2}
    deletes = broker.api_calls["delete"]
    results = await asyncio.gather(*(d.ack() for d in stale + fresh), return_exceptions=True)
    assert broker.api_calls["delete"] == deletes + 1, "one batch call for the six acks"
    assert [type(r).__name__ for r in results] == ["DeliveryExpired"] * 3 + ["NoneType"] * 3
    assert not any(d.settled for d in stale) and all(d.settled for d in fresh)
    await first.aclose()
    await second.aclose()
    assert await queue_counts(unique) == ("0", "0")


@pytest.mark.anyio
async def test_heartbeat_extensions_are_batched(
    unique: str, topics: list[str], report: Callable[[str], None]
) -> None:
    """30 handlers outlive their 3 s visibility; each beat extends all 30 in a few
    ChangeMessageVisibilityBatch calls (3 when full), and no message is delivered twice."""
    topics.append(unique)
    app = oncely.App()
    runs: collections.Counter[str] = collections.Counter()
    release = asyncio.Event()

    @app.handler(unique, concurrency=30, visibility=3.0, timeout=60)
    async def slow(p: dict[str, Any]) -> None:
        runs[p["n"]] += 1
        await release.wait()

    async with oncely.Worker(app, broker=SQS_URL) as worker:
        for n in range(30):
            await app.publish(unique, {"n": n})
        await eventually(lambda: len(runs) == 30)
        assert isinstance(worker.broker, SqsBroker)
        calls, entries = worker.broker.api_calls, worker.broker.api_entries
        base, base_entries = calls["change_visibility"], entries["change_visibility"]
        # Several beats (one per visibility / 3 = 1 s), each extending all 30.
        await eventually(lambda: entries["change_visibility"] - base_entries >= 90, within=20)
        release.set()
        await eventually(lambda: worker.stats.processed == 30)
        assert max(runs.values()) == 1
    made = calls["change_visibility"] - base
    extended = entries["change_visibility"] - base_entries
    report(f"SQS heartbeat: {extended} extensions of 30 running handlers in {made} calls")
    assert extended >= 5 * made, f"{extended} extensions in {made} calls: not batched"


@pytest.mark.anyio
async def test_long_handler_is_never_redelivered_while_heartbeat_runs(
    unique: str, topics: list[str]
) -> None:
    """A handler runs three times its 3 s visibility; another consumer polls all along and
    must see nothing; the message is handled once and acked. (Seconds: ElasticMQ keeps the
    time, so a stall of the test process must stay well inside a window.)"""
    topics.append(unique)
    app = oncely.App()
    started, done = asyncio.Event(), asyncio.Event()
    runs = 0

    @app.handler(unique, concurrency=1, visibility=3.0, timeout=60)
    async def slow(p: dict[str, Any]) -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.sleep(9.0)  # the visibility that must be extended is the subject
        done.set()

    seen: list[tuple[str, int]] = []
    async with SqsBroker.from_url(SQS_URL) as other:

        async def poll() -> None:
            async for d in other.consume(unique, prefetch=1, visibility=2):
                seen.append((d.id, d.attempt))

        async with oncely.Worker(app, broker=SQS_URL) as worker:
            await app.publish(unique, {"job": 1})
            await started.wait()
            poller = asyncio.create_task(poll())
            await asyncio.wait_for(done.wait(), 30)
            await eventually(lambda: worker.stats.processed == 1)
            # Long enough for a lapsed visibility to show at the other consumer.
            await asyncio.sleep(3.5)
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
    assert runs == 1
    assert seen == []


@pytest.mark.anyio
async def test_extension_stops_at_the_12_hour_cap(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """The cap counts from the receive; the delivery's receive time is moved 12 hours back
    rather than waiting for it."""
    topics.append(unique)
    await broker.publish(unique, b"{}")
    async with broker.consume(unique, prefetch=1, visibility=30) as sub:
        d = await anext(sub)
        assert isinstance(d, SqsDelivery)
        await d.extend(60)
        calls = broker.api_calls["change_visibility"]
        assert calls == 1
        d.received -= MAX_VISIBILITY - 30  # 30 s of the 12 hours left (less a 5 s margin)
        await d.extend(60)  # extends to what is left, and counts the cap
        assert broker.visibility_capped == 1
        assert broker.api_calls["change_visibility"] == calls + 1
        d.received -= 30
        await d.extend(60)  # nothing left: no call at all
        await d.extend(60)
        assert broker.visibility_capped == 1, "counted once per delivery"
        assert broker.api_calls["change_visibility"] == calls + 1
        with pytest.raises(NotSupported, match="12 hours"):
            await d.nack(60)
        await d.ack()


@pytest.mark.anyio
async def test_concurrent_publishes_share_send_batches(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    topics.append(unique)
    await broker.queue_urls(unique)
    ids = await asyncio.gather(*(broker.publish(unique, f"{i}".encode()) for i in range(25)))
    assert broker.api_entries["send"] == 25
    assert broker.api_calls["send"] == 3, "25 publishes at once go as batches of 10, 10 and 5"
    got: list[str] = []
    async with broker.consume(unique, prefetch=25, visibility=30) as sub:
        while len(got) < 25:
            d = await asyncio.wait_for(anext(sub), 10)
            got.append(d.id)
            await d.ack()
    assert sorted(got) == sorted(ids)


@pytest.mark.anyio
async def test_take_ready_hands_over_received_messages_and_nothing_once_shut_down(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """``take_ready`` is how the consume loop takes the rest of a receive's batch without a
    coroutine each: it hands over what was received, and once the subscription is shut down
    nothing more, even what is still buffered (``__anext__`` then ends the iteration)."""
    topics.append(unique)
    sent = [await broker.publish(unique, f'{{"n": {n}}}'.encode()) for n in range(5)]
    sub = broker.consume(unique, prefetch=10, visibility=30)
    try:
        assert sub.take_ready() is None  # polling starts with the first __anext__
        got = [await anext(sub)]
        while len(got) < 5:
            ready = sub.take_ready()
            got.append(ready if ready is not None else await anext(sub))
        assert sorted(d.id for d in got) == sorted(sent)
        assert sub.take_ready() is None
        for d in got:
            await d.ack()
        more = {await broker.publish(unique, b"{}") for _ in range(3)}
        got = [await anext(sub)]
        # The others of that receive (or the next) wait in the subscription's buffer.
        await eventually(lambda: len(sub._ready) == 2)
        sub.shutdown()
        assert sub.take_ready() is None
        with pytest.raises(StopAsyncIteration):
            await anext(sub)
        assert got[0].id in more
    finally:
        await sub.aclose()
