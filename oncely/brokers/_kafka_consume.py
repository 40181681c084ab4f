"""The Kafka subscription: a group member that polls, orders, pauses and commits.

One ``AIOKafkaConsumer`` per subscription, subscribed to ``<topic>`` and its retry topics, in
the URL's consumer group. A background task calls ``getmany`` in a loop for as long as the
subscription is open, whatever the handlers do: pausing a partition (its in-flight window is
full, or the record at the head of a retry topic is not due yet) stops its fetches without
leaving the group, which is how Kafka keeps a slow message's partition owned. That is what
``extend`` means here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery, KafkaDelivery
from oncely.brokers._kafka_eos import ExactlyOnce
from oncely.brokers._kafka_fetch import fetch
from oncely.brokers._kafka_group import RebalanceListener, due_time, sticky_assignor
from oncely.brokers._kafka_handover import Handover
from oncely.brokers._kafka_options import map_errors, retry_topic
from oncely.brokers._kafka_retry import failure_copy
from oncely.brokers.base import Subscription
from oncely.errors import ConnectionLost, OncelyError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_delivery import Output
    from oncely.brokers._kafka_link import BrokerLink
    from oncely.brokers._kafka_track import PartitionTrack

__all__ = ["KafkaSubscription"]

log = logging.getLogger("oncely.brokers.kafka")

_RUN_AGAIN = 1.0
"""Seconds before a record whose nack or reject failed runs again."""


class KafkaSubscription(Handover, Subscription):
    """See the module docstring and ``oncely.brokers.kafka``; commits, rebalances and closing
    are in ``_kafka_handover``."""

    def __init__(self, broker: BrokerLink, topic: str, *, prefetch: int, visibility: float):
        self._broker = broker
        opts = self._opts = broker.options
        self.topic = topic
        self._prefetch = max(1, prefetch)
        self._visibility = visibility
        self.max_delay = opts.buckets[-1]
        self.known_topics = broker.known_topics  # the broker's set, updated in place
        self._retry_topics = {retry_topic(topic, b) for b in opts.buckets}
        self._eos = ExactlyOnce(self, broker) if opts.is_exactly_once(topic) else None
        self._ordering = opts.ordering
        self._refill_at = opts.window - max(1, opts.window // 4)
        self.consumer: AIOKafkaConsumer | None = None
        self.tracks: dict[TopicPartition, PartitionTrack] = {}
        self._ready: deque[tuple[PartitionTrack, Any]] = deque()
        self._yielded = 0
        self._changed = asyncio.Event()
        self._waiting = False
        """The iterating task waits on ``_changed``: only then does a settle set it."""
        self._settle_event = asyncio.Event()
        self._settle_waiters = 0
        """Tasks in ``wait_settled``: only then does a settle set ``_settle_event``."""
        self._starting: asyncio.Task[None] | None = None
        self._started = False
        self._poller: asyncio.Task[None] | None = None
        self._fetching = False
        """The poll loop waits in ``getmany``: a close may stop it there at once."""
        self._error: OncelyError | None = None
        self._closed = False
        self._generation = -10
        self._last_commit = 0.0
        self._assignor = sticky_assignor()

    # -- start and poll ----------------------------------------------------------------------------

    async def _start(self) -> None:
        opts = self._opts
        topics = [self.topic, *sorted(self._retry_topics)]
        await self._broker.ensure_topics(topics)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=opts.bootstrap,
            group_id=opts.group,
            client_id=opts.client_id,
            enable_auto_commit=False,
            auto_offset_reset=opts.auto_offset_reset,
            isolation_level=opts.isolation,
            partition_assignment_strategy=(self._assignor,),
            session_timeout_ms=opts.session_timeout_ms,
            heartbeat_interval_ms=opts.heartbeat_interval_ms,
            max_poll_interval_ms=opts.max_poll_interval_ms,
            fetch_max_wait_ms=200,
        )
        self.consumer.subscribe(topics=topics, listener=RebalanceListener(self))
        with map_errors(f"subscribing to {self.topic}"):
            await self.consumer.start()
        self._last_commit = time.monotonic()
        self._poller = asyncio.create_task(self._poll(), name=f"oncely-kafka-poll-{self.topic}")

    async def _poll(self) -> None:
        assert self.consumer is not None
        consumer, opts = self.consumer, self._opts
        try:
            while not self._closed:
                self._fetching = True
                try:
                    with map_errors(f"polling {self.topic}"):
                        batch = await fetch(consumer, 100)  # getmany(), see _kafka_fetch
                finally:
                    self._fetching = False
                if batch:
                    now = time.time()
                    for tp, records in batch.items():
                        self._ingest(tp, records, now)
                    self._changed.set()
                if self._eos is not None:
                    await self._eos.flush_due()
                elif time.monotonic() - self._last_commit >= opts.commit_interval:
                    await self.commit()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Supervised: the error reaches the iterating task, which resubscribes.
            log.error("kafka: polling %s failed", self.topic, exc_info=True)
            self._error = exc if isinstance(exc, OncelyError) else ConnectionLost(repr(exc))
            self._changed.set()

    def _ingest(self, tp: TopicPartition, records: list[Any], now: float) -> None:
        track = self.tracks.get(tp)
        if track is None or not track.live or track.suspended:
            if track is None and self._eos is not None:
                # A dormant retry partition has records: take it now.
                self._eos.wake(tp, records[0].offset)
            return  # not ours (yet): the owner reads it from the committed offset
        if tp.topic not in self._retry_topics:
            track.take_all(records)
        else:
            for record in records:
                due = due_time(record)
                if due > now:
                    # Not due: hold this partition (only this one) at the record.
                    assert self.consumer is not None
                    self.consumer.seek(tp, record.offset)
                    track.position = record.offset
                    track.hold_until = due
                    asyncio.get_running_loop().call_later(due - now, self._unhold, track)
                    break
                track.take(record)
        self._ready.extend([(track, ready) for ready in track.admit(self._opts.window)])
        self.update_pause(track)

    def shrank(self, track: PartitionTrack) -> None:
        """``track``'s window shrank: once it is down to ``_refill_at``, admit the backlog
        and resume the partition. Refilling in chunks rather than a record per settle
        halves the per-record bookkeeping of a busy partition (whose window stays full)."""
        if track.hold_until or (
            (track.backlog or track.paused) and track.window <= self._refill_at
        ):
            self.refill(track)

    def refill(self, track: PartitionTrack) -> None:
        """``track``'s window has room again: admit its backlog, resume it if it may."""
        if track.backlog:
            self._ready.extend([(track, ready) for ready in track.admit(self._opts.window)])
            self._changed.set()
        self.update_pause(track)

    def _unhold(self, track: PartitionTrack) -> None:
        track.hold_until = 0.0
        self.update_pause(track)

    def update_pause(self, track: PartitionTrack) -> None:
        """Pause a partition whose window is full or whose head is not due; resume it when
        neither holds. Polling goes on either way, so the member stays in the group."""
        if not track.live or track.suspended or self.consumer is None:
            return
        if track.backlog or track.window >= self._opts.window:
            want = True
        else:  # the clock only for a held retry partition: this runs once per record
            want = bool(track.hold_until) and track.hold_until > time.time()
        if want == track.paused:
            return
        with contextlib.suppress(Exception):  # not assigned any more: nothing to pause
            if want:
                self.consumer.pause(track.tp)
            else:
                self.consumer.resume(track.tp)
        track.paused = want

    # -- iteration ---------------------------------------------------------------------------------

    async def __anext__(self) -> KafkaDelivery:
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            await self._await_start()
        while True:
            self._changed.clear()
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            if (delivery := self._take()) is not None:
                return delivery
            self._waiting = True
            try:
                await self._changed.wait()
            finally:
                self._waiting = False

    @property
    def next_ready(self) -> Callable[[], KafkaDelivery | None]:
        """What the worker's tasks take ready deliveries from themselves: ``take_ready``, or
        in exactly-once mode ``ExactlyOnce.take_ready``, which bounds how many they take in
        one pass of the event loop (its commits' round trips wait for the pass)."""
        return self.take_ready if self._eos is None else self._eos.take_ready

    def take_ready(self) -> KafkaDelivery | None:
        """The next delivery if one may be yielded now, else ``None``; never waits, so the
        worker's task that settled a delivery takes the next itself."""
        if self._closed or self._error is not None or not self._started:
            return None
        return self._take()

    def _take(self) -> KafkaDelivery | None:
        while self._yielded < self._prefetch and self._ready:
            track, record = self._ready.popleft()
            if not track.live:
                continue
            if track.suspended:
                track.parked.append(record)
                continue
            cls = KafkaDelivery if track.eos is None else ExactlyOnceDelivery
            # ``topic`` by position: a keyword argument to a class costs a dict per call.
            delivery = cls(self, track, record, self.topic)
            track.in_flight += 1
            self._yielded += 1
            return delivery
        return None

    async def _await_start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        if not self._starting.done():
            await asyncio.shield(self._starting)  # a cancelled __anext__ must not cancel it
        self._starting.result()
        self._started = True

    # -- settling (the Settler protocol of KafkaDelivery) ------------------------------------------

    def settled(self, delivery: KafkaDelivery) -> Awaitable[None] | None:
        track = delivery.track
        self._yielded -= 1
        track.in_flight -= 1
        following = track.complete(delivery.record)
        if following is not None:
            self._ready.append((track, following))
        if track.eos is None or track.hold_until:
            # Exactly-once, the window only shrinks as records are passed (``_pass`` calls
            # this then): one call less per record.
            self.shrank(track)
        if self._waiting:  # else it looks at the ready deliveries before it waits again
            self._changed.set()
        if self._settle_waiters:
            self._settle_event.set()
        if track.eos is None:
            return None
        assert self._eos is not None
        # Not a coroutine: ``ack`` hands back one only where there is I/O to await.
        return self._eos.ack(delivery)

    def run_again(self, delivery: KafkaDelivery) -> None:
        """A nack or reject could not store its copy: the record runs again after a pause,
        keeping its key's turn and holding the commit meanwhile."""
        track = delivery.track
        self._yielded -= 1
        track.in_flight -= 1
        self._settle_event.set()
        asyncio.get_running_loop().call_later(_RUN_AGAIN, self._requeue, track, delivery.record)

    def _requeue(self, track: PartitionTrack, record: Any) -> None:
        if track.live:
            self._ready.append((track, record))
            self._changed.set()

    async def resend(self, delivery: KafkaDelivery, delay: float, attempt: int) -> None:
        await self._send_copy(delivery, "nack", delay, "", attempt)

    async def dead_letter(self, delivery: KafkaDelivery, reason: str) -> None:
        await self._send_copy(delivery, "reject", 0.0, reason, delivery.attempt)

    async def _send_copy(
        self, delivery: KafkaDelivery, how: str, delay: float, reason: str, attempt: int
    ) -> None:
        topic, headers = await failure_copy(
            self._broker, self.topic, delivery, how, delay, reason, attempt
        )
        await self._broker.send(topic, delivery.body, key=delivery.record.key, headers=headers)

    async def eos_fail(
        self, delivery: KafkaDelivery, how: str, delay: float, reason: str, attempt: int
    ) -> bool:
        assert self._eos is not None
        return await self._eos.fail(delivery, how, delay, reason, attempt)

    def eos_produce(self, delivery: KafkaDelivery, output: Output) -> Awaitable[None]:
        assert self._eos is not None
        return self._eos.produce(delivery, output)
