"""SQS adapter failure paths (settles, close, dead letters, FIFO holding, limits), on ElasticMQ
(``ONCELY_TEST_SQS_URL``; never skipped)."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from typing import Any

import pytest

from oncely.brokers import _sqs_admin
from oncely.brokers import _sqs_connection as sqs_connection
from oncely.brokers._sqs_consume import SqsSubscription
from oncely.brokers._sqs_wire import Outgoing, encode
from oncely.brokers.sqs import SqsBroker
from oncely.errors import BrokerError, ConnectionLost, DeliveryExpired, PublishFailed
from tests._wait import eventually
from tests.brokers.test_sqs import SQS_URL, broker, plain_client, topics

__all__ = ["broker", "topics"]  # the fixtures (from test_sqs), used by name

pytestmark = [pytest.mark.sqs, pytest.mark.anyio]


async def test_a_failed_ack_does_not_keep_its_prefetch_slot(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """An ack that fails with a broker error other than a stale handle (here: its queue was
    deleted under it) leaves the message to SQS; the subscription must not go on counting it
    against ``prefetch``, or a handful of such failures stalls consumption for good."""
    topics.append(unique)
    await broker.publish(unique, b"first")
    async with broker.consume(unique, prefetch=1, visibility=30) as sub:
        d = await asyncio.wait_for(anext(sub), 10)
        # prefetch=1 and one message out: no poll is in flight while the queue goes.
        url, _ = await broker.queue_urls(unique)
        async with plain_client() as client:
            await client.delete_queue(QueueUrl=url)
        with pytest.raises(BrokerError) as failed:
            await d.ack()
        assert not isinstance(failed.value, DeliveryExpired)
        mid = await broker.publish(unique, b"second")  # recreates the queue
        d2 = await asyncio.wait_for(anext(sub), 20)
        assert d2.id == mid
        await d2.ack()


async def test_settles_left_unsent_at_close_fail_their_callers_and_are_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts connections and never answers: the close's flush gives up on
    the ack's batch call. Its caller must get an error at once (not hang on a call nobody
    will finish), and since a cancelled handler no longer awaits it, the close logs it."""
    # The flush is given up either way; its default 10 s was nearly all of this test's time.
    monkeypatch.setattr(sqs_connection, "_CLOSE_FLUSH", 1.0)
    held: list[asyncio.StreamWriter] = []

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    broker = SqsBroker.from_url(f"sqs://?region=us-east-1&endpoint={endpoint}&wait=0")
    try:
        waiter = asyncio.ensure_future(broker._delete(f"{endpoint}/000000000000/q", "r1"))
        await eventually(lambda: bool(held))  # the batch call is on the wire
        with caplog.at_level(logging.ERROR, logger="oncely.brokers.sqs"):
            await broker.aclose()
        with pytest.raises(BrokerError):
            await asyncio.wait_for(waiter, 5)
        assert any("1 delete entry" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_fifo_dlq_replay_moves_every_dead_letter_of_a_group(
    broker: SqsBroker, unique: str, topics: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """SQS hands out no more of a FIFO group while some of it is received, so one scan of a
    FIFO DLQ reaches only the first 10 of a group: a listing says what it could not reach,
    and a replay of everything scans again until it has moved them all."""
    topic = unique + ".fifo"
    topics.append(topic)
    _, dlq = await broker.queue_urls(topic)
    ids = [f"{unique}-{i}" for i in range(25)]
    for mid in ids:  # dead letters of one group, as ``reject`` writes them
        out = encode(mid, b"{}", {"oncely-key": "g"}, max_size=262_144)
        await broker._send(dlq, out, group="g", dedupe=mid)
    with caplog.at_level(logging.WARNING, logger="oncely.brokers.sqs"):
        listed = await broker.dead_letters(topic, limit=100)
    assert len(listed) == 10
    assert any("more were out of reach" in r.getMessage() for r in caplog.records)
    assert await broker.replay(topic) == 25
    got: list[str] = []
    async with broker.consume(topic, prefetch=10, visibility=30) as sub:
        while len(got) < 25:
            d = await asyncio.wait_for(anext(sub), 10)
            got.append(d.id)
            await d.ack()
    assert got == ids, "replayed in their order"
    assert await broker.dead_letters(topic) == []


async def test_fifo_messages_held_past_their_visibility_keep_the_group_order(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """One receive brings three messages of a group; the first runs (extended) well past the
    2 s visibility the other two were received with. Once it is acked, the two still come
    next, in order, each once: expired while held, they are renewed or received afresh."""
    topic = unique + ".fifo"
    topics.append(topic)
    ids = [
        await broker.publish(topic, f"{i}".encode(), headers={"oncely-key": "g"}) for i in range(3)
    ]
    async with broker.consume(topic, prefetch=10, visibility=2) as sub:
        first = await asyncio.wait_for(anext(sub), 10)
        assert first.id == ids[0]
        assert isinstance(sub, SqsSubscription)
        assert [d.id for d in sub._held["g"]] == ids[1:], "one receive brought all three"
        for _ in range(5):  # the running handler's heartbeat; time passing is the subject
            await first.extend(3)  # a second more than the pause: a stall is not a lapse
            await asyncio.sleep(1)
        await first.ack()
        rest = []
        for _ in range(2):
            d = await asyncio.wait_for(anext(sub), 15)
            rest.append(d.id)
            await d.ack()
        assert rest == ids[1:]
    async with plain_client() as client:
        url, _ = await broker.queue_urls(topic)
        got = await client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    assert got["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert got["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"


async def test_a_header_spelling_an_adapter_attribute_is_refused(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """``oncely-body-encoding`` and ``oncely-headers`` are the adapter's own attributes: a
    caller's header of that name would make every consumer decode the body (or headers)
    wrongly, so the publish fails and nothing is sent."""
    topics.append(unique)
    for name in ("oncely-body-encoding", "oncely-headers"):
        with pytest.raises(PublishFailed, match=name):
            await broker.publish(unique, b"plain text", headers={name: "base64"})
    assert broker.api_calls["send"] == 0


async def test_a_refused_send_entry_fails_only_its_own_publish(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """Three publishes share one SendMessageBatch; ElasticMQ refuses the middle entry (a
    Number attribute that is no number: ``publish`` itself only writes String ones, so the
    entry is built by hand) and answers 200. Only that publish fails; the others arrive."""
    topics.append(unique)
    url, _ = await broker.queue_urls(unique)
    entries = [
        encode("a", b"a", {}, max_size=262_144),
        Outgoing("b", "b", {"n": {"DataType": "Number", "StringValue": "not a number"}}, 30),
        encode("c", b"c", {}, max_size=262_144),
    ]
    results = await asyncio.gather(
        *(broker._send(url, e, group=None, dedupe=e.id) for e in entries),
        return_exceptions=True,
    )
    assert broker.api_calls["send"] == 1, "one batch call"
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PublishFailed) and "InvalidAttributeValue" in str(results[1])
    got: set[str] = set()
    async with broker.consume(unique, prefetch=10, visibility=30) as sub:
        while len(got) < 2:
            d = await asyncio.wait_for(anext(sub), 10)
            got.add(d.id)
            await d.ack()
    assert got == {"a", "c"}


async def test_an_unreachable_server_fails_every_ack_of_the_batch() -> None:
    """The batch call cannot connect at all (nothing listens on the port): each of the
    acks sharing it gets ``ConnectionLost``, none waits for ever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # closed again: connections are refused
    broker = SqsBroker.from_url(f"sqs://?region=us-east-1&endpoint={endpoint}")
    try:
        url = f"{endpoint}/000000000000/q"
        results = await asyncio.wait_for(
            asyncio.gather(
                *(broker._delete(url, f"r{i}") for i in range(3)), return_exceptions=True
            ),
            60,
        )
        assert broker.api_calls["delete"] == 1
    finally:
        await broker.aclose()
    assert all(isinstance(r, ConnectionLost) for r in results), results


async def test_a_long_poll_cut_off_at_close_hands_back_what_it_caught(
    unique: str, topics: list[str]
) -> None:
    """A subscription closes while its 5 s long poll waits on the server; a message published
    just then is caught by that poll. The closing broker lets the poll finish and hands the
    message back at once (visibility 0), so another consumer gets it long before the 60 s
    visibility it was received with would run out."""
    topics.append(unique)
    url = SQS_URL.replace("wait=1", "wait=5")
    assert "wait=5" in url
    async with SqsBroker.from_url(url) as closing:
        await closing.queue_urls(unique)
        sub = closing.consume(unique, prefetch=1, visibility=60)
        waiting = asyncio.ensure_future(anext(sub))
        await eventually(lambda: closing.api_calls["receive"] == 1)
        await sub.aclose()
        await asyncio.gather(waiting, return_exceptions=True)
        mid = await closing.publish(unique, b"caught")
    assert closing.api_calls["receive"] == 1, "no poll after the cut-off one"
    async with SqsBroker.from_url(SQS_URL) as other:
        async with other.consume(unique, prefetch=1, visibility=30) as sub2:
            d = await asyncio.wait_for(anext(sub2), 20)
            assert (d.id, d.attempt) == (mid, 2), "received once by the cut-off poll"
            await d.ack()


async def test_an_ack_waiting_for_its_batch_at_close_is_sent(
    unique: str, topics: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Acks still waiting out ``ack_window`` when the broker closes are flushed, not dropped,
    and a close that sent everything logs no error."""
    topics.append(unique)
    url = SQS_URL + "&ack_window=1"
    broker = SqsBroker.from_url(url)
    await broker.connect()
    try:
        q, _ = await broker.queue_urls(unique)
        for i in range(3):
            await broker.publish(unique, f"{i}".encode())
        sub = broker.consume(unique, prefetch=3, visibility=60)
        got = [await asyncio.wait_for(anext(sub), 10) for _ in range(3)]
        acks = [asyncio.ensure_future(d.ack()) for d in got]
        await asyncio.sleep(0)  # the acks are queued in the batcher, its 1 s window running
        assert broker.api_calls["delete"] == 0
    finally:
        with caplog.at_level(logging.ERROR, logger="oncely.brokers.sqs"):
            await broker.aclose()
    await asyncio.gather(*acks)
    assert broker.api_calls["delete"] == 1
    assert not caplog.records, caplog.text
    async with plain_client() as client:
        attrs = await client.get_queue_attributes(QueueUrl=q, AttributeNames=["All"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"


async def test_a_foreign_message_with_many_attributes_is_dead_lettered_whole(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """A plain client's message with 10 attributes, one of them Binary: its dead letter needs
    4 more, so its own are packed into one; the binary one keeps its value (as base64, the
    way ``Delivery.headers`` shows it), not an empty string."""
    topics.append(unique)
    url, _ = await broker.queue_urls(unique)
    attributes: dict[str, Any] = {
        f"a{i}": {"DataType": "String", "StringValue": f"v{i}"} for i in range(9)
    }
    attributes["blob"] = {"DataType": "Binary", "BinaryValue": b"\x00\x01bin"}
    async with plain_client() as client:
        await client.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=attributes)
    async with broker.consume(unique, prefetch=1, visibility=30) as sub:
        d = await asyncio.wait_for(anext(sub), 10)
        headers = dict(d.headers)
        await d.reject("foreign")
    (letter,) = await broker.dead_letters(unique)
    assert letter.reason == "foreign"
    assert {k: letter.headers.get(k) for k in headers} == headers
    assert letter.headers["blob"] == base64.b64encode(b"\x00\x01bin").decode()


async def test_a_dlq_listing_outlasting_its_hold_still_lists_and_hands_back(
    broker: SqsBroker, unique: str, topics: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing holds each dead letter invisible for a while (30 s; 1 s here, so that the
    scan's closing 1 s wait outlasts it, as a scan of a large DLQ on AWS outlasts 30 s).
    Dead letters received again meanwhile carry new receipt handles: the listing must not
    fail on the stale ones, and must hand every letter back, visible at once."""
    monkeypatch.setattr(_sqs_admin, "_HOLD", 1)
    topics.append(unique)
    _, dlq = await broker.queue_urls(unique)
    for i in range(3):
        await broker._send(dlq, encode(f"m{i}", b"{}", {}, max_size=262_144), group=None, dedupe="")
    assert len(await broker.dead_letters(unique)) == 3
    async with plain_client() as client:
        got = await client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["All"])
    assert got["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"
