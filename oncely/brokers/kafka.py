"""Apache Kafka broker over aiokafka: ``kafka://host:port[,host:port]/?group=...``.

URL options (anything else is a ``ConfigError``):

* ``group=oncely``: the consumer group of every subscription (and of the transactional offset
  commits).
* ``partitions=1``, ``replication=1``: for the topics oncely creates (a topic on first publish
  or subscribe, its retry topics, its ``.dlq``). Existing topics are left as they are. Set
  ``replication=3`` on a real cluster.
* ``ordering=key|partition`` (default ``key``): records with the same Kafka key run one after
  another and different keys in parallel, even within one partition; records without a key
  have no order. ``partition`` runs each partition strictly in offset order.
* ``window=500``: the most records per partition received and not yet done (in exactly-once
  mode, also those done whose outputs wait for a lower offset, or passed beyond
  ``txn_messages`` while a transaction commits); a full window pauses the partition (the
  subscription keeps polling, so the member stays in the group) until a quarter of it has
  drained.
* ``commit_interval=0.5s``: how often completed offsets are committed (also on revoke and
  close).
* ``retry_buckets=1s,5s,30s,2m,10m,1h``: retry-topic delays; ``max_delay`` is the largest.
* ``isolation=read_committed|read_uncommitted`` (default ``read_committed``).
* ``client_id=oncely``, ``linger_ms=5``, ``request_timeout=30s``, ``session_timeout_ms``,
  ``heartbeat_interval_ms=500``, ``max_poll_interval_ms``, ``auto_offset_reset=earliest``,
  ``revoke_grace=1s`` (how long a revoked partition's handlers may finish before the commit).
* ``exactly_once=topic1,topic2`` (or ``*``): consume these topics in exactly-once mode (see
  ``_kafka_eos``): ``ctx.produce`` outputs go into a per-partition transaction, in offset
  order, that also commits the consumed offsets; ``txn_messages=500`` and
  ``txn_interval=0.5s`` close a transaction.

**Offsets, not acks.** ``ack`` marks a record done; the subscription commits per partition the
lowest offset not yet done, so a running or failed record holds the commit and a crash
redelivers it and everything after it (never anything before).

**Retries.** Kafka has no per-message delay. ``nack(delay)`` and ``publish(delay=)`` produce
the record to ``<topic>.retry.<bucket>``, the smallest bucket at least ``delay`` long, with an
``oncely-due`` time; the subscription reads the retry topics too and pauses a retry partition
whose head is not due yet, so waiting holds up nothing else. ``nack(0)`` re-produces to
``<topic>`` itself (same key, so the same partition). ``oncely-attempt`` travels in a header;
``nack(defer=True)`` keeps it. The copy is confirmed before the original's offset is marked
done: a crash in between duplicates, never loses. A copy that cannot be stored fails the
``nack`` (or ``reject``) and the record runs again a second later, since nothing else would
time a Kafka delivery out. ``attempt`` does not count redeliveries after
a crash or a rebalance (Kafka keeps no delivery count).

**Dead letters** go to ``<topic>.dlq`` (one partition) with the reason (which carries the
handler's error), the attempt, the time, and the original topic, partition and offset in
headers. ``replay`` re-produces them to ``<topic>`` and appends a marker record for each to
the DLQ *in one transaction*, so an interrupted replay neither loses nor duplicates;
``dead_letters`` lists the records without a marker, read ``read_committed``; ``purge``
appends purge markers the same way (the records stay until the DLQ's retention removes them).

**extend** keeps the partition owned: the poll loop never stops, a full partition is paused
rather than left unpolled, so ``max_poll_interval_ms`` never expires because a handler is
slow. ``Delivery.extend`` is therefore a no-op that succeeds while the partition is owned and
raises ``DeliveryExpired`` after it was revoked. There is no per-message visibility timeout.

**Rebalances.** On revoke, the subscription stops dispatching the revoked partitions, gives
their handlers ``revoke_grace``, commits what completed, and abandons the rest uncommitted;
their deliveries raise ``DeliveryExpired`` and the new owner reprocesses them. The sticky
assignor usually gives a member its partitions back, and when the next generation directly
follows the last, they continue where they were, deliveries included.

**Interop.** Records of a plain producer are consumed: the id is ``oncely-message-id`` or
``topic/partition/offset``. oncely writes plain bytes with UTF-8 ``str`` headers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import BrokerResponseError

from oncely._tasks import spawn
from oncely.brokers._kafka_consume import KafkaSubscription
from oncely.brokers._kafka_delivery import DUE
from oncely.brokers._kafka_dlq import (
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from oncely.brokers._kafka_options import (
    DEFAULT_BUCKETS,
    KafkaOptions,
    bucket_for,
    dlq_topic,
    encode_headers,
    map_errors,
    parse_url,
    retry_topic,
)
from oncely.brokers._kafka_producers import RESTART_FAILED, Producers
from oncely.brokers.base import (
    Broker,
    Capabilities,
    DeadLetter,
    DeadLetterAdmin,
    Headers,
    check_headers,
)
from oncely.errors import BrokerError, ConfigError, ConnectionLost, NotSupported

if TYPE_CHECKING:
    from typing import Self

__all__ = ["DEFAULT_BUCKETS", "KafkaBroker", "KafkaOptions"]

log = logging.getLogger("oncely.brokers.kafka")

_TOPIC_EXISTS = 36
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class KafkaBroker(Producers, Broker, DeadLetterAdmin):
    """Kafka behind the broker contract; see the module docstring. How its producers are made
    and replaced is in ``_kafka_producers``."""

    def __init__(self, options: KafkaOptions) -> None:
        self.options = options
        self.url = f"kafka://{options.bootstrap}/?group={options.group}"
        self.capabilities = Capabilities(
            native_delay=False,
            max_delay=options.buckets[-1],
            native_dlq=True,  # reject stores it in <topic>.dlq, which list/replay read
            extend=True,
            ordering="partition",
            ack_model="offset",
            transactions=True,
            durable=True,
            defer_keeps_attempt=True,
            carries_errors=True,  # the retry copy is re-produced with the error headers
        )
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._connected = False
        self._closed = False  # for good, as the other brokers: nothing connects a new client
        self._connect_lock = asyncio.Lock()
        self._topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._renew_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # producer restarts and retirements
        self._subs: weakref.WeakSet[KafkaSubscription] = weakref.WeakSet()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build from a ``kafka://`` URL (no I/O). Raises ``ConfigError`` on a bad option."""
        return cls(parse_url(url))

    async def connect(self) -> None:
        """Start the idempotent producer and the admin client. Idempotent, and shared by
        concurrent first calls (each would otherwise start a pair, all but one never closed).

        Raises:
            ConnectionLost: Kafka could not be reached, or the broker was closed.
        """
        if self._connected:
            return
        async with self._connect_lock:
            if self._closed:
                raise ConnectionLost("the Kafka broker was closed")
            if not self._connected:
                await self._connect()

    async def _connect(self) -> None:
        opts = self.options
        producer = self._idempotent_producer()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=opts.bootstrap,
            client_id=f"{opts.client_id}-admin",
            request_timeout_ms=int(opts.request_timeout * 1000),
        )
        try:
            with map_errors(f"connecting to kafka at {opts.bootstrap}"):
                await producer.start()
                await admin.start()
        except BaseException:
            await producer.stop()
            await admin.close()
            raise
        self._producer, self._admin = producer, admin
        self._connected = True

    @property
    def known_topics(self) -> set[str]:
        """Topics this broker created or found (read-only use)."""
        return self._topics

    async def ensure_topics(self, topics: list[str], *, partitions: int | None = None) -> None:
        """Create the topics that do not exist yet (idempotent, cached per broker)."""
        missing = [t for t in topics if t not in self._topics]
        if not missing:
            return
        if not self._connected:
            await self.connect()
        assert self._admin is not None
        async with self._topic_lock:
            missing = [t for t in missing if t not in self._topics]
            if not missing:
                return
            new = [
                NewTopic(t, partitions or self.options.partitions, self.options.replication)
                for t in missing
            ]
            with map_errors(f"creating topics {', '.join(missing)}"):
                response = await self._admin.create_topics(new)
            errors: list[tuple[Any, ...]] = getattr(response, "topic_errors", [])
            for name, code, *rest in errors:
                if code not in (0, _TOPIC_EXISTS):
                    raise ConfigError(f"kafka refused to create topic {name!r}: {code} {rest}")
            self._topics.update(missing)

    async def send(
        self, topic: str, body: bytes, *, key: bytes | None, headers: Mapping[str, str]
    ) -> None:
        """Produce one record with the idempotent producer and wait for its acknowledgement
        (``acks=all``). Many sends may be in flight at once; linger batches them."""
        if not self._connected:
            await self.connect()
        producer = self._producer
        if producer is None:  # aclose dropped it after the check above
            raise ConnectionLost("the Kafka broker was closed")
        with map_errors(f"publishing to {topic}", publishing=True):
            future = await producer.send(topic, body, key=key, headers=encode_headers(headers))
            try:
                await future
            except BrokerResponseError as exc:
                restart = spawn(
                    self._tasks, self._renew_producer(producer, topic, exc), log, RESTART_FAILED
                )
                await asyncio.wait([restart])  # not shield(): a cancel here leaves it running
                raise

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        merged = check_headers(headers)
        if delay > self.options.buckets[-1]:
            raise NotSupported(
                f"delay {delay}s exceeds the largest retry bucket ({self.options.buckets[-1]}s)"
            )
        await self.ensure_topics([topic, *(retry_topic(topic, b) for b in self.options.buckets)])
        mid = message_id or uuid.uuid4().hex
        merged[Headers.MESSAGE_ID] = mid
        merged.setdefault(Headers.PUBLISHED_AT, repr(time.time()))
        target = topic
        if delay > 0:
            bucket = bucket_for(delay, self.options.buckets)
            assert bucket is not None
            target = retry_topic(topic, bucket)
            merged[DUE] = repr(time.time() + delay)
        key = merged.get(Headers.KEY)
        await self.send(target, body, key=key.encode() if key is not None else None, headers=merged)
        return mid

    def check_topic(self, topic: str) -> None:
        """Kafka's rule (up to 249 ASCII letters, digits, '.', '_', '-'; not '.' or '..'),
        for the topic and the retry and dead-letter topics made from it."""
        retries = (retry_topic(topic, b) for b in self.options.buckets)
        for name in (topic, dlq_topic(topic), *retries):
            if not _TOPIC_NAME.fullmatch(name) or topic in (".", ".."):
                made = f" ({name!r}, made from it, is too long)" if name != topic else ""
                raise ConfigError(
                    f"invalid Kafka topic {topic!r}: Kafka takes up to 249 ASCII letters, "
                    f"digits, '.', '_' and '-'{made}"
                )

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> KafkaSubscription:
        sub = KafkaSubscription(self, topic, prefetch=prefetch, visibility=visibility)
        self._subs.add(sub)
        return sub

    @property
    def connected(self) -> bool | None:
        """False before ``connect`` and after ``aclose``; while consuming, whether any
        consumer holds an open connection to the cluster (consumers fetch all the time, so
        theirs do not idle out); ``None`` for a publisher alone (aiokafka drops idle producer
        connections, which says nothing about the cluster)."""
        if not self._connected:
            return False
        seen: bool | None = None
        for sub in list(self._subs):
            conns = getattr(getattr(sub.consumer, "_client", None), "_conns", None)
            if conns is None:
                continue
            if any(conn.connected() for conn in list(conns.values())):
                return True
            seen = False
        return seen

    async def backlog(self, topic: str) -> dict[str, int] | None:
        """Consumer lag per partition this process holds: the partition's high watermark
        (as of the consumer's last fetch, no I/O) minus the next offset the subscription
        would commit. ``None`` when no subscription of ``topic`` has fetched yet."""
        lags: dict[str, int] | None = None
        for sub in list(self._subs):
            consumer = sub.consumer
            if sub.topic != topic or consumer is None:
                continue
            lags = {} if lags is None else lags
            for tp, track in list(sub.tracks.items()):
                high = consumer.highwater(tp) if tp.topic == topic else None
                if high is not None:
                    lags[str(tp.partition)] = max(0, high - track.head())
        return lags

    async def has_dead_letter_queue(self, topic: str) -> bool:
        """The topic or its ``<topic>.dlq`` exists (topic metadata; creates nothing)."""
        self.check_topic(topic)
        await self.connect()
        assert self._admin is not None
        with map_errors("listing kafka topics"):
            names = set(await self._admin.list_topics())
        return topic in names or dlq_topic(topic) in names

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        await self.connect()
        letters = await list_dead_letters(self, topic)
        return [letter for letter, _ in letters[:limit]]

    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        await self.connect()
        return await replay_dead_letters(self, topic, ids)

    async def purge(self, topic: str, *, older_than: float | None = None) -> int:
        """Hide old dead letters behind purge markers; see ``_kafka_dlq``."""
        await self.connect()
        return await purge_dead_letters(self, topic, older_than)

    async def aclose(self) -> None:
        self._closed = True
        subs = list(self._subs)
        self._subs = weakref.WeakSet()
        for sub in subs:
            await sub.shutdown()
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()  # a replaced producer's retirement stops it now
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connected = False
        self._topics.clear()
        try:
            if producer is not None:
                with map_errors("closing the kafka producer"):
                    await producer.stop()
        finally:
            if admin is not None:
                try:
                    with map_errors("closing the kafka admin client"):
                        await admin.close()
                except BrokerError:
                    pass
