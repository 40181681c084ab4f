"""Listing and replaying ``<topic>.dlq``.

A Kafka topic cannot delete one record, so a replay appends a *marker* record to the DLQ
(empty body, ``oncely-replayed`` = the dead letter's ``partition:offset``) in the same
transaction that re-produces the message to ``<topic>``. A dead letter is listed while it has
no marker. Reads are ``read_committed`` and bounded by the end offsets taken at the start, so a
replay that is interrupted leaves either both records or neither, and running it again
replays exactly what is left.

A purge or replay returns once ``read_committed`` readers can see its markers. Kafka answers
the commit before the commit markers reach the partitions, and until they do the last stable
offset stays before the records, so a listing straight after would still show what was
purged or replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from oncely.brokers._kafka_options import (
    BODY_DROPPED,
    decode_headers,
    dlq_topic,
    encode_headers,
    map_errors,
)
from oncely.brokers._kafka_retry import ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC
from oncely.brokers.base import DeadLetter, Headers, replayed_headers

if TYPE_CHECKING:
    from oncely.brokers._kafka_link import BrokerLink

__all__ = ["list_dead_letters", "purge_dead_letters", "replay_dead_letters"]

log = logging.getLogger("oncely.brokers.kafka")

REPLAYED = "oncely-replayed"
PURGED = "oncely-purged"
_BATCH = 500
_DROP_ON_REPLAY = frozenset(
    {
        Headers.REASON,
        Headers.FAILED_AT,
        Headers.ATTEMPT,
        ORIGIN_TOPIC,
        ORIGIN_PARTITION,
        ORIGIN_OFFSET,
    }
)


def _committed_reader(broker: BrokerLink) -> AIOKafkaConsumer:
    """A consumer outside any group that sees committed records only (not started)."""
    opts = broker.options
    return AIOKafkaConsumer(
        bootstrap_servers=opts.bootstrap,
        client_id=f"{opts.client_id}-dlq",
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )


async def _read_all(broker: BrokerLink, topic: str) -> list[Any]:
    """Every committed record of ``topic`` up to its end offsets at the start of the call."""
    opts = broker.options
    consumer = _committed_reader(broker)
    records: list[Any] = []
    with map_errors(f"reading {topic}"):
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            deadline = time.monotonic() + opts.request_timeout
            while True:
                behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
                if not behind:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} took over {opts.request_timeout}s")
                batch = await consumer.getmany(*behind, timeout_ms=200)
                for tp, recs in batch.items():
                    records.extend(r for r in recs if r.offset < ends[tp])
        finally:
            await consumer.stop()
    return records


async def list_dead_letters(broker: BrokerLink, topic: str) -> list[tuple[DeadLetter, Any]]:
    """The dead letters of ``topic`` without a replay marker, oldest first, with their
    records."""
    dlq = dlq_topic(topic)
    await broker.ensure_topics([dlq], partitions=1)
    records = await _read_all(broker, dlq)
    replayed: set[str] = set()
    letters: list[tuple[DeadLetter, Any]] = []
    for record in records:
        headers = decode_headers(record.headers)
        if REPLAYED in headers or PURGED in headers:
            replayed.add(headers.get(REPLAYED) or headers[PURGED])
            continue
        try:
            attempt = int(headers.get(Headers.ATTEMPT, "1"))
        except ValueError:
            attempt = 1
        try:
            failed_at = float(headers.get(Headers.FAILED_AT, ""))
        except ValueError:
            failed_at = record.timestamp / 1000.0
        letter = DeadLetter(
            id=headers.get(Headers.MESSAGE_ID) or f"{dlq}/{record.partition}/{record.offset}",
            topic=topic,
            body=record.value or b"",
            headers=headers,
            reason=headers.get(Headers.REASON, ""),
            attempt=attempt,
            failed_at=failed_at,
        )
        letters.append((letter, record))
    live = [(ltr, r) for ltr, r in letters if f"{r.partition}:{r.offset}" not in replayed]
    live.sort(key=lambda item: (item[0].failed_at, item[1].offset))
    return live


async def replay_dead_letters(broker: BrokerLink, topic: str, ids: list[str] | None) -> int:
    """Re-produce dead letters (all, or those in ``ids``) to ``topic`` with a fresh attempt,
    each together with its marker in one transaction. Returns how many moved."""
    wanted = set(ids) if ids is not None else None
    chosen = [
        (ltr, r)
        for ltr, r in await list_dead_letters(broker, topic)
        if wanted is None or ltr.id in wanted
    ]
    empty = [letter.id for letter, _ in chosen if BODY_DROPPED in letter.headers]
    if empty:
        # Too large to copy: an empty body is not the message (``BODY_DROPPED``).
        log.warning(
            "%s: not replaying %d dead letter%s without a body (too large to copy; the "
            "original is at its oncely-original-* offset): %s",
            topic,
            len(empty),
            "" if len(empty) == 1 else "s",
            ", ".join(empty),
        )
        chosen = [(ltr, r) for ltr, r in chosen if BODY_DROPPED not in ltr.headers]
    if not chosen:
        return 0
    dlq = dlq_topic(topic)
    await broker.ensure_topics([topic])
    producer = broker.transactional_producer(f"oncely-dlq-replay-{broker.options.group}-{topic}")
    sent: list[asyncio.Future[Any]] = []
    with map_errors(f"replaying {dlq}", publishing=True):
        await producer.start()
        try:
            for i in range(0, len(chosen), _BATCH):
                async with producer.transaction():
                    for letter, record in chosen[i : i + _BATCH]:
                        headers = replayed_headers(
                            {k: v for k, v in letter.headers.items() if k not in _DROP_ON_REPLAY},
                            time.time(),
                        )
                        await producer.send(
                            topic, letter.body, key=record.key, headers=encode_headers(headers)
                        )
                        marker = {REPLAYED: f"{record.partition}:{record.offset}"}
                        sent.append(
                            await producer.send(
                                dlq, b"", key=record.key, headers=encode_headers(marker)
                            )
                        )
        finally:
            await producer.stop()
    await _until_visible(broker, dlq, sent)
    return len(chosen)


async def purge_dead_letters(broker: BrokerLink, topic: str, older_than: float | None) -> int:
    """Hide the dead letters of ``topic`` older than ``older_than`` seconds (all with
    ``None``) behind purge markers, in transactions. Returns how many were purged."""
    cutoff = None if older_than is None else time.time() - older_than
    chosen = [
        record
        for letter, record in await list_dead_letters(broker, topic)
        if cutoff is None or letter.failed_at < cutoff
    ]
    if not chosen:
        return 0
    dlq = dlq_topic(topic)
    producer = broker.transactional_producer(f"oncely-dlq-replay-{broker.options.group}-{topic}")
    sent: list[asyncio.Future[Any]] = []
    with map_errors(f"purging {dlq}", publishing=True):
        await producer.start()
        try:
            for i in range(0, len(chosen), _BATCH):
                async with producer.transaction():
                    for record in chosen[i : i + _BATCH]:
                        marker = {PURGED: f"{record.partition}:{record.offset}"}
                        sent.append(
                            await producer.send(
                                dlq, b"", key=record.key, headers=encode_headers(marker)
                            )
                        )
        finally:
            await producer.stop()
    await _until_visible(broker, dlq, sent)
    return len(chosen)


async def _until_visible(broker: BrokerLink, topic: str, sent: list[asyncio.Future[Any]]) -> None:
    """Wait until ``read_committed`` readers of ``topic`` can see every record in ``sent``
    (send futures of committed transactions): its last stable offset is past each of them.

    Another producer's open transaction on the partition holds that offset back too, so the
    wait is bounded by ``request_timeout``; past it the records are committed all the same
    and a warning says a listing may not show them yet."""
    last: dict[TopicPartition, int] = {}
    for future in sent:
        meta = future.result()
        tp = TopicPartition(topic, meta.partition)
        last[tp] = max(last.get(tp, -1), meta.offset)
    if not last:
        return
    opts = broker.options
    consumer = _committed_reader(broker)  # its end_offsets answer the last stable offsets
    deadline = time.monotonic() + opts.request_timeout
    delay = 0.01
    with map_errors(f"reading {topic}"):
        await consumer.start()
        try:
            while True:
                stable = await consumer.end_offsets(list(last))
                if all(stable[tp] > offset for tp, offset in last.items()):
                    return
                if time.monotonic() + delay > deadline:
                    log.warning(
                        "%s: the markers are committed but not yet visible to readers after "
                        "%ss (another producer's open transaction holds the partition); a "
                        "listing may still show those dead letters for a while",
                        topic,
                        opts.request_timeout,
                    )
                    return
                await asyncio.sleep(delay)  # the coordinator writes the markers in the background
                delay = min(delay * 2, 0.2)
        finally:
            await consumer.stop()
