"""The in-process message store behind ``memory://`` (``oncely.brokers.memory``): a hub of
topics, each a heap of its messages ordered by ``visible_at``, with lazily invalidated entries
(see the broker's module docstring)."""

from __future__ import annotations

import asyncio
import heapq
import itertools

from oncely.brokers._local import wake_all

__all__ = ["Dead", "Hub", "Record", "Topic"]


class Record:
    """One message in a hub. ``token`` identifies the current claim, ``None`` when unclaimed."""

    __slots__ = (
        "attempts",
        "body",
        "enqueued_at",
        "headers",
        "id",
        "token",
        "version",
        "visible_at",
    )

    def __init__(
        self, id: str, body: bytes, headers: dict[str, str], enqueued_at: float, visible_at: float
    ) -> None:
        self.id = id
        self.body = body
        self.headers = headers
        self.enqueued_at = enqueued_at
        self.visible_at = visible_at
        self.attempts = 0
        self.token: int | None = None
        self.version = 0


class Dead:
    __slots__ = ("attempts", "body", "enqueued_at", "failed_at", "headers", "id", "reason")

    def __init__(self, record: Record, reason: str, failed_at: float) -> None:
        self.id = record.id
        self.body = record.body
        self.headers = record.headers
        self.enqueued_at = record.enqueued_at
        self.attempts = record.attempts
        self.reason = reason
        self.failed_at = failed_at


class Topic:
    __slots__ = ("dead", "heap", "live", "waiters")

    def __init__(self) -> None:
        # (visible_at, seq, version, record): seq breaks ties so records are never compared.
        self.heap: list[tuple[float, int, int, Record]] = []
        self.live: dict[str, Record] = {}
        self.dead: list[Dead] = []
        self.waiters: set[asyncio.Future[bool]] = set()


class Hub:
    """The messages of every topic of one ``memory://`` location."""

    def __init__(self) -> None:
        self.topics: dict[str, Topic] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)

    def topic(self, name: str) -> Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = Topic()
        return t

    def schedule(self, t: Topic, rec: Record, visible_at: float) -> None:
        rec.version += 1
        rec.visible_at = visible_at
        heapq.heappush(t.heap, (visible_at, next(self._seq), rec.version, rec))

    def add(self, t: Topic, rec: Record) -> None:
        t.live[rec.id] = rec
        self.schedule(t, rec, rec.visible_at)
        wake_all(t.waiters)

    def claim(self, t: Topic, visibility: float, now: float) -> Record | None:
        heap = t.heap
        while heap:
            visible_at, _, version, rec = heap[0]
            if version != rec.version:
                heapq.heappop(heap)
                continue
            if visible_at > now:
                return None
            heapq.heappop(heap)
            # A record whose claim deadline passed is claimed again here: that is the
            # visibility expiry, and the new token makes the old holder's settle fail.
            rec.attempts += 1
            rec.token = next(self._tokens)
            self.schedule(t, rec, now + visibility)
            return rec
        return None

    def next_visible(self, t: Topic) -> float | None:
        heap = t.heap
        while heap and heap[0][2] != heap[0][3].version:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def remove(self, t: Topic, rec: Record) -> None:
        rec.version += 1
        rec.token = None
        del t.live[rec.id]
