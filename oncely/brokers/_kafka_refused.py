"""Outputs the broker refuses for good in an exactly-once transaction, traced back to the input
records they came from.

A transaction's outputs are sent when it commits, after their handlers returned, so a
record-level refusal cannot fail the handler: it fails the transaction, the partition rewinds,
the same records produce the same outputs, and the transaction would fail again for ever. The
refusals that say a record (or a batch of them) can never be written are ``REFUSED``: over the
topic's ``max.message.bytes`` (errno 10), a batch over the broker's limit (18), and an invalid
record (87, INVALID_RECORD, e.g. no key on a compacted topic; aiokafka does not know that code
and raises ``UnknownError``). After such a failure every batch's outcome is read:

* a refused batch holding one output names its input record: that offset becomes *poison*,
  with the reason. When it is acked again, an output of it to the refused topic makes its
  outputs be replaced by its dead-letter record (the one ``reject`` writes), which commits with
  the offset like any output;
* a refused batch of several outputs only says that one of them is bad: the records with an
  output that may be in it (same topic, same partition or no key) become *suspects*, and the
  transactions that follow send a suspect's outputs one per batch, so the next refusal names
  the culprit. An innocent record is never dead-lettered; it only runs once more.

Both live on the partition's ``Txn`` (they survive the rewind, since the same offsets run
again) and are dropped once the offset they name is committed. If the dead-letter record is
refused too, nothing is left to commit in the record's place: the partition stays at that
offset, logging an ERROR on every attempt, rather than commit past a record that went nowhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, UnknownError

from oncely.brokers._kafka_options import encode_headers
from oncely.brokers._kafka_retry import dead_letter_copy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiokafka import AIOKafkaProducer

    from oncely.brokers._kafka_burst import KeyHashes, Sent
    from oncely.brokers._kafka_delivery import KafkaDelivery, Output
    from oncely.brokers._kafka_txn import Txn

__all__ = ["REFUSED", "blame", "prune", "unless_poison"]

log = logging.getLogger("oncely.brokers.kafka")

REFUSED: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnknownError,
)
"""Batch outcomes that mean the broker will never write those records, however often sent."""

SETTLE = 10.0
"""Seconds to wait for the other batches' outcomes once one was refused. Each ends on its own
(a response, or aiokafka's request timeout); one still open only stays unexamined."""


async def blame(
    txn: Txn,
    sent: Sequence[Sent],
    pending: Sequence[tuple[int, list[Output]]],
    producer: AIOKafkaProducer,
    hashes: KeyHashes,
) -> bool:
    """After a batch of ``sent`` (the outputs ``pending``) failed: record on ``txn`` the input
    offset of each refused lone output as poison, and those that may have had an output in a
    refused batch of several as suspects. Returns whether a new poison offset was found."""
    await asyncio.wait([s[0] for s in sent], timeout=SETTLE)
    found = False
    for future, topic, partition, offset, size in sent:
        if not future.done() or future.cancelled():
            continue
        exc = future.exception()
        if not isinstance(exc, REFUSED):
            continue
        error = _describe(exc)
        if offset >= 0:
            reason = (
                f"the broker refused its output to {topic}[{partition}] for good: {error}; "
                f"the output is {size} bytes in its record batch"
            )
            if offset in txn.poison:
                # Its dead-letter record was refused too: nothing is left to send instead, and
                # dropping it would lose the record. The partition stays stuck, loudly.
                log.error("kafka: %s offset %d: its dead-letter record: %s", txn.tp, offset, reason)
            else:
                found = True
                log.warning(
                    "kafka: %s offset %d: %s; its dead-letter record replaces its outputs",
                    txn.tp,
                    offset,
                    reason,
                )
                txn.poison[offset] = (topic, reason)
                txn.suspects.discard(offset)
            continue
        every = list(await producer.partitions_for(topic))
        suspects = [
            at
            for at, outputs in pending
            if any(
                out == topic and (key is None or every[hashes.of(key) % len(every)] == partition)
                for out, _, key, _ in outputs
            )
        ]
        txn.suspects.update(suspects)
        log.warning(
            "kafka: the broker refused a batch of outputs to %s[%d] for good (%s): the outputs "
            "of %d records of %s go one per batch until the one refused is found",
            topic,
            partition,
            error,
            len(suspects),
            txn.tp,
        )
    return found


def unless_poison(
    txn: Txn, topic: str, delivery: KafkaDelivery, outputs: list[Output]
) -> list[Output]:
    """``outputs`` of ``delivery`` (consumed for ``topic``'s subscription), or its dead-letter
    record if an output of its offset to the same topic was refused for good before (a replay
    that no longer produces one is copied as it is)."""
    refused = txn.poison.get(delivery.record.offset)
    if refused is None or all(output[0] != refused[0] for output in outputs):
        return outputs
    dlq, headers = dead_letter_copy(topic, delivery, refused[1])
    return [(dlq, delivery.body, delivery.record.key, encode_headers(headers))]


def prune(txn: Txn, committed: int) -> None:
    """Forget the poison and suspect offsets below ``committed``: they are done for good."""
    if txn.poison:
        for offset in [offset for offset in txn.poison if offset < committed]:
            del txn.poison[offset]
    if txn.suspects:
        txn.suspects = {offset for offset in txn.suspects if offset >= committed}


def _describe(exc: Any) -> str:
    if isinstance(exc, UnknownError):
        # aiokafka raises it for every error code it does not know, INVALID_RECORD (87) one.
        return "UnknownError (an error code aiokafka does not know, such as INVALID_RECORD)"
    return f"{type(exc).__name__} (errno {exc.errno})"
