"""Owning exactly-once input partitions, each with its transactional producer.

aiokafka commits offsets in a transaction with the pre-KIP-447 protocol, which has no
consumer-generation fencing. The pattern that stays correct without it, and the one Kafka's
own transactional copier test uses, is a producer per input partition whose
``transactional_id`` is derived from the group, topic and partition. Whoever owns the
partition owns that id: a new owner's ``InitProducerId`` fences the previous producer and
completes or aborts its open transaction, and only *then* does the new owner read the
committed offset, so it starts exactly where the last committed transaction ended.

A retry topic's partition is usually empty, so it stays dormant (no producer, no offset read)
until the fetcher returns a record of it: then it is paused, taken as above (fence, then read
the committed offset) and resumed from there, the fetched records read again. Anything a
previous owner's open transaction on it holds is above its committed offset, so that
transaction is always resolved before a record of the partition runs here.

The transactions themselves are ``_kafka_eos``'s (``ExactlyOnce`` extends ``PartitionOwner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from oncely.brokers._kafka_options import map_errors
from oncely.brokers._kafka_txn import Txn, stop_producer
from oncely.errors import BrokerError, DeliveryExpired

if TYPE_CHECKING:
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_link import BrokerLink, SubscriptionLink
    from oncely.brokers._kafka_track import PartitionTrack

__all__ = ["PartitionOwner"]

log = logging.getLogger("oncely.brokers.kafka")


class PartitionOwner:
    """The input partitions one exactly-once subscription owns: taking them (fence, then read
    the committed offset), waking dormant retry-topic ones, releasing them."""

    def __init__(self, sub: SubscriptionLink, broker: BrokerLink) -> None:
        self._sub = sub
        self._broker = broker
        self._opts = broker.options
        self._txns: dict[TopicPartition, Txn] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._dormant: set[TopicPartition] = set()
        """Retry-topic partitions owned but not taken: no record of theirs was fetched yet."""
        self._waking: dict[TopicPartition, asyncio.Task[None]] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"oncely-{self._opts.group}-{tp.topic}-{tp.partition}"

    # -- ownership -----------------------------------------------------------------------------

    async def acquire(self, tps: list[TopicPartition]) -> None:
        """Take newly assigned partitions: init each producer, then read the committed offset.
        Retry-topic partitions stay dormant until ``wake``."""
        now = [tp for tp in tps if tp.topic == self._sub.topic]
        self._dormant.update(tp for tp in tps if tp.topic != self._sub.topic)
        results = await asyncio.gather(*(self._acquire(tp) for tp in now), return_exceptions=True)
        for tp, result in zip(now, results, strict=True):
            if isinstance(result, BaseException):
                # Without its producer the partition cannot run: fail the subscription so
                # the worker resubscribes (and the group reassigns it).
                log.error("kafka: could not take %s exactly-once: %r", tp, result)
                self._sub.fail(result)

    def wake(self, tp: TopicPartition, fetched: int) -> None:
        """A record of ``tp`` was fetched (the first at offset ``fetched``): if it is dormant,
        pause it (what was fetched is read again) and take it in the background; taking it
        resumes it."""
        if tp not in self._dormant:
            return
        self._dormant.discard(tp)
        if self._sub.consumer is not None:
            with contextlib.suppress(Exception):  # not assigned any more: the revoke forgets it
                self._sub.consumer.pause(tp)
        loop = asyncio.get_running_loop()
        self._waking[tp] = loop.create_task(self._wake(tp, fetched), name=f"oncely-kafka-take-{tp}")

    async def _wake(self, tp: TopicPartition, fetched: int) -> None:
        try:
            # Without a committed offset it starts where the consumer's own reset put it,
            # as it would have at the assignment: "latest" now is past the fetched record.
            await self._acquire(tp, origin=fetched)
        except Exception as exc:
            log.error("kafka: could not take %s exactly-once: %r", tp, exc)
            self._sub.fail(exc)  # as in acquire: the worker resubscribes
        finally:
            self._waking.pop(tp, None)

    async def forget(self, tps: set[TopicPartition] | None = None) -> None:
        """Drop dormant partitions among ``tps`` (all if ``None``) and stop taking those being
        woken: nothing of theirs ran yet, and a half-taken one's producer is stopped."""
        if tps is None:
            tps = self._dormant | set(self._waking)
        self._dormant.difference_update(tps)
        waking = {tp: task for tp in tps if (task := self._waking.get(tp)) is not None}
        for task in waking.values():
            task.cancel()
        await asyncio.gather(*waking.values(), return_exceptions=True)
        for tp in waking:
            txn = self._txns.get(tp)
            if txn is not None and txn.track is None:  # cancelled before it got its track
                del self._txns[tp]
                await self._stop(txn)

    async def _acquire(self, tp: TopicPartition, *, origin: int | None = None) -> None:
        producer = self._broker.transactional_producer(self.transactional_id(tp))
        try:
            with map_errors(f"initialising the transactional producer of {tp}"):
                # InitProducerId: fences the previous owner and resolves its open transaction.
                await producer.start()
        except BaseException:
            await stop_producer(producer)
            raise
        old = self._txns.pop(tp, None)
        txn = Txn(tp, producer)
        txn.origin = origin
        # Registered before anything else can be awaited: cancelled from here on (a revoke or
        # close stopping the take), ``forget`` finds it without a track and stops its producer.
        self._txns[tp] = txn
        if old is not None:
            await self._stop(old)  # a producer of an earlier ownership nobody released
        await self._rewind_to_committed(txn)

    async def _rewind_to_committed(self, txn: Txn) -> None:
        consumer = self._sub.consumer
        assert consumer is not None
        with map_errors(f"reading the committed offset of {txn.tp}"):
            committed = await consumer.committed(txn.tp)
            if committed is None:
                committed = txn.origin
            if committed is None:
                ends = await (
                    consumer.beginning_offsets([txn.tp])
                    if self._opts.auto_offset_reset == "earliest"
                    else consumer.end_offsets([txn.tp])
                )
                committed = ends[txn.tp]
                # A rewind before the first commit starts here again, not at a later end.
                txn.origin = committed
        self._sub.new_track(txn.tp, int(committed), txn)
        txn.track = self._sub.tracks[txn.tp]
        txn.finished.clear()
        txn.pending.clear()
        txn.count = 0

    async def release(self, tracks: list[PartitionTrack]) -> None:
        """Revoke or close: send and commit what is contiguous and settled (records still
        running are left to the next owner), then stop the producers. The partitions are
        released together (each has its own producer and lock): a close or a rebalance
        waits for one commit's round trips, not one per partition in turn."""
        results = await asyncio.gather(
            *(self._release(track) for track in tracks), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _release(self, track: PartitionTrack) -> None:
        txn = self._txns.pop(track.tp, None)
        if txn is None:
            return
        try:
            async with txn.lock:
                try:
                    if not (track.live and txn.track is track):
                        raise DeliveryExpired(f"{track.tp} was already given up")
                    await self._flush(txn, force=True, recover=False)
                except BrokerError as exc:
                    log.info("kafka: releasing %s without a final commit: %s", track.tp, exc)
                # Also without an error here: a commit that failed just before (given up,
                # not started over, as the partition was being released) left its
                # transaction open, and nobody may take the partition to resolve it.
                if txn.open:
                    with contextlib.suppress(Exception):
                        await txn.producer.abort_transaction()
                await self._stop(txn)
                txn.track = None  # its deliveries' acks must not reach the stopped producer
        except asyncio.CancelledError:
            # Cut short (waiting for the lock, committing, aborting): the producer is out of
            # ``_txns``, so nothing else would ever stop it. An open transaction is left to
            # the next owner's InitProducerId, which aborts it.
            txn.track = None
            await self._stop(txn)  # idempotent; finishes a stop under way
            raise

    async def close(self) -> None:
        """The subscription's consumer has stopped, so no rebalance callback runs any more:
        stop every producer still held. ``release`` only saw the partitions live when the
        close began; this also covers ones given up earlier and ones a rebalance under way
        took during the close (left running, they would leak with their connections)."""
        await self.forget()
        txns, self._txns = list(self._txns.values()), {}
        for n, txn in enumerate(txns):
            try:
                async with txn.lock:
                    if txn.open:  # nothing in it may commit: its partition is not ours now
                        with contextlib.suppress(Exception):
                            await txn.producer.abort_transaction()
                    await self._stop(txn)
            except asyncio.CancelledError:
                # As in ``_release``: the rest are out of ``_txns``; stop them all first.
                await asyncio.gather(*(self._stop(t) for t in txns[n:]), return_exceptions=True)
                raise
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    async def _stop(self, txn: Txn) -> None:
        await stop_producer(txn.producer)

    async def _flush(self, txn: Txn, *, force: bool = False, recover: bool = True) -> None:
        """Commit what the partition passed (``ExactlyOnce``); ``release`` ends with it."""
        raise NotImplementedError
