"""Sending an exactly-once transaction's outputs: one record batch per output partition.

``AIOKafkaProducer.send`` costs a coroutine, a partitioner call (murmur2 in pure Python) and a
future per record. A transaction's outputs are all known when it commits, so they are appended
straight into one ``BatchBuilder`` per output partition and handed over with ``send_batch``:
the same records in the same partitions (aiokafka's ``DefaultPartitioner``, its murmur2 hash
memoised per key), in the same order within each partition, for less CPU. ``send_batch``
joins the batch to the open transaction like ``send`` does.

aiokafka's ``commit_transaction`` waits for every batch but not for its outcome: a batch the
broker refuses for good (a record over the topic's ``max.message.bytes``, a partition without
a leader for ``request_timeout_ms``) is dropped and the transaction still commits, the input
offset with it. So the caller awaits what ``send_burst`` returns (``delivered``) before it
commits: a refused batch fails the transaction instead. Each batch comes back with where it
went, and an output sent alone (a suspect's, see ``_kafka_refused``) with its input offset, so
a refusal can be traced to the record whose output it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiokafka import __version__ as aiokafka_version
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from oncely.brokers._kafka_options import header_list
from oncely.brokers._kafka_size import MAX_REQUEST
from oncely.errors import BrokerError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Container, Iterable

    from aiokafka import AIOKafkaProducer

    from oncely.brokers._kafka_delivery import Outputs

__all__ = ["KeyHashes", "Sent", "delivered", "send_burst"]

Sent = tuple["asyncio.Future[Any]", str, int, int, int]
"""A handed-over batch: its outcome, topic, partition, and for a lone output its input offset
and its size in the batch (else -1 and 0)."""


class KeyHashes:
    """murmur2 of record keys (masked positive, as ``DefaultPartitioner`` uses it), memoised:
    keys repeat, and the pure-Python hash is the largest part of choosing a partition."""

    __slots__ = ("_limit", "known")

    def __init__(self, limit: int = 65_536) -> None:
        self.known: dict[bytes, int] = {}
        """The memo, read directly on the hot path (``of`` adds to it)."""
        self._limit = limit

    def of(self, key: bytes) -> int:
        known = self.known
        value = known.get(key)
        if value is None:
            if len(known) >= self._limit:
                known.clear()  # bounded: a stream of ever new keys starts the memo over
            value = known[key] = murmur2(key) & 0x7FFFFFFF
        return value


async def send_burst(
    producer: AIOKafkaProducer,
    pending: Iterable[tuple[int, Outputs]],
    hashes: KeyHashes,
    alone: Container[int] = (),
) -> list[Sent]:
    """Queue the outputs of ``pending`` (input offset, its outputs; in order) in ``producer``'s
    open transaction, a batch per output partition; a batch that fills is handed over and the
    next one started. The outputs of an offset in ``alone`` each go in a batch of their own
    (after what the partition's open batch holds), so a refusal names them. Returns each
    batch, for ``delivered``.

    Raises:
        MessageSizeTooLargeError: a record over ``MAX_REQUEST`` (nothing is committed: the
            caller's transaction fails, as with ``send``).
    """
    batches: dict[tuple[str, int], _Open] = {}
    sent: list[Sent] = []
    layouts: dict[str, tuple[list[int], list[int]]] = {}
    memo = hashes.known
    listed: list[Any]  # (name, value) pairs; the inlined ones typed as the flat tuple's items
    for offset, outputs in pending:
        lone = bool(alone) and offset in alone
        for topic, value, key, headers in outputs:
            # header_list() inlined for the common length: this runs for every output.
            if len(headers) == 6:
                listed = [
                    (headers[0], headers[1]),
                    (headers[2], headers[3]),
                    (headers[4], headers[5]),
                ]
            else:
                listed = header_list(headers)  # aiokafka's builder takes a list of pairs only
            layout = layouts.get(topic)
            if layout is None:
                layout = layouts[topic] = await _layout(producer, topic)
            every = layout[0]
            if key is None:
                partition = DefaultPartitioner()(None, every, layout[1])  # random, like send
            else:
                code = memo.get(key)  # hashes.of() inlined while the key is known
                partition = every[(hashes.of(key) if code is None else code) % len(every)]
            open_ = batches.get((topic, partition))
            if lone:
                if open_ is not None:  # what came before it goes first
                    del batches[(topic, partition)]
                    sent.append(await _hand_over(producer, open_, topic, partition))
                open_ = _Open(producer.create_batch())
                open_.append(key, value, listed)
                _check(open_, topic)
                sent.append(
                    await _hand_over(producer, open_, topic, partition, offset, open_.size())
                )
                continue
            if open_ is not None:
                # _Open.append inlined: this runs for every output.
                if open_.builder.append(open_.count, None, key, value, listed) is not None:
                    open_.count += 1
                    continue
                sent.append(await _hand_over(producer, open_, topic, partition))  # full
            open_ = batches[(topic, partition)] = _Open(producer.create_batch())
            # The first record of a batch always goes in, whatever its size.
            open_.append(key, value, listed)
            _check(open_, topic)
    for (topic, partition), open_ in batches.items():
        sent.append(await _hand_over(producer, open_, topic, partition))
    return sent


class _Open:
    """A ``BatchBuilder`` being filled, its records appended straight to the record batch
    builder inside it. ``BatchBuilder.append`` is a Python layer over that (keyword
    arguments, a serializer call that oncely's producers do not have, a count), a fifth of
    the CPU of an output in ``send_burst``. The count is the batch's ``_relative_offset``:
    each record's offset delta, and what the producer adds to the partition's idempotent
    sequence number when the batch goes out, so ``close`` writes it back before the batch
    is handed over. (aiokafka 0.14, pinned: these are its private fields.)"""

    __slots__ = ("batch", "builder", "count")

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.builder = batch._builder
        self.count = 0

    def append(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
        if self.builder.append(self.count, None, key, value, headers) is None:
            return False
        self.count += 1
        return True

    def size(self) -> int:
        return int(self.builder.size())

    def close(self) -> Any:
        batch = self.batch
        batch._relative_offset = self.count
        if batch.record_count() != self.count:
            # Another aiokafka than the ``kafka`` extra pins (``pip install oncely aiokafka``
            # takes the newest): read as 0, the count made aiokafka complete the batch unsent,
            # and the transaction committed its input without these outputs.
            raise BrokerError(
                f"aiokafka {aiokafka_version} does not read a batch's record count where "
                "0.14 does; exactly-once needs aiokafka>=0.14,<0.15 (pip install 'oncely[kafka]')"
            )
        # Closed, the batch is ready at once: nothing else may join it, so no linger helps.
        batch.close()
        return batch


def _check(batch: _Open, topic: str) -> None:
    if batch.size() > MAX_REQUEST:
        raise MessageSizeTooLargeError(
            f"a record for {topic} is {batch.size()} bytes when serialized, over the "
            f"producer's max_request_size ({MAX_REQUEST})"
        )


async def delivered(sent: list[Sent]) -> None:
    """Wait until every batch of ``sent`` is written; raise the first one's error if any was
    refused. Costs the commit no time: ``commit_transaction`` waits for them first anyway."""
    for batch in sent:
        await batch[0]


async def _layout(producer: AIOKafkaProducer, topic: str) -> tuple[list[int], list[int]]:
    """All partitions of ``topic`` (listed as ``send`` lists them) and the available ones."""
    every = list(await producer.partitions_for(topic))
    available = list(producer.client.cluster.available_partitions_for_topic(topic) or ())
    return every, available


async def _hand_over(
    producer: AIOKafkaProducer,
    batch: _Open,
    topic: str,
    partition: int,
    offset: int = -1,
    size: int = 0,
) -> Sent:
    future: asyncio.Future[Any]
    future = await producer.send_batch(batch.close(), topic, partition=partition)
    # ``delivered`` stops at the first failure (and a cancelled commit awaits none): retrieve
    # every outcome so a failure is not also logged as "exception was never retrieved".
    future.add_done_callback(_retrieve)
    return future, topic, partition, offset, size


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
