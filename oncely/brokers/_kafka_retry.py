"""Where the copy of a failed Kafka record goes, with which headers: shared by the
at-least-once subscription (which sends it at once) and the exactly-once side (which sends it
in the partition's transaction instead of the handler's outputs). A dead letter also names
where it was consumed from (``ORIGIN_*``, which ``_kafka_dlq`` drops again on a replay)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from oncely.brokers._kafka_delivery import DUE
from oncely.brokers._kafka_options import bucket_for, dlq_topic, retry_topic
from oncely.brokers.base import Headers

if TYPE_CHECKING:
    from oncely.brokers._kafka_delivery import KafkaDelivery
    from oncely.brokers._kafka_link import BrokerLink

__all__ = [
    "ORIGIN_OFFSET",
    "ORIGIN_PARTITION",
    "ORIGIN_TOPIC",
    "dead_letter_copy",
    "dead_letter_headers",
    "failure_copy",
    "retry_headers",
]

ORIGIN_TOPIC = "oncely-original-topic"
ORIGIN_PARTITION = "oncely-original-partition"
ORIGIN_OFFSET = "oncely-original-offset"


async def failure_copy(
    broker: BrokerLink,
    topic: str,
    delivery: KafkaDelivery,
    how: str,
    delay: float,
    reason: str,
    attempt: int,
) -> tuple[str, dict[str, str]]:
    """(topic, headers) of the copy of ``delivery`` (consumed from ``topic``): for a
    ``reject``, ``<topic>.dlq`` (created if need be) with the dead-letter headers; for a
    ``nack``, the retry topic of ``delay``'s bucket, or ``topic`` itself for no delay, with
    ``attempt`` as the next delivery's."""
    if how == "reject":
        dlq = dlq_topic(topic)
        await broker.ensure_topics([dlq], partitions=1)
        return dead_letter_copy(topic, delivery, reason)
    if delay > 0:
        bucket = bucket_for(delay, broker.options.buckets)
        assert bucket is not None
        return retry_topic(topic, bucket), retry_headers(delivery, attempt, time.time() + delay)
    return topic, retry_headers(delivery, attempt, None)


def dead_letter_copy(
    topic: str, delivery: KafkaDelivery, reason: str
) -> tuple[str, dict[str, str]]:
    """(topic, headers) of ``delivery``'s dead letter, as ``failure_copy`` gives for a
    ``reject``, without creating the topic (the caller made sure it exists)."""
    return dlq_topic(topic), dead_letter_headers(delivery, reason, time.time())


def retry_headers(delivery: KafkaDelivery, attempt: int, due: float | None) -> dict[str, str]:
    """Headers for the re-produced copy of a nacked record: its id, key and first publish
    time are kept, ``oncely-attempt`` is the next delivery's attempt."""
    headers = dict(delivery.headers)
    headers[Headers.MESSAGE_ID] = delivery.id
    headers[Headers.ATTEMPT] = str(attempt)
    headers.setdefault(Headers.PUBLISHED_AT, repr(delivery.enqueued_at))
    if due is not None:
        headers[DUE] = repr(due)
    return headers


def dead_letter_headers(delivery: KafkaDelivery, reason: str, now: float) -> dict[str, str]:
    """Headers of a dead letter: the reason (which carries the handler's error), the attempt,
    the time, and where the record was consumed from."""
    headers = dict(delivery.headers)
    rec = delivery.record
    headers.update(
        {
            Headers.MESSAGE_ID: delivery.id,
            Headers.REASON: reason,
            Headers.ATTEMPT: str(delivery.attempt),
            Headers.FAILED_AT: repr(now),
            ORIGIN_TOPIC: rec.topic,
            ORIGIN_PARTITION: str(rec.partition),
            ORIGIN_OFFSET: str(rec.offset),
        }
    )
    headers.setdefault(Headers.PUBLISHED_AT, repr(delivery.enqueued_at))
    return headers
