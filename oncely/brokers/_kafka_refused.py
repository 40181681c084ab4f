"""Outputs the broker refuses for good in an exactly-once transaction, traced back to the input
records they came from.

A transaction's outputs are sent when it commits, after their handlers returned, so a
record-level refusal cannot fail the handler: it fails the transaction, the partition rewinds,
the same records produce the same outputs, and the transaction would fail again for ever. The
refusals that say a record (or a batch of them) can never be written are ``REFUSED``: over the
topic's ``max.message.bytes`` (errno 10), a batch over the broker's limit (18), and an invalid
record (87, INVALID_RECORD, e.g. no key on a compacted topic). aiokafka 0.14 does not know code
87 and would raise ``UnknownError``, as it does for the broker's generic UNKNOWN_SERVER_ERROR
(-1) and every other code it lacks, the real code lost: that is no evidence of a bad record, so
87 is registered here (``InvalidRecordError``) and ``UnknownError`` is not a refusal (its
transaction starts over, as for any other failure). After a refusal every batch's outcome is
read:

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
refused too (or any dead letter, a handler's own reject included), nothing is left to commit
in the record's place: the partition stays at that offset, logging an ERROR on every attempt,
rather than commit past a record that went nowhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiokafka import errors as kafka_errors
from aiokafka.errors import BrokerResponseError, MessageSizeTooLargeError, RecordListTooLargeError

from oncely.brokers._kafka_options import flat_headers
from oncely.brokers._kafka_retry import dead_letter_copy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiokafka import AIOKafkaProducer

    from oncely.brokers._kafka_burst import KeyHashes, Sent
    from oncely.brokers._kafka_delivery import KafkaDelivery, Outputs
    from oncely.brokers._kafka_txn import Txn

__all__ = ["REFUSED", "blame", "prune", "unless_poison"]

log = logging.getLogger("oncely.brokers.kafka")


class InvalidRecordError(BrokerResponseError):
    """INVALID_RECORD (errno 87): the broker refused a record that breaks the topic's rules,
    such as one without a key on a compacted topic. Never retried."""

    errno = 87
    message = "INVALID_RECORD"
    description = "This record has failed the validation on broker and hence will be rejected."
    retriable = False


# ``for_code`` reads this mapping on every response; a release of aiokafka that knows the code
# keeps its own class.
kafka_errors.kafka_errors.setdefault(InvalidRecordError.errno, InvalidRecordError)
KNOWN_INVALID_RECORD = kafka_errors.for_code(87)

REFUSED: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    KNOWN_INVALID_RECORD,
)
"""Batch outcomes that mean the broker will never write those records, however often sent."""

SETTLE = 10.0
"""Seconds to wait for the other batches' outcomes once one was refused. Each ends on its own
(a response, or aiokafka's request timeout); one still open only stays unexamined."""


async def blame(
    txn: Txn,
    sent: Sequence[Sent],
    pending: Sequence[tuple[int, Outputs]],
    producer: AIOKafkaProducer,
    hashes: KeyHashes,
    dlq: str,
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
            found |= _name(txn, offset, topic, partition, error, f"{size} bytes in its batch", dlq)
            continue
        every = list(await producer.partitions_for(topic))
        # Outputs that may have been in the batch: to its topic, and to its partition or to
        # any (no key: the partitioner chose at random).
        candidates = [
            (at, value)
            for at, outputs in pending
            for out, value, key, _ in outputs
            if out == topic and (key is None or every[hashes.of(key) % len(every)] == partition)
        ]
        if len(candidates) == 1:  # the batch held that output alone
            at, value = candidates[0]
            alone = f"{len(value or b'')} bytes (its value)"
            found |= _name(txn, at, topic, partition, error, alone, dlq)
            continue
        suspects = sorted({at for at, _ in candidates})
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


def _name(
    txn: Txn, offset: int, topic: str, partition: int, error: str, size: str, dlq: str
) -> bool:
    """Record ``offset`` as poison (its output to ``topic`` refused); whether it is new."""
    reason = (
        f"the broker refused its output to {topic}[{partition}] for good: {error}; "
        f"the output is {size}"
    )
    if topic == dlq:
        # A dead-letter record was refused (a poison record's copy, or the handler's own
        # reject): nothing is left to send instead, and dropping it would lose the record.
        # The partition stays stuck, loudly; not a new poison record, whose dead letter
        # this already is.
        log.error("kafka: %s offset %d: its dead-letter record: %s", txn.tp, offset, reason)
        return False
    log.warning(
        "kafka: %s offset %d: %s; its dead-letter record replaces its outputs",
        txn.tp,
        offset,
        reason,
    )
    txn.poison[offset] = (topic, reason)
    txn.suspects.discard(offset)
    return True


def unless_poison(txn: Txn, topic: str, delivery: KafkaDelivery, outputs: Outputs) -> Outputs:
    """``outputs`` of ``delivery`` (consumed for ``topic``'s subscription), or its dead-letter
    record if an output of its offset to the same topic was refused for good before (a replay
    that no longer produces one is copied as it is)."""
    refused = txn.poison.get(delivery.record.offset)
    if refused is None or all(output[0] != refused[0] for output in outputs):
        return outputs
    dlq, headers = dead_letter_copy(topic, delivery, refused[1])
    return ((dlq, delivery.body, delivery.record.key, flat_headers(headers)),)


def prune(txn: Txn, committed: int) -> None:
    """Forget the poison and suspect offsets below ``committed``: they are done for good."""
    if txn.poison:
        for offset in [offset for offset in txn.poison if offset < committed]:
            del txn.poison[offset]
    if txn.suspects:
        txn.suspects = {offset for offset in txn.suspects if offset >= committed}


def _describe(exc: Any) -> str:
    return f"{type(exc).__name__} ({exc.message}, errno {exc.errno})"
