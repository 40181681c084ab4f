"""Where the copy of a failed Kafka record goes, with which headers: shared by the
at-least-once subscription (which sends it at once) and the exactly-once side (which sends it
in the partition's transaction instead of the handler's outputs)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from oncely.brokers._kafka_delivery import dead_letter_headers, retry_headers
from oncely.brokers._kafka_options import bucket_for, dlq_topic, retry_topic

if TYPE_CHECKING:
    from oncely.brokers._kafka_delivery import KafkaDelivery
    from oncely.brokers._kafka_link import BrokerLink

__all__ = ["dead_letter_copy", "failure_copy"]


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
