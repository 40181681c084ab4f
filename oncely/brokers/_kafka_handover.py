"""How a ``KafkaSubscription`` gives partitions up and takes them: the offset commits (also
on revoke and close), rebalances (revoke after a grace, assign keeping the tracks of a
contiguous generation), exactly-once rewinds (``new_track``) and closing.

The subscription's own module keeps what every record goes through (poll, admit, pause, take,
settle). ``Handover`` is a base class of ``KafkaSubscription``, not an object it calls: the
methods are found on the subscription's type as before, so no call layer or attribute read is
added anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from oncely.brokers._kafka_options import map_errors
from oncely.brokers._kafka_track import PartitionTrack
from oncely.errors import BrokerError, ConnectionLost, OncelyError

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

    from aiokafka import AIOKafkaConsumer
    from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_eos import ExactlyOnce
    from oncely.brokers._kafka_options import KafkaOptions

__all__ = ["Handover"]

log = logging.getLogger("oncely.brokers.kafka")

_POLLER_EXIT = 5.0
"""Seconds a close waits for the poll loop to finish its poll and any commit under way."""


class Handover:
    """Commits, rebalances and closing of a ``KafkaSubscription``; it sets these attributes."""

    topic: str
    consumer: AIOKafkaConsumer | None
    tracks: dict[TopicPartition, PartitionTrack]
    refill: Callable[[PartitionTrack], None]
    _opts: KafkaOptions
    _visibility: float
    _eos: ExactlyOnce | None
    _ordering: str
    _assignor: type[StickyPartitionAssignor]
    _ready: deque[tuple[PartitionTrack, Any]]
    _yielded: int
    _changed: asyncio.Event
    _settle_event: asyncio.Event
    _settle_waiters: int
    _starting: asyncio.Task[None] | None
    _poller: asyncio.Task[None] | None
    _fetching: bool
    _error: OncelyError | None
    _closed: bool
    _generation: int
    _last_commit: float

    # -- commits and rebalances --------------------------------------------------------------------

    async def commit(self, tracks: list[PartitionTrack] | None = None) -> None:
        """Commit the lowest contiguous done offset of each partition (at-least-once mode).
        A refused commit (a rebalance is under way) is logged: the revoke commits again."""
        self._last_commit = time.monotonic()
        if self.consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for track in tracks if tracks is not None else list(self.tracks.values()):
            if track.live and track.eos is None:
                point = track.commit_point()
                if point > track.committed:
                    offsets[track.tp] = point
        if not offsets:
            return
        try:
            with map_errors(f"committing offsets of {self.topic}"):
                await self.consumer.commit(offsets)
        except BrokerError as exc:
            log.warning("kafka: commit on %s failed (retried later): %s", self.topic, exc)
            return
        for tp, point in offsets.items():
            if (current := self.tracks.get(tp)) is not None:
                current.committed = max(current.committed, point)

    async def wait_settled(self, tracks: list[PartitionTrack], seconds: float) -> None:
        """Wait up to ``seconds`` until no delivery of ``tracks`` is in flight."""
        deadline = time.monotonic() + seconds
        while any(t.in_flight for t in tracks if t.live):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._settle_event.clear()
            self._settle_waiters += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settle_event.wait(), left)
            finally:
                self._settle_waiters -= 1

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._eos is not None:
            await self._eos.forget(revoked)
        tracks = [t for tp in revoked if (t := self.tracks.get(tp)) is not None and t.live]
        for track in tracks:
            track.suspended = True
            track.paused = False
        # A short grace lets nearly finished handlers land in this commit; the rest are
        # abandoned uncommitted (unless the next assignment gives the partition back).
        await self.wait_settled(tracks, self._opts.revoke_grace)
        if self._eos is not None:
            await self._eos.release(tracks)
            for track in tracks:
                self.kill(track)
        else:
            await self.commit(tracks)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.consumer is not None
        coordinator = getattr(self.consumer, "_coordinator", None)
        generation = int(getattr(coordinator, "generation", -1))
        # Kept across the rebalance only if this member was in every generation in between:
        # then nobody else can have owned the partition meanwhile.
        contiguous = generation == self._generation + 1
        self._generation = generation
        self._assignor.generation = generation
        for tp, track in list(self.tracks.items()):
            if tp not in assigned or not (contiguous and track.live and track.suspended):
                self.kill(track)
                del self.tracks[tp]
        fresh = [tp for tp in assigned if tp not in self.tracks]
        for tp in assigned:
            if (kept := self.tracks.get(tp)) is None:
                continue
            kept.suspended = False
            if kept.position is not None:
                self.consumer.seek(tp, kept.position)
            for record in kept.parked:
                self._ready.append((kept, record))
            kept.parked.clear()
            self.refill(kept)
        if self._eos is not None:
            await self._eos.acquire(fresh)
        else:
            for tp in fresh:
                self.tracks[tp] = PartitionTrack(tp, ordering=self._ordering)
        self._changed.set()

    def fail(self, exc: BaseException) -> None:
        """Stop the subscription with ``exc``: the iterating task gets it and resubscribes."""
        self._error = exc if isinstance(exc, OncelyError) else ConnectionLost(repr(exc))
        self._changed.set()

    def kill(self, track: PartitionTrack) -> None:
        """End this ownership: its deliveries raise ``DeliveryExpired`` from now on."""
        if track.live:
            track.live = False
            self._yielded -= track.in_flight
            track.in_flight = 0
            self._changed.set()
            self._settle_event.set()

    def new_track(self, tp: TopicPartition, start: int, eos: Any) -> None:
        """Install a track starting at ``start`` (exactly-once acquire and rewind)."""
        old = self.tracks.get(tp)
        if old is not None:
            self.kill(old)
        self.tracks[tp] = PartitionTrack(tp, ordering=self._ordering, start=start, eos=eos)
        assert self.consumer is not None
        self.consumer.seek(tp, start)
        # The new track starts unpaused. A rewind keeps the assignment, so a pause of the old
        # track (full window, held retry record) would stay, and nothing resumes it: the
        # partition would never be fetched again.
        with contextlib.suppress(Exception):  # not assigned any more: nothing to resume
            self.consumer.resume(tp)
        self._changed.set()

    # -- closing -----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._close(self._visibility)

    async def shutdown(self) -> None:
        """Close at once (the broker is closing): unsettled deliveries are abandoned."""
        await self._close(0.0)

    async def _close(self, wait: float) -> None:
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        if self._starting is None:
            return
        try:
            await self._starting
        except (Exception, asyncio.CancelledError):
            pass  # the failure was raised to the iterating task already
        live = [t for t in self.tracks.values() if t.live]
        # Yielded deliveries stay valid: a worker drains them after it stops fetching.
        await self.wait_settled(live, wait)
        if self._poller is not None:
            # It stops by itself after this poll now that _closed is set. Cancelled in the
            # middle of an exactly-once commit, it would leave that transaction unresolved,
            # and the release below could not commit the partition's last records. Waiting
            # for records it is stopped at once rather than after its poll (up to 100 ms
            # of every close): what it fetched is nobody's until committed, read again later.
            if self._fetching:
                self._poller.cancel()
            await asyncio.wait({self._poller}, timeout=_POLLER_EXIT)
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        if self._eos is not None:
            await self._eos.forget()  # the poll loop has stopped: nothing wakes any more
            await self._eos.release(live)
        else:
            await self.commit(live)
        for track in live:
            self.kill(track)
        try:
            if self.consumer is not None:
                try:
                    with map_errors(f"closing the consumer of {self.topic}"):
                        await self.consumer.stop()
                except BrokerError as exc:
                    log.warning("kafka: %s", exc)
        finally:
            if self._eos is not None:
                await self._eos.close()
