"""RabbitMQ (AMQP 0-9-1) broker over aio-pika: ``amqp://user:pass@host:port/vhost``.

URL options (anything else is a ``ConfigError``):

* ``queue_type=classic|quorum`` (default ``classic``). Quorum queues are replicated (Raft) and
  are the production choice; classic queues live on one node. All queues are durable and all
  messages persistent either way, so both survive a broker restart.
* ``publish_timeout=30``: seconds to wait for the connection and the publisher confirm.
* ``batch_acks=1``: coalesce acks into ``multiple=True`` frames (see ``AckWindow``).
* ``timeout=10``: seconds a connect (and each reconnect) may take, then ``ConnectionLost``.
* aio-pika's own: ``heartbeat``, ``name``, ``reconnect_interval`` (default 1 here),
  ``fail_fast``, TLS files for ``amqps://`` and a few more.

Topology (see ``_amqp_topology``): per topic, a work queue ``<topic>``, a dead-letter queue
``<topic>.dlq`` and TTL delay buckets ``<topic>.delay.{1s,5s,30s,2m,10m,1h}``, declared
idempotently on first use. A queue that already exists with other arguments is a
``ConfigError``; plain AMQP clients should publish to ``<topic>`` through the default
exchange without redeclaring it (or declare it passively).

**Delay.** AMQP 0-9-1 has no per-message delay. ``publish(delay=)`` and ``nack(delay)``
publish to the smallest bucket whose TTL is at least the delay (rounded *up*, never down); the
bucket dead-letters expired messages back to the work queue. Per-queue TTL is used, not
per-message expiration, which only expires messages at the head of a queue. A delay above the
largest bucket (1 hour, ``Capabilities.max_delay``) raises ``NotSupported``.

**Retry and dead-letter.** ``nack`` republishes the message (body, headers, properties) to the
bucket or work queue with ``oncely-attempt`` = this attempt, waits for the confirm, *then* acks
the original, so a crash in between leaves a duplicate and never a loss. ``reject`` does the
same towards ``<topic>.dlq`` and adds ``oncely-dead-letter-reason``, ``oncely-attempt`` and
``oncely-dead-lettered-at``. ``attempt`` is ``oncely-attempt + 1``, plus one for a broker
redelivery (``redelivered`` flag, or the quorum queue's ``x-delivery-count``).

**A nack or reject always settles.** When the republish fails (``PublishFailed``,
``ConnectionLost``, cancellation) or the delay exceeds the largest bucket (``NotSupported``),
the original is handed back with ``basic.nack(requeue=True)`` and the error is raised with a
note saying so: the message comes straight back (counted as a redelivery), its prefetch slot is
free, and the channel is never left to ``consumer_timeout``. A failed republish also makes the
adapter declare the topic's queues again before the next one. ``replay`` stops at the first
letter dead-lettered after it began, so a consumer that dead-letters again cannot make it cycle.

**Ids.** ``Delivery.id`` is ``oncely-message-id``, else the AMQP ``message_id``, else
``sha256:<hex of the body>``; the last is stable across redeliveries but shared by identical
bodies, so plain publishers that send identical payloads as distinct messages must set a
``message_id``. oncely publishes plain bytes with ordinary ``str`` headers, readable by any
AMQP client.

**No extend; size the consumer timeout.** AMQP cannot extend a single delivery, so
``Capabilities.extend`` is false and ``Delivery.extend`` raises ``NotSupported``. The only
limit on how long a delivery may stay unacked is RabbitMQ's ``consumer_timeout`` (global in
``rabbitmq.conf`` -- ``scripts/services.sh`` sets 1 hour; per consumer, from 3.11.15, through
the ``x-consumer-timeout`` argument each subscription sends: see ``consumer_timeout_ms``).
It must exceed the handler timeout (the ``visibility`` given to
``consume`` is not enforced by the broker). Prefetched deliveries that wait in the
subscription's buffer are unacked too, so ``prefetch`` x handler time must stay below it as
well. When it fires, RabbitMQ closes the channel and requeues *every* unacked delivery on it;
this adapter reopens the channel and resumes, and the old deliveries raise ``DeliveryExpired``.

**Connection loss.** The connection is ``connect_robust``; subscriptions resume after a
reconnect on a new channel. Deliveries from the dead channel raise ``DeliveryExpired`` when
settled (their delivery tags are void) and the broker redelivers them, so nothing is acked
twice or lost. Publishes that were waiting for a confirm raise ``PublishFailed`` (the message
may or may not be stored). AMQP acks are not confirmed: an ack that races a channel close is
dropped by the broker and the message comes back (a duplicate, never a loss). Messages a
closed subscription hands back are marked redelivered, so their next attempt counts one more.

**Quorum queues on RabbitMQ 4.x** have a default ``delivery-limit`` of 20 redeliveries (not
retries: those are republished); a message over it is dead-lettered to ``<topic>.dlq`` by the
broker, without oncely's reason header (``DeadLetter.reason`` falls back to the broker's
``x-first-death-reason``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import weakref
from typing import TYPE_CHECKING, ClassVar

from pamqp.commands import Basic

from oncely.brokers._amqp_connect import opened
from oncely.brokers._amqp_consume import AmqpSubscription
from oncely.brokers._amqp_dlq import (
    dlq_exists,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from oncely.brokers._amqp_message import properties
from oncely.brokers._amqp_topology import (
    MAX_DELAY,
    AmqpOptions,
    QueueType,
    bucket_for,
    bucket_name,
    check_topic,
    declare,
    map_errors,
    parse_url,
)
from oncely.brokers.base import (
    Broker,
    Capabilities,
    DeadLetter,
    DeadLetterAdmin,
    Headers,
    check_headers,
)
from oncely.errors import ConnectionLost, PublishFailed

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Self

    from aio_pika.abc import (
        AbstractRobustChannel,
        AbstractRobustConnection,
    )
    from pamqp.common import FieldTable

__all__ = ["AmqpBroker", "AmqpOptions"]


class AmqpBroker(Broker, DeadLetterAdmin):
    """RabbitMQ through aio-pika. See the module docstring for the topology and guarantees.

    Publishes from many tasks share one confirm-mode channel and pipeline: each awaits only
    its own confirm. Each subscription has its own channel with ``basic.qos(prefetch)``.
    """

    # Batched acks are flushed on a task of their own (_amqp_acks); an unbatched one writes
    # its frame on the caller's task, with no timeout (aiormq's basic_ack has none).
    ack_on_caller: ClassVar[bool] = True
    # Deliveries have ack_after: the batched flush waits for the completion it follows
    # (oncely.brokers._ack_after), so a success with a store waits once, not twice.
    acks_after: ClassVar[bool] = True

    capabilities = Capabilities(
        native_delay=False,
        max_delay=MAX_DELAY,
        native_dlq=True,
        extend=False,
        ordering="queue",
        ack_model="message",
        transactions=False,
        durable=True,
        carries_errors=True,  # the retry copy is republished with the error headers
    )

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        queue_type: QueueType | None = None,
        publish_timeout: float | None = None,
        batch_acks: bool | None = None,
    ) -> None:
        self._driver_url, options, self.url = parse_url(url)
        self.options = AmqpOptions(
            queue_type=queue_type or options.queue_type,
            publish_timeout=publish_timeout or options.publish_timeout,
            batch_acks=options.batch_acks if batch_acks is None else batch_acks,
            connect_timeout=options.connect_timeout,
        )
        self._conn: AbstractRobustConnection | None = None
        self._pub: AbstractRobustChannel | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._declared: set[str] = set()
        self._topology_lock: asyncio.Lock | None = None
        self._subscriptions: weakref.WeakSet[AmqpSubscription] = weakref.WeakSet()
        self._closed = False
        self._leftovers: set[asyncio.Task[None]] = set()  # connects given up, closing

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def __repr__(self) -> str:
        return f"AmqpBroker({self.url!r}, queue_type={self.options.queue_type!r})"

    # ------------------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Open the robust connection and the publish channel. Idempotent.

        Raises:
            ConnectionLost: the broker could not be reached.
            ConfigError: the credentials or vhost were refused.
        """
        await self._connected()

    async def _connected(self) -> AbstractRobustConnection:
        if self._closed:
            raise ConnectionLost("the AMQP broker was closed")
        if self._conn is not None and self._pub is not None:
            return self._conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._pub is None:  # set with _conn, both or neither
                conn, pub = await opened(
                    self._driver_url, self.options.connect_timeout, self._leftovers
                )
                if self._closed:  # aclose ran meanwhile: it could not close this one
                    with contextlib.suppress(Exception):
                        await conn.close()
                    raise ConnectionLost("the AMQP broker was closed")
                self._conn, self._pub = conn, pub
        assert self._conn is not None
        return self._conn

    async def aclose(self) -> None:
        """Close the connection. Idempotent. Unacked deliveries are requeued by the broker."""
        self._closed = True
        for sub in list(self._subscriptions):
            sub.shutdown()
        conn, self._conn, self._pub = self._conn, None, None
        if conn is not None:
            # Closing a connection whose transport is already gone may raise; it is closed.
            with contextlib.suppress(Exception):
                await conn.close()

    @property
    def connected(self) -> bool:
        """Opened, not closed, and the robust connection is up (false while it reconnects)."""
        conn = self._conn
        return (
            not self._closed
            and conn is not None
            and not conn.is_closed
            and conn.connected.is_set()  # cleared on a lost connection, set on reconnect
        )

    async def backlog(self, topic: str) -> dict[str, int] | None:
        """Ready messages in ``topic``'s work queue (a passive declare on a short-lived
        channel; delay buckets and unacked deliveries are not counted). Never creates it."""
        check_topic(topic)
        connection = await self._connected()
        with map_errors("admin"):
            async with connection.channel(publisher_confirms=False) as channel:
                queue = await channel.declare_queue(topic, passive=True)
        result = queue.declaration_result
        return {"": int(result.message_count or 0)}

    def _forget_topology(self, topic: str) -> None:
        """Declare ``topic``'s queues again before its next publish: a republish failed,
        maybe because someone deleted one of them."""
        self._declared.discard(topic)

    async def _ensure_topology(self, topic: str) -> None:
        if topic in self._declared:
            return
        check_topic(topic)
        if self._topology_lock is None:
            self._topology_lock = asyncio.Lock()
        # One declaration at a time: concurrent first publishes to a topic wait for the first.
        async with self._topology_lock:
            if topic in self._declared:
                return
            connection = await self._connected()
            with map_errors("declare"):
                # A short-lived channel: a failed declare closes the channel it ran on.
                async with connection.channel(publisher_confirms=False) as channel:
                    raw = await channel.get_underlay_channel()
                    await declare(raw, topic, self.options.queue_type)
            self._declared.add(topic)

    # ---------------------------------------------------------------------------- publish

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Publish persistently with a publisher confirm and return the message id.

        Safe to call concurrently; concurrent calls pipeline on one channel. The message goes
        to ``topic``, or with ``delay`` to the smallest delay bucket >= ``delay``.

        Raises:
            PublishFailed: nacked, returned (no such queue) or not confirmed in time.
            ConnectionLost: no connection within ``publish_timeout``.
            NotSupported: ``delay`` exceeds ``Capabilities.max_delay`` (1 hour).
        """
        table: FieldTable = dict(check_headers(headers))
        bucket = bucket_for(delay)
        await self._ensure_topology(topic)
        mid = message_id or uuid.uuid4().hex
        now = time.time()
        table[Headers.MESSAGE_ID] = mid
        table[Headers.PUBLISHED_AT] = repr(now)
        target = topic if bucket is None else bucket_name(topic, bucket[1])
        try:
            await self._send(target, body, properties(mid, table, now))
        except PublishFailed:
            self._forget_topology(topic)  # a returned publish may mean a deleted queue
            raise
        return mid

    async def _send(self, queue: str, body: bytes, props: Basic.Properties) -> None:
        """Publish to ``queue`` via the default exchange, mandatory, and await the confirm."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout
        await self._connected()
        pub = self._pub
        if pub is None:
            raise ConnectionLost("the AMQP broker was closed")
        with map_errors("connect"):
            async with asyncio.timeout_at(deadline):
                await pub.ready()  # connection and channel restored after any reconnect
                channel = await pub.get_underlay_channel()
        with map_errors("publish"):
            result = await channel.basic_publish(
                body,
                exchange="",
                routing_key=queue,
                properties=props,
                mandatory=True,
                timeout=max(deadline - loop.time(), 0.001),
            )
        if not isinstance(result, Basic.Ack):
            raise PublishFailed(f"AMQP publish to {queue!r} was not acked: {result!r}")

    # ---------------------------------------------------------------------------- consume

    def check_topic(self, topic: str) -> None:
        """Queue-name rules, as ``publish`` and ``consume`` check them (the module's function)."""
        check_topic(topic)

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> AmqpSubscription:
        """Subscribe on a channel of its own with ``basic.qos(prefetch)``.

        ``visibility`` is not enforced by RabbitMQ: the broker-wide ``consumer_timeout`` must
        exceed it (see the module docstring). The channel opens on the first ``__anext__``.
        """
        check_topic(topic)
        sub = AmqpSubscription(self, topic, prefetch, visibility)
        self._subscriptions.add(sub)
        return sub

    # ------------------------------------------------------------------------- dead letters

    async def has_dead_letter_queue(self, topic: str) -> bool:
        check_topic(topic)
        connection = await self._connected()
        with map_errors("admin"):
            return await dlq_exists(connection, topic)

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """Read up to ``limit`` dead letters, oldest first, without removing them.

        They are fetched with ``basic.get`` (no ack) on a short-lived channel and handed back
        with ``basic.nack(requeue=True)``, which RabbitMQ puts back in their original positions.
        While they are read, another reader of the DLQ does not see them.
        """
        await self._ensure_topology(topic)
        return await list_dead_letters(await self._connected(), topic, limit)

    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        """Move dead letters (all, or those in ``ids``) back to ``topic`` with a fresh attempt.

        Each is republished with a confirm and then acked from the DLQ, so a crash between the
        two leaves it in both places (a duplicate), never in neither. Letters not selected are
        handed back in place.

        It stops at the first letter dead-lettered after it started (by
        ``oncely-dead-lettered-at``, or the broker's ``x-death`` time for letters RabbitMQ
        dead-lettered itself) and hands that one back in place: the DLQ is FIFO, so the ones
        behind it are newer still. A running consumer that dead-letters replayed messages again
        thus appends them behind the old ones, and they wait for the next replay instead of
        cycling for ever. (A count taken at the start would not do: a quorum queue counts a
        letter that was just handed back by a reader only some time later.)
        """
        await self._ensure_topology(topic)
        return await replay_dead_letters(await self._connected(), topic, ids, self._send)

    async def purge(self, topic: str, *, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (all with ``None``).

        Each is fetched with ``basic.get`` and acked if old enough; the others stay unacked
        and go back in place when the short-lived channel closes. Each delete is on its own,
        so an interrupted purge has deleted some and left the rest.
        """
        await self._ensure_topology(topic)
        return await purge_dead_letters(await self._connected(), topic, older_than)
