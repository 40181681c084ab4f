"""Shared helpers of the Kafka tests: the server URL, unique groups, raw reads of a topic."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

KAFKA_URL = os.environ.get("ONCELY_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
BOOTSTRAP = KAFKA_URL.removeprefix("kafka://").split("/")[0]


used = False
"""Whether a test of this run asked for the server (``kafka_url``): only then does the run
delete its topics at the end (``tests/conftest.py``)."""


def kafka_url(group: str | None = None, **options: object) -> str:
    """The test server's URL with a unique (or the given) group and extra options."""
    global used
    used = True
    query = {"group": group or f"g-{uuid.uuid4().hex[:12]}", **options}
    return f"kafka://{BOOTSTRAP}/?" + "&".join(f"{k}={v}" for k, v in query.items())


MARKERS_GRACE = 5.0
"""How long a read-committed ``read_topic`` waits for transactions to end in the topic: a
commit returns once the coordinator has logged it, and the coordinator writes its markers into
the output partitions after that, so a read right after a commit could miss its records."""


async def read_topic(
    topic: str, *, bootstrap: str = BOOTSTRAP, committed_only: bool = True, within: float = 60.0
) -> list[Any]:
    """Every record of ``topic`` up to its current end, in partition then offset order.

    ``committed_only``: what a read-committed reader sees, once every transaction in the topic
    has ended, or after ``MARKERS_GRACE`` seconds (a transaction left open on purpose)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed" if committed_only else "read_uncommitted",
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        if committed_only:
            ends = await _stable_ends(consumer, tps, ends, bootstrap)
        out: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        deadline = time.monotonic() + within
        while True:
            behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic} took over {within}s")
            batch = await consumer.getmany(*behind, timeout_ms=200)
            for tp, records in batch.items():
                out[tp.partition].extend(r for r in records if r.offset < ends[tp])
        return [r for p in sorted(out) for r in out[p]]
    finally:
        await consumer.stop()


async def _stable_ends(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    ends: dict[TopicPartition, int],
    bootstrap: str,
) -> dict[TopicPartition, int]:
    """``consumer``'s (read-committed) ends once they reach the partitions' high watermarks, or
    as they are after ``MARKERS_GRACE``."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    await probe.start()
    try:
        highs = await probe.end_offsets(tps)
    finally:
        await probe.stop()
    deadline = time.monotonic() + MARKERS_GRACE
    while any(ends[tp] < highs[tp] for tp in tps) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling the broker: there is nothing local to wait on
        ends = await consumer.end_offsets(tps)
    return ends


async def create_small_topic(topic: str, max_message_bytes: int, partitions: int = 1) -> None:
    """A topic (one partition unless told) whose broker refuses record batches over
    ``max_message_bytes`` (which the client's own 1 MiB check lets through): a send to it
    fails at the broker."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        config = {"max.message.bytes": str(max_message_bytes)}
        new = NewTopic(topic, partitions, 1, topic_configs=config)
        await admin.create_topics([new])
    finally:
        await admin.close()


async def create_compacted_topic(topic: str) -> None:
    """A one-partition compacted topic: the broker refuses a record without a key in it
    (INVALID_RECORD)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        config = {"cleanup.policy": "compact"}
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=config)])
    finally:
        await admin.close()


async def drop_topics(marker: str, *, within: float = 60.0) -> int:
    """Delete every topic whose name contains ``marker`` (a test run's, from the ``unique``
    fixture: its topics, retry and dead-letter topics). A long-lived broker otherwise keeps
    every run's partitions, and a few thousand of them slow it down for every later run and
    benchmark. Returns how many it deleted."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=int(within * 1000))
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if marker in name]
        if names:
            await admin.delete_topics(names, timeout_ms=int(within * 1000))
        return len(names)
    finally:
        await admin.close()


async def last_stable_and_end(topic: str, partition: int = 0) -> tuple[int, int]:
    """``topic[partition]``'s last stable offset (what read-committed readers may read up to:
    it stops at the first record of a transaction still open) and its end."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    tp = TopicPartition(topic, partition)
    ends: list[int] = []
    for level in ("read_committed", "read_uncommitted"):
        consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, isolation_level=level)
        await consumer.start()
        try:
            ends.append((await consumer.end_offsets([tp]))[tp])
        finally:
            await consumer.stop()
    return ends[0], ends[1]


async def publish_plain(
    topic: str, bodies: list[bytes], *, key: bytes, max_request_size: int
) -> None:
    """Publish ``bodies`` in order with a plain aiokafka producer that allows records up to
    ``max_request_size`` (oncely's own producers stop at 1 MiB), each with ``key`` as its
    Kafka key and its ``oncely-key`` header."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, max_request_size=max_request_size)
    await producer.start()
    try:
        for body in bodies:
            await producer.send_and_wait(topic, body, key=key, headers=[("oncely-key", key)])
    finally:
        await producer.stop()
