"""Queues of ``SqsBroker``: found or created, idempotently, on a topic's first use.

Per topic: the DLQ first (14 days' retention, the SQS maximum), then the queue with a
``RedrivePolicy`` pointing at it (``max_receive_count``), both FIFO for FIFO topics. A queue
that exists with other attributes is used as it is, with a warning; with ``create=0`` a
missing queue is a ``ConfigError``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from oncely.brokers._sqs_errors import is_missing_queue, map_errors
from oncely.brokers._sqs_wire import dlq_name, is_fifo, queue_name
from oncely.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeNameType

    from oncely.brokers._sqs_link import BrokerLink

log = logging.getLogger("oncely.brokers.sqs")

_RETENTION = "1209600"  # 14 days, the SQS maximum, for dead letters


async def resolve(broker: BrokerLink, topic: str) -> tuple[str, str]:
    """Find or create the queue and DLQ of ``topic``; returns their URLs."""
    client = await broker._connected()
    o = broker.options
    name, dlq = queue_name(topic, o), dlq_name(topic, o)
    fifo: dict[QueueAttributeNameType, str] = {"FifoQueue": "true"} if is_fifo(topic, o) else {}
    if not o.create:
        return await _existing(broker, client, name), await _existing(broker, client, dlq)
    dlq_attributes = dict(fifo)
    dlq_attributes["MessageRetentionPeriod"] = _RETENTION
    dlq_url = await _create(broker, client, dlq, dlq_attributes)
    attributes = dict(fifo)
    if o.max_receive_count:
        broker.api_calls["admin"] += 1
        with map_errors("admin"):
            got = await client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
        arn = got["Attributes"]["QueueArn"]
        attributes["RedrivePolicy"] = (
            f'{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{o.max_receive_count}"}}'
        )
    return await _create(broker, client, name, attributes), dlq_url


async def lookup(broker: BrokerLink, topic: str) -> str:
    """The URL of ``topic``'s queue, which must exist: a look-up that never creates it.

    Raises:
        BrokerError: the queue does not exist (``QueueDoesNotExist``) or SQS refused the call.
    """
    client = await broker._connected()
    broker.api_calls["admin"] += 1
    with map_errors("admin"):
        url: str = (await client.get_queue_url(QueueName=queue_name(topic, broker.options)))[
            "QueueUrl"
        ]
    return url


async def dlq_exists(broker: BrokerLink, topic: str) -> bool:
    """Whether ``topic``'s DLQ exists: GetQueueUrl, which never creates it."""
    client = await broker._connected()
    try:
        await _existing(broker, client, dlq_name(topic, broker.options))
    except ConfigError:
        return False
    return True


async def _create(
    broker: BrokerLink, client: SQSClient, name: str, attributes: dict[QueueAttributeNameType, str]
) -> str:
    broker.api_calls["admin"] += 1
    try:
        with map_errors("admin"):
            return (await client.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    except BrokerError as exc:
        if "QueueAlreadyExists" not in str(exc) and "QueueNameExists" not in str(exc):
            raise
        log.warning("SQS queue %s exists with other attributes; using it as it is", name)
        return await _existing(broker, client, name)


async def _existing(broker: BrokerLink, client: SQSClient, name: str) -> str:
    broker.api_calls["admin"] += 1
    try:
        with map_errors("admin"):
            return (await client.get_queue_url(QueueName=name))["QueueUrl"]
    except BrokerError as exc:
        if is_missing_queue(exc):
            raise ConfigError(f"SQS queue {name!r} does not exist (create=0)") from exc
        raise
