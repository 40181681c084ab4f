"""An in-process broker for tests, demos and single-process apps: ``memory://``.

Messages live in a *hub*. ``memory://`` is the process-global default hub, ``memory://name``
a named one (so tests can isolate themselves), and ``MemoryBroker()`` built directly owns a
private hub no other broker sees. Brokers on the same hub share its topics, so closing one
broker and opening another on the same name keeps the messages; they are gone when the process
exits (``Capabilities.durable`` is false).

Each topic keeps one heap of its messages ordered by the time they become claimable
(``visible_at``). A delayed publish, a delayed ``nack`` and a claimed message's visibility
deadline are all just a ``visible_at`` in the future, so one structure handles delay and
expiry. Entries are invalidated lazily: every change to a message bumps its version, and heap
entries carrying an older version are discarded when they reach the top. Consumers sleep until
the earliest ``visible_at`` or until a publish wakes them; nothing polls.

Publishing a ``message_id`` that is still queued (or in flight) on the same topic is a no-op
that returns the id, so a publisher that retries after a lost confirmation does not enqueue
the message twice.

A hub is not thread-safe: use it from one event loop at a time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import ClassVar
from urllib.parse import urlsplit

from oncely.brokers._local import (
    LocalDelivery,
    LocalSubscription,
    check_delay,
    check_topic,
    wake_all,
)
from oncely.brokers._memory_hub import Dead, Hub, Record, Topic
from oncely.brokers.base import (
    Broker,
    Capabilities,
    DeadLetter,
    DeadLetterAdmin,
    Delivery,
    Headers,
    Subscription,
    check_headers,
    error_headers,
    replayed_headers,
)
from oncely.errors import ConfigError, ConnectionLost

__all__ = ["MemoryBroker"]

_hubs: dict[str, Hub] = {}


class MemoryBroker(Broker, DeadLetterAdmin):
    """An in-process broker; see the module docstring.

    Args:
        hub: the name of a process-global hub to share with other brokers (``""`` is the one
            ``memory://`` uses), or ``None`` for a private hub.
    """

    ack_on_caller: ClassVar[bool] = True  # an ack is a dict operation

    capabilities = Capabilities(
        native_delay=True,
        max_delay=None,
        native_dlq=True,
        extend=True,
        ordering="none",
        durable=False,
        carries_errors=True,
    )

    def __init__(self, hub: str | None = None) -> None:
        self._hub_name = hub
        self._hub: Hub | None = None if hub is not None else Hub()
        self._connected = False
        self._subs: set[_MemorySubscription] = set()
        self.url = f"memory://{hub}" if hub is not None else "memory://<private>"

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        """Build a broker from ``memory://`` (the default hub) or ``memory://name``.

        Raises:
            ConfigError: the URL has a path, query, fragment or credentials.
        """
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigError(f"not a memory URL: {url!r}")
        if parts.query:
            raise ConfigError(f"{url!r}: memory URLs take no options, got {parts.query!r}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"{url!r}: write memory:// or memory://name, with no path")
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ConfigError(f"{url!r}: a memory hub name cannot hold credentials or a port")
        return cls(hub=parts.netloc)

    async def connect(self) -> None:
        """Attach to the hub. Idempotent; also reattaches after ``aclose``."""
        if self._hub is None:
            assert self._hub_name is not None
            self._hub = _hubs.setdefault(self._hub_name, Hub())
        self._connected = True

    @property
    def connected(self) -> bool:
        """Attached to the hub (between ``connect`` and ``aclose``)."""
        return self._connected

    async def backlog(self, topic: str) -> dict[str, int] | None:
        """Messages of ``topic`` claimable now (not delayed, not held by a consumer)."""
        hub = self._require()
        t = hub.topics.get(topic)
        now = time.monotonic()
        return {"": 0 if t is None else sum(1 for r in t.live.values() if r.visible_at <= now)}

    def _require(self) -> Hub:
        if not self._connected or self._hub is None:
            raise ConnectionLost(f"{self.url} is not connected; call connect() first")
        return self._hub

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Enqueue a message; see ``Broker.publish``. A still-queued ``message_id`` is kept
        as is (no second copy)."""
        checked = check_headers(headers)
        check_delay(delay)
        check_topic(topic)
        hub = self._require()
        t = hub.topic(topic)
        mid = message_id if message_id is not None else uuid.uuid4().hex
        if mid not in t.live:
            now = time.monotonic()
            hub.add(t, Record(mid, bytes(body), checked, time.time(), now + delay))
        return mid

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> Subscription:
        """Subscribe to ``topic``; see ``Broker.consume``."""
        sub = _MemorySubscription(self, topic, prefetch, visibility)
        self._subs.add(sub)
        return sub

    async def aclose(self) -> None:
        """Close every subscription and detach. Claimed, unsettled messages become claimable
        again when their visibility runs out."""
        for sub in list(self._subs):
            await sub.aclose()
        self._connected = False

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """List dead letters of ``topic``, oldest first; see ``DeadLetterAdmin``."""
        hub = self._require()
        t = hub.topics.get(topic)
        if t is None:
            return []
        return [
            DeadLetter(
                id=d.id,
                topic=topic,
                body=d.body,
                headers={
                    **d.headers,
                    Headers.REASON: d.reason,
                    Headers.ATTEMPT: str(d.attempts),
                    Headers.FAILED_AT: repr(d.failed_at),
                },
                reason=d.reason,
                attempt=d.attempts,
                failed_at=d.failed_at,
            )
            for d in t.dead[:limit]
        ]

    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        """Move dead letters back with attempt count 0, each atomically (nothing else runs on
        the hub meanwhile); see ``DeadLetterAdmin``.

        A dead letter whose id is queued on the topic again stays where it is.
        """
        hub = self._require()
        t = hub.topics.get(topic)
        if t is None:
            return 0
        wanted = None if ids is None else set(ids)
        kept: list[Dead] = []
        now = time.monotonic()
        moved = 0
        wall = time.time()
        for d in t.dead:
            if (wanted is None or d.id in wanted) and d.id not in t.live:
                headers = replayed_headers(d.headers, wall)
                rec = Record(d.id, d.body, headers, d.enqueued_at, now)
                t.live[rec.id] = rec
                hub.schedule(t, rec, now)
                moved += 1
            else:
                kept.append(d)
        t.dead = kept
        if moved:
            wake_all(t.waiters)
        return moved

    async def purge(self, topic: str, *, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (all with ``None``); see
        ``DeadLetterAdmin``. Atomic: nothing else runs on the hub meanwhile."""
        hub = self._require()
        t = hub.topics.get(topic)
        if t is None:
            return 0
        cutoff = None if older_than is None else time.time() - older_than
        before = len(t.dead)
        t.dead = [d for d in t.dead if cutoff is not None and d.failed_at >= cutoff]
        return before - len(t.dead)


class _MemorySubscription(LocalSubscription):
    def __init__(self, broker: MemoryBroker, topic: str, prefetch: int, visibility: float) -> None:
        super().__init__(topic, prefetch, visibility)
        self._broker = broker

    async def __anext__(self) -> Delivery:
        # A checkpoint, so a consumer that always finds a message still lets other tasks run.
        await asyncio.sleep(0)
        while True:
            if self.closed:
                raise StopAsyncIteration
            hub = self._broker._require()
            t = hub.topic(self.topic)
            if self.unsettled >= self.prefetch:
                await self.park(None, None)
                continue
            now = time.monotonic()
            rec = hub.claim(t, self.visibility, now)
            if rec is not None:
                self.unsettled += 1
                return _MemoryDelivery(self, t, rec)
            nxt = hub.next_visible(t)
            await self.park(t.waiters, None if nxt is None else nxt - now)

    async def aclose(self) -> None:
        """Stop iterating; nothing is buffered, so nothing goes back. Idempotent."""
        self.closed = True
        self._broker._subs.discard(self)
        self.interrupt()


class _MemoryDelivery(LocalDelivery):
    __slots__ = ("_record", "_t", "_token")

    def __init__(self, sub: _MemorySubscription, t: Topic, rec: Record) -> None:
        super().__init__(
            sub,
            id=rec.id,
            body=rec.body,
            headers=rec.headers,
            attempt=rec.attempts,
            enqueued_at=rec.enqueued_at,
        )
        self._t = t
        self._record = rec
        self._token = rec.token

    def _own(self) -> Hub | None:
        """The hub if this claim still holds the message, else ``None``."""
        assert isinstance(self._sub, _MemorySubscription)
        hub = self._sub._broker._require()
        return hub if self._record.token == self._token else None

    async def ack(self) -> None:
        await self._settle(self._ack)

    async def _ack(self) -> bool:
        hub = self._own()
        if hub is not None:
            hub.remove(self._t, self._record)
        return hub is not None

    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> None:
        async def attempt() -> bool:
            check_delay(delay)
            hub = self._own()
            if hub is not None:
                self._record.token = None
                if defer:
                    self._record.attempts -= 1
                if error is not None:
                    # A new dict: this delivery's own headers stay as they were delivered.
                    self._record.headers = error_headers(self._record.headers, error)
                hub.schedule(self._t, self._record, time.monotonic() + delay)
                wake_all(self._t.waiters)
            return hub is not None

        await self._settle(attempt)

    async def reject(self, reason: str) -> None:
        async def attempt() -> bool:
            hub = self._own()
            if hub is not None:
                hub.remove(self._t, self._record)
                self._t.dead.append(Dead(self._record, reason, time.time()))
            return hub is not None

        await self._settle(attempt)

    async def extend(self, seconds: float) -> bool:
        check_delay(seconds, "seconds")
        if self._settled:
            return False
        hub = self._own()
        if hub is None:
            self._expired()
            return False
        rec = self._record
        visible_at = time.monotonic() + seconds
        earlier = visible_at < rec.visible_at
        hub.schedule(self._t, rec, visible_at)
        if earlier:
            # Consumers sleep until the earliest deadline they know of; this one moved up.
            wake_all(self._t.waiters)
        return True
