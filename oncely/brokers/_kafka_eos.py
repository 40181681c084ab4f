"""Exactly-once consume-transform-produce: one transactional producer per input partition.

aiokafka commits offsets in a transaction with the pre-KIP-447 protocol, which has no
consumer-generation fencing. The pattern that stays correct without it, and the one Kafka's
own transactional copier test uses, is a producer per input partition whose
``transactional_id`` is derived from the group, topic and partition. Whoever owns the
partition owns that id: a new owner's ``InitProducerId`` fences the previous producer and
completes or aborts its open transaction, and only *then* does the new owner read the
committed offset, so it starts exactly where the last committed transaction ended.

Per partition the records run strictly in offset order. A transaction holds the outputs
(``produce``) and the input offsets of several records, and commits when ``txn_messages``
records were settled or ``txn_interval`` passed, never while a record that produced is
unsettled. A handler that fails after producing aborts the transaction: its outputs and those of
the earlier records in it are discarded, the partition rewinds to the last commit, the earlier
records run again, and the failed one is settled as decided (retry topic or dead letter, inside
the next transaction) without running again. A failure before any output needs no abort:
the retry or dead-letter record joins the open transaction. A fenced producer means another
member owns the partition: this member drops it and its deliveries expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from oncely.brokers._kafka_delivery import dead_letter_headers, retry_headers
from oncely.brokers._kafka_options import (
    bucket_for,
    dlq_topic,
    encode_headers,
    map_errors,
    retry_topic,
)
from oncely.brokers._kafka_track import Settlement
from oncely.brokers.base import Headers
from oncely.errors import BrokerError, DeliveryExpired

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_consume import KafkaSubscription
    from oncely.brokers._kafka_delivery import KafkaDelivery
    from oncely.brokers._kafka_track import PartitionTrack
    from oncely.brokers.kafka import KafkaBroker

__all__ = ["ExactlyOnce"]

Pending = dict[int, Settlement]

log = logging.getLogger("oncely.brokers.kafka")


class _Txn:
    """The transactional producer of one input partition and its open transaction."""

    __slots__ = ("count", "lock", "open", "producer", "producing", "started", "tp", "track")

    def __init__(self, tp: TopicPartition, producer: AIOKafkaProducer) -> None:
        self.tp = tp
        self.producer = producer
        self.lock = asyncio.Lock()
        self.open = False
        self.count = 0
        self.started = 0.0
        self.producing: set[KafkaDelivery] = set()
        self.track: PartitionTrack | None = None


class ExactlyOnce:
    """The exactly-once side of one ``KafkaSubscription``."""

    def __init__(self, sub: KafkaSubscription, broker: KafkaBroker) -> None:
        self._sub = sub
        self._broker = broker
        self._opts = broker.options
        self._txns: dict[TopicPartition, _Txn] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"oncely-{self._opts.group}-{tp.topic}-{tp.partition}"

    # -- ownership ---------------------------------------------------------------------------------

    async def acquire(self, tps: list[TopicPartition]) -> None:
        """Take newly assigned partitions: init each producer, then read the committed offset."""
        results = await asyncio.gather(*(self._acquire(tp) for tp in tps), return_exceptions=True)
        for tp, result in zip(tps, results, strict=True):
            if isinstance(result, BaseException):
                # Without its producer the partition cannot run: fail the subscription so
                # the worker resubscribes (and the group reassigns it).
                log.error("kafka: could not take %s exactly-once: %r", tp, result)
                self._sub.fail(result)

    async def _acquire(self, tp: TopicPartition) -> None:
        producer = self._broker.transactional_producer(self.transactional_id(tp))
        with map_errors(f"initialising the transactional producer of {tp}"):
            # InitProducerId: fences the previous owner and resolves its open transaction.
            await producer.start()
        txn = _Txn(tp, producer)
        self._txns[tp] = txn
        await self._rewind_to_committed(txn, {})

    async def _rewind_to_committed(self, txn: _Txn, pending: Pending) -> None:
        consumer = self._sub.consumer
        assert consumer is not None
        with map_errors(f"reading the committed offset of {txn.tp}"):
            committed = await consumer.committed(txn.tp)
            if committed is None:
                ends = await (
                    consumer.beginning_offsets([txn.tp])
                    if self._opts.auto_offset_reset == "earliest"
                    else consumer.end_offsets([txn.tp])
                )
                committed = ends[txn.tp]
        self._install(txn, int(committed), pending)

    def _install(self, txn: _Txn, start: int, pending: Pending) -> None:
        self._sub.new_track(txn.tp, start, txn, pending)
        txn.track = self._sub.tracks[txn.tp]
        txn.producing.clear()

    async def release(self, tracks: list[PartitionTrack]) -> None:
        """Revoke or close: commit what is settled, abort if a record that produced is still
        running, and stop the producers."""
        for track in tracks:
            txn = self._txns.pop(track.tp, None)
            if txn is None:
                continue
            async with txn.lock:
                try:
                    if txn.open and track.live and txn.track is track and not txn.producing:
                        await self._commit(txn, track)
                    elif txn.open:
                        with map_errors(f"aborting the transaction of {track.tp}"):
                            await txn.producer.abort_transaction()
                except BrokerError as exc:
                    log.warning("kafka: releasing %s: %s", track.tp, exc)
                await self._stop(txn)

    async def _stop(self, txn: _Txn) -> None:
        with contextlib.suppress(Exception):
            await txn.producer.stop()

    # -- the Settler side --------------------------------------------------------------------------

    def _txn_of(self, delivery: KafkaDelivery) -> _Txn:
        txn = delivery.track.eos
        assert isinstance(txn, _Txn)
        return txn

    def _check(self, txn: _Txn, delivery: KafkaDelivery) -> None:
        if not delivery.track.live or txn.track is not delivery.track:
            raise DeliveryExpired(f"partition of {delivery.id} was revoked or rewound")

    async def _open(self, txn: _Txn) -> None:
        if not txn.open:
            with map_errors(f"beginning a transaction on {txn.tp}"):
                await txn.producer.begin_transaction()
            txn.open = True
            txn.started = time.monotonic()
            txn.count = 0

    async def produce(
        self, delivery: KafkaDelivery, topic: str, body: bytes, headers: dict[str, str]
    ) -> str:
        txn = self._txn_of(delivery)
        if topic not in self._broker.known_topics:
            await self._broker.ensure_topics([topic])
        mid = headers[Headers.MESSAGE_ID]
        key = headers.get(Headers.KEY)
        async with txn.lock:
            self._check(txn, delivery)
            await self._open(txn)
            txn.producing.add(delivery)
            with map_errors(f"producing to {topic} in a transaction", publishing=True):
                await txn.producer.send(
                    topic,
                    body,
                    key=key.encode() if key is not None else None,
                    headers=encode_headers(headers),
                )
        return mid

    async def ack(self, delivery: KafkaDelivery) -> None:
        """Called after the delivery's offset was marked done; commits when the budget is
        spent."""
        txn = self._txn_of(delivery)
        async with txn.lock:
            self._check(txn, delivery)
            txn.producing.discard(delivery)
            await self._open(txn)
            txn.count += 1
            await self._maybe_commit(txn)

    async def fail(
        self, delivery: KafkaDelivery, how: str, delay: float, reason: str, attempt: int
    ) -> None:
        txn = self._txn_of(delivery)
        async with txn.lock:
            self._check(txn, delivery)
            track = delivery.track
            if delivery in txn.producing:
                # Its outputs are in the open transaction: discard the whole transaction and
                # settle this record when the rewind brings it back.
                pending = dict(track.pending)
                pending[delivery.record.offset] = (how, delay, reason, attempt)
                await self._abort_and_rewind(txn, pending)
                return
            await self._send_failure(txn, delivery, how, delay, reason, attempt)

    async def apply_pending(self, delivery: KafkaDelivery) -> None:
        """Settle a record whose outcome was decided before a rewind, without running it."""
        txn = self._txn_of(delivery)
        how, delay, reason, attempt = delivery.track.pending.pop(delivery.record.offset)
        async with txn.lock:
            if not delivery.track.live:
                return
            await self._send_failure(txn, delivery, how, delay, reason, attempt)
            delivery.mark_settled()
            await self._maybe_commit(txn)

    async def _send_failure(
        self, txn: _Txn, delivery: KafkaDelivery, how: str, delay: float, reason: str, attempt: int
    ) -> None:
        if how == "reject":
            topic = dlq_topic(self._sub.topic)
            await self._broker.ensure_topics([topic], partitions=1)
            headers = dead_letter_headers(delivery, reason, time.time())
            headers[Headers.ATTEMPT] = str(attempt)
        elif delay > 0:
            bucket = bucket_for(delay, self._opts.buckets)
            assert bucket is not None
            topic = retry_topic(self._sub.topic, bucket)
            headers = retry_headers(delivery, attempt, time.time() + delay)
        else:
            topic, headers = self._sub.topic, retry_headers(delivery, attempt, None)
        await self._open(txn)
        with map_errors(f"producing to {topic} in a transaction", publishing=True):
            await txn.producer.send(
                topic, delivery.body, key=delivery.record.key, headers=encode_headers(headers)
            )
        txn.count += 1

    # -- commits -----------------------------------------------------------------------------------

    async def flush_due(self) -> None:
        """Commit open transactions whose time budget is spent (from the poll loop)."""
        now = time.monotonic()
        for txn in list(self._txns.values()):
            if (
                txn.open
                and not txn.producing
                and not txn.lock.locked()
                and now - txn.started >= self._opts.txn_interval
            ):
                async with txn.lock:
                    try:
                        await self._maybe_commit(txn)
                    except BrokerError as exc:
                        # Already handled (rewound or given up); the poll loop goes on.
                        log.warning("kafka: %s", exc)

    async def _maybe_commit(self, txn: _Txn) -> None:
        track = txn.track
        if not txn.open or txn.producing or track is None or not track.live:
            return
        if txn.count < self._opts.txn_messages and (
            time.monotonic() - txn.started < self._opts.txn_interval
        ):
            return
        try:
            await self._commit(txn, track)
        except DeliveryExpired:
            self._lose(txn)
            raise
        except BrokerError as exc:
            log.warning("kafka: transaction on %s failed, starting over: %s", txn.tp, exc)
            await self._reinit(txn)
            raise DeliveryExpired(f"the transaction on {txn.tp} failed: {exc}") from exc

    async def _reinit(self, txn: _Txn, pending: Pending | None = None) -> None:
        try:
            await self._restart(txn, pending)
        except BrokerError as exc:
            # Neither the old nor a new producer works: stop the subscription so the worker
            # resubscribes, and the group reassigns the partition.
            log.error("kafka: could not restart the producer of %s: %s", txn.tp, exc)
            if txn.track is not None:
                self._sub.kill(txn.track)
            self._sub.fail(exc)

    async def _commit(self, txn: _Txn, track: PartitionTrack) -> None:
        point = track.commit_point()
        with map_errors(f"committing the transaction on {txn.tp}"):
            if point > track.committed:
                await txn.producer.send_offsets_to_transaction({txn.tp: point}, self._opts.group)
            await txn.producer.commit_transaction()
        txn.open = False
        track.committed = max(track.committed, point)

    async def _abort_and_rewind(self, txn: _Txn, pending: Pending) -> None:
        track = txn.track
        assert track is not None
        try:
            with map_errors(f"aborting the transaction on {txn.tp}"):
                await txn.producer.abort_transaction()
        except DeliveryExpired:
            self._lose(txn)
            raise
        except BrokerError as exc:
            log.warning("kafka: abort on %s failed, starting over: %s", txn.tp, exc)
            await self._reinit(txn, pending)
            return
        txn.open = False
        self._install(txn, track.committed, pending)

    async def _restart(self, txn: _Txn, pending: Pending | None) -> None:
        """After an unclear transaction outcome: a new producer (same id) resolves it, and the
        committed offset read after that says where to start."""
        await self._stop(txn)
        txn.open = False
        txn.producer = self._broker.transactional_producer(self.transactional_id(txn.tp))
        with map_errors(f"initialising the transactional producer of {txn.tp}"):
            await txn.producer.start()
        await self._rewind_to_committed(txn, dict(pending or {}))

    def _lose(self, txn: _Txn) -> None:
        """Fenced: another member owns the partition now. Give it up until a rebalance."""
        log.warning("kafka: producer for %s was fenced; giving the partition up", txn.tp)
        if txn.track is not None:
            self._sub.kill(txn.track)
            if self._sub.consumer is not None:
                with contextlib.suppress(Exception):
                    self._sub.consumer.pause(txn.tp)
        self._txns.pop(txn.tp, None)
        txn.open = False
        asyncio.get_running_loop().create_task(self._stop(txn))
