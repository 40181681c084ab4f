"""The broker contract every adapter implements.

A broker does three things: ``publish`` bytes to a topic, ``consume`` a topic as an async
iterator of ``Delivery`` objects, and ``aclose``. Each delivery is settled exactly once, by
``ack`` (done), ``nack(delay)`` (redeliver after at least ``delay``) or ``reject(reason)``
(dead-letter with the reason recorded). While it is unsettled, ``extend(seconds)`` pushes its
visibility deadline out.

Delivery is **at least once** on every broker: a message whose delivery is not acked before its
visibility deadline (or whose connection, channel or partition is lost) is delivered again, to
this or another consumer. Making effects happen once is the runtime's job, not the broker's.

What a broker cannot do natively it declares in ``Capabilities`` rather than faking it; the
runtime reads ``extend`` (the visibility heartbeat runs only where it is supported, and the
redelivery timeout is sized from the handler timeout where it is not) and ``max_delay`` (nack
delays above it are clamped to it). The other flags describe the broker to users and tests.

Reserved headers start with ``oncely-``; see ``Headers``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from oncely.brokers._capabilities import Capabilities
from oncely.brokers._dead_letters import ALL, DeadLetter, DeadLetterAdmin, replayed_headers
from oncely.brokers._headers import (
    ERROR_LIMIT,
    REASON_LIMIT,
    Headers,
    check_headers,
    clip_error,
    error_headers,
)

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = [
    "ALL",
    "ERROR_LIMIT",
    "REASON_LIMIT",
    "Broker",
    "Capabilities",
    "DeadLetter",
    "DeadLetterAdmin",
    "Delivery",
    "Headers",
    "Subscription",
    "TransactionalDelivery",
    "check_headers",
    "clip_error",
    "error_headers",
    "replayed_headers",
]


class Delivery(abc.ABC):
    """One delivery of a message to this consumer.

    Attributes:
        id: the broker's message id, stable across redeliveries of the same message where the
            broker allows (memory, SQLite, SQS, AMQP via ``oncely-message-id``; Kafka the
            ``oncely-message-id`` header, else ``topic/partition/offset``).
        key: the idempotency key the publisher set (``oncely-key`` header), else ``id``.
        attempt: how many times this message has been delivered, counting this one (1 on the
            first delivery). An expired visibility counts as a delivery; a deferral
            (``nack(defer=True)``) does not, where ``Capabilities.defer_keeps_attempt``.
        headers: the message headers, ``oncely-`` ones included.
        body: the raw payload bytes.
        topic: the topic (queue) the message was consumed from.
        enqueued_at: Unix time the message was first published.

    Settling methods are **not** safe to call concurrently on one delivery; the runtime calls
    them from the one task that runs the handler. Different deliveries may be settled
    concurrently from many tasks.
    """

    __slots__ = ("attempt", "body", "enqueued_at", "headers", "id", "key", "topic")

    def __init__(
        self,
        *,
        id: str,
        topic: str,
        body: bytes,
        headers: Mapping[str, str],
        attempt: int,
        enqueued_at: float,
        key: str | None = None,
    ) -> None:
        self.id = id
        self.topic = topic
        self.body = body
        self.headers = headers
        self.attempt = attempt
        self.enqueued_at = enqueued_at
        self.key = key if key is not None else headers.get(Headers.KEY, id)

    @property
    @abc.abstractmethod
    def settled(self) -> bool:
        """True once ``ack``, ``nack`` or ``reject`` has completed."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """Mark the message done; it is not delivered again (except as the broker's own
        at-least-once behaviour allows, e.g. SQS standard queues).

        Raises:
            AlreadySettled: the delivery was settled before.
            DeliveryExpired: the lease was lost; the message will be redelivered.
            ConnectionLost: the broker could not be reached; the outcome is unknown.
        """

    @abc.abstractmethod
    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> bool | None:
        """Give the message back for redelivery no sooner than ``delay`` seconds from now.

        ``delay=0`` makes it available at once. Adapters without native delay round the delay
        **up** to what they can honour; never down.

        ``defer=True`` says the handler did not run (a deferral, not a failure): where
        ``Capabilities.defer_keeps_attempt`` holds, the redelivery carries this delivery's
        ``attempt`` again instead of the next one. Otherwise it counts like any nack.

        ``error`` describes the failure that caused the nack. Where
        ``Capabilities.carries_errors`` holds, the redelivery's headers get
        ``oncely-last-error`` set to it and ``oncely-first-error`` set to it unless already
        present (so it keeps the first failure's), both clipped by ``error_headers``; the
        change is part of the nack, so a nack that fails changes no header. Elsewhere it is
        ignored. The runtime passes it only where ``carries_errors`` holds.

        Returns:
            ``False`` if the broker settled the message by dead-lettering it instead, since
            it cannot give it back (Kafka exactly-once: a retry copy over the producer's
            ``max_request_size``), having logged why: the runtime counts a dead letter, not a
            retry. ``None`` (or ``True``) if the message will come back.

        Raises:
            AlreadySettled, DeliveryExpired, ConnectionLost: as for ``ack``.
            NotSupported: ``delay`` exceeds ``Capabilities.max_delay``.
        """

    @abc.abstractmethod
    async def reject(self, reason: str) -> None:
        """Move the message to the topic's dead-letter queue with ``reason`` recorded.

        The dead letter keeps the body and headers and adds ``oncely-dead-letter-reason``,
        ``oncely-attempt`` and ``oncely-dead-lettered-at``. The move is atomic where the broker
        allows (embedded brokers); elsewhere the dead letter is written before the original is
        removed, so a crash between the two can leave a dead letter *and* a redelivery, never
        neither.

        Raises:
            AlreadySettled, DeliveryExpired, ConnectionLost: as for ``ack``.
        """

    @abc.abstractmethod
    async def extend(self, seconds: float) -> bool | None:
        """Set the visibility deadline to ``seconds`` from now (SQS semantics: not added to
        what remains). Idempotent; calling it on a settled delivery is a no-op.

        Returns:
            ``False`` if it changed nothing (settled, a settle on its way, a broker's cap
            reached), so the runtime does not count it as an extension; ``None`` (or ``True``)
            if it extended.

        Raises:
            NotSupported: the broker cannot extend a single message (``Capabilities.extend``).
            DeliveryExpired: the deadline already passed and the message was claimed again.
        """


class TransactionalDelivery(Delivery):
    """A delivery that can publish atomically with its own consumption (Kafka exactly-once).

    Records sent with ``produce`` become visible to ``read_committed`` consumers if and only
    if this delivery's ``ack`` takes effect: the outputs and the consumed offset commit in one
    broker transaction. A failure (``nack``, ``reject``, a crash, a lost partition) discards
    them, and the message is delivered again. The guarantee covers records written to the
    same broker only; effects elsewhere still need an idempotency store.
    """

    __slots__ = ()

    @abc.abstractmethod
    async def produce(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Send a record in this delivery's transaction; return its message id.

        Returns once the record is handed to the transaction, before the broker has it: the
        commit (on ``ack``) flushes and confirms. Call it from the task that runs the handler,
        before settling. Headers must be ``str`` to ``str``; ``oncely-key`` also picks the
        record's partition key.

        Raises:
            AlreadySettled: the delivery was settled.
            DeliveryExpired: the partition was lost or the producer fenced.
            ConnectionLost, PublishFailed: from the broker.
        """


class Subscription(abc.ABC):
    """An async iterator of deliveries from one topic, returned by ``Broker.consume``.

    It holds at most ``prefetch`` unsettled deliveries (yielded and buffered together); it
    fetches more only as earlier ones are settled. Iteration is meant for one task.
    Cancelling a pending ``__anext__`` loses nothing: a message claimed but not yet yielded
    goes back to the broker when the subscription closes.
    """

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Delivery:
        """Wait for the next delivery. Raises ``StopAsyncIteration`` once closed."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop fetching and return buffered, never-yielded messages to the broker.

        Deliveries already yielded stay valid: they can still be acked, nacked or rejected,
        which is what lets a worker drain in-flight handlers after it stops fetching.
        Idempotent.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Broker(abc.ABC):
    """A message broker behind one contract.

    Constructors do no I/O and touch no event loop; ``connect`` (or ``async with``) opens
    connections. All methods are safe to call concurrently from many tasks once connected.
    """

    capabilities: Capabilities
    """What this broker does natively."""

    url: str = ""
    """The URL the broker was built from, with any password masked."""

    ack_on_caller: ClassVar[bool] = False
    """Whether ``Delivery.ack`` never cancels the task that awaits it: it enters no
    ``asyncio.timeout`` (nor, on Python 3.12+, ``wait_for``) on that task, its own I/O timing
    out on a task of its own if at all. The runtime then settles a success on the delivery's
    own task rather than on a task per message (``oncely.runtime._whole``), which a cancel it
    would take for the worker's own could leave hanging. False unless an adapter is sure.
    Honoured when set on the class that defines ``consume`` (whose deliveries it vouches for)
    or below it: a subclass that overrides ``consume`` vouches for nothing until it sets it
    again."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections and declare what the adapter needs. Idempotent.

        Raises:
            ConnectionLost: the broker could not be reached.
        """

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Store a message durably (per ``Capabilities.durable``) and return its id.

        Returns only once the broker has confirmed the message. A given ``message_id`` is kept
        as the message's id; otherwise one is generated. ``delay`` holds the message back for
        at least that many seconds. Headers must be ``str`` to ``str``.

        Raises:
            PublishFailed: the broker refused or did not confirm; it may or may not be stored.
            ConnectionLost: the broker could not be reached.
            NotSupported: ``delay`` exceeds ``Capabilities.max_delay``.
        """

    @abc.abstractmethod
    def consume(self, topic: str, *, prefetch: int, visibility: float) -> Subscription:
        """Subscribe to ``topic``.

        Args:
            topic: the topic or queue to read.
            prefetch: the most unsettled deliveries the subscription may hold at once.
            visibility: seconds a delivery stays invisible to other consumers before it is
                redelivered, unless extended or settled first. Adapters without per-message
                visibility size their redelivery timeout from it.

        Consumers of one topic compete: each message goes to one of them at a time.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections. Idempotent. Unsettled deliveries are redelivered later."""

    @property
    def connected(self) -> bool | None:
        """Whether the adapter holds a working connection to the broker now, as far as it
        knows without doing I/O; ``None`` when it cannot tell (the default, and brokers
        reached over stateless HTTP). ``/readyz`` reads it.

        Optional contract: it never raises and never blocks, it is cheap enough to read on
        every probe, and ``False`` means the adapter knows it is cut off (never opened,
        closed, or its connection dropped and is not back yet), not merely that a request
        failed once.
        """
        return None

    def check_topic(self, topic: str) -> None:
        """Raise ``ConfigError`` if this broker would refuse ``topic`` as a name (no I/O).

        Optional contract: the worker calls it for every handler's topic before it connects,
        so a name the broker's rules forbid is a one-line configuration mistake rather than
        a consume that fails after start. The default accepts every name (rule unknown).
        """
        return None

    async def has_dead_letter_queue(self, topic: str) -> bool | None:
        """Whether ``topic``'s dead-letter queue (or the topic) exists, looked up without
        creating anything; ``None`` when the broker makes nothing per topic (the default).

        Optional contract: ``oncely dlq`` asks it first, so that a misspelt topic is refused
        instead of having its queues created by the admin calls. It may do I/O and raises
        like any broker call.
        """
        return None

    async def backlog(self, topic: str) -> dict[str, int] | None:
        """How many messages of ``topic`` wait to be consumed, or ``None`` when the broker
        cannot tell (the default). The metrics sampler calls it every few seconds.

        Optional contract. The answer is ``{"": n}`` for a queue (``n`` ready messages: not
        delayed, not held by a consumer) and ``{partition: lag}`` for a partitioned log,
        covering the partitions this process consumes (lag: records after the committed
        position). It may do I/O, is safe to call concurrently with consuming, never changes
        the topic, and raises like any broker call (``ConnectionLost`` when unreachable).
        """
        return None

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            # __aexit__ does not run when __aenter__ raises: close what connect opened.
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
