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
import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from oncely.errors import NotSupported

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = [
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
]


class Headers:
    """Names of the headers oncely reads and writes. Other headers pass through untouched."""

    KEY = "oncely-key"
    """The idempotency key a publisher chose; brokers that order by key (Kafka's record key,
    SQS FIFO's group) also group by it."""
    DEDUPE_KEY = "oncely-dedupe-key"
    """The idempotency key where it differs from ``oncely-key``: the outbox sets it to each
    row's message id, because one ordering key spans many distinct messages. The default key
    source (``auto``) reads it first."""
    MESSAGE_ID = "oncely-message-id"
    """The stable message id, for brokers whose own id changes on redelivery."""
    ATTEMPT = "oncely-attempt"
    """The delivery count, for brokers that carry it in the message (AMQP retry path)."""
    PUBLISHED_AT = "oncely-published-at"
    """Unix time of the first publish, as a decimal string."""
    REASON = "oncely-dead-letter-reason"
    """Why a message was dead-lettered."""
    FAILED_AT = "oncely-dead-lettered-at"
    """Unix time at which a message was dead-lettered."""
    FIRST_ERROR = "oncely-first-error"
    """The error of a message's first failed attempt, where the broker carries errors
    (``Capabilities.carries_errors``); set once, by the first ``nack(error=)``."""
    LAST_ERROR = "oncely-last-error"
    """The error of a message's latest failed attempt, where the broker carries errors."""
    REPLAYED_AT = "oncely-replayed-at"
    """Unix time at which a dead letter was last replayed (``DeadLetterAdmin.replay``)."""
    REPLAY_COUNT = "oncely-replay-count"
    """How many times a message has been replayed from its dead-letter queue."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a broker does natively; nothing is faked.

    The runtime reads ``extend`` and ``max_delay`` (see each); the others describe the broker
    to users and to the conformance suites.

    Attributes:
        native_delay: ``nack(delay)`` and ``publish(delay=)`` are honoured by the broker itself
            without blocking the consumer. When false the adapter emulates delay in a way its
            docstring describes (for example TTL retry queues), and ``max_delay`` bounds it.
        max_delay: the longest delay the broker accepts, in seconds, or ``None`` for no limit.
            The runtime clamps every nack delay (retry backoff, ``Retry(delay=)``, deferral
            rechecks) to it, with a log line, rather than let the nack fail.
        native_dlq: ``reject`` moves the message to a dead-letter store the broker keeps.
        extend: ``Delivery.extend`` pushes this message's visibility deadline out. When false,
            ``extend`` raises ``NotSupported`` and the adapter sizes its redelivery timeout from
            the ``visibility`` given to ``consume`` instead; the runtime then runs no
            visibility heartbeat and passes a visibility that outlasts the handler timeout.
        ordering: ``"none"``, ``"queue"`` (FIFO per topic while one consumer runs) or
            ``"partition"`` (FIFO per partition/key).
        ack_model: ``"message"`` when each delivery is settled on its own, ``"offset"`` when
            progress is a committed offset per partition (Kafka); there, ``ack`` marks the
            delivery done and the adapter commits the lowest contiguous completed offset.
        transactions: the broker can publish and commit consumed offsets atomically.
        durable: messages survive a broker (or, for embedded brokers, a process) restart.
        defer_keeps_attempt: ``nack(defer=True)`` redelivers with the same ``attempt``, so a
            deferral (the store was down, another worker held the key, shutdown) does not
            spend the failure budget. False where the broker alone counts receives (SQS's
            ``ApproximateReceiveCount``): there every deferral counts as an attempt (README,
            "Attempts count failures, not deferrals", says what that means for users).
        carries_errors: ``nack(error=)`` is accepted and recorded: the redelivery carries
            ``oncely-first-error`` and ``oncely-last-error``, and so does the dead letter it
            may become. The runtime passes ``error`` only where this holds (an adapter
            written before the argument existed keeps working). False where a nack cannot
            change the message (SQS's ``ChangeMessageVisibility``): there a dead letter knows
            its last error (the reason) and, only if it failed on its first attempt, its
            first.
    """

    native_delay: bool
    max_delay: float | None
    native_dlq: bool
    extend: bool
    ordering: Literal["none", "queue", "partition"] = "none"
    ack_model: Literal["message", "offset"] = "message"
    transactions: bool = False
    durable: bool = True
    defer_keeps_attempt: bool = True
    carries_errors: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message at rest in a dead-letter queue.

    Attributes:
        reason: why it was dead-lettered; for a message whose retries ran out, the last error.
        attempt: the attempt on which it was dead-lettered.
        failed_at: Unix time it was dead-lettered.
    """

    id: str
    topic: str
    body: bytes
    headers: Mapping[str, str]
    reason: str
    attempt: int
    failed_at: float

    @property
    def last_error(self) -> str:
        """The error it was dead-lettered with: the ``reason``."""
        return self.reason

    @property
    def first_error(self) -> str | None:
        """The first failed attempt's error (``oncely-first-error``); the ``reason`` when the
        message failed once; ``None`` when it is not known."""
        first = self.headers.get(Headers.FIRST_ERROR)
        if first is not None:
            return first
        return self.reason if self.attempt <= 1 else None


class Delivery(abc.ABC):
    """One delivery of a message to this consumer.

    Attributes:
        id: the broker's message id, stable across redeliveries of the same message where the
            broker allows (memory, SQLite, SQS, AMQP via ``oncely-message-id``; Kafka uses
            ``topic:partition:offset``).
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
    ) -> None:
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
    async def extend(self, seconds: float) -> None:
        """Set the visibility deadline to ``seconds`` from now (SQS semantics: not added to
        what remains). Idempotent; calling it on a settled delivery is a no-op.

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
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class DeadLetterAdmin(abc.ABC):
    """Optional mixin for brokers whose dead-letter queue can be listed, shown, replayed and
    purged (``oncely dlq``). Every built-in broker implements it.

    Guarantees shared by all methods: they are safe to call while workers consume the topic,
    they never change messages outside ``topic``'s dead-letter queue (``replay`` adds to the
    topic itself), and a dead letter id is the message id (``Delivery.id``), stable through
    retries, dead-lettering and replays. Where a broker cannot do one natively (SQS lists by
    receiving; Kafka topics are append-only and use marker records) its docstring says what
    holds instead.
    """

    @abc.abstractmethod
    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters of ``topic``, oldest first, without removing
        them. Idempotent.

        Raises:
            ConnectionLost: the broker could not be reached.
        """

    async def get(self, topic: str, id: str) -> DeadLetter | None:
        """Return the dead letter of ``topic`` whose id is ``id``, or ``None``.

        The default scans ``dead_letters``; adapters with an index override it.

        Raises:
            ConnectionLost: the broker could not be reached.
        """
        for letter in await self.dead_letters(topic, limit=ALL):
            if letter.id == id:
                return letter
        return None

    @abc.abstractmethod
    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        """Move dead letters of ``topic`` (all, or those in ``ids``) back to the topic.

        Each replayed message keeps its id, body and headers, loses the dead-letter headers
        (so its attempt count starts again at 1) and gains ``oncely-replayed-at`` (Unix time)
        and ``oncely-replay-count`` (1 more than before). An id that is not a dead letter of
        ``topic`` is skipped. Per message the move either happens or not (embedded brokers,
        Kafka's transactions), or the copy is confirmed before the dead letter is removed, so
        an interruption can leave a message in both places, never in neither. Returns how
        many moved.

        Raises:
            ConnectionLost, PublishFailed: from the broker; what moved before stays moved.
        """

    async def purge(self, topic: str, *, older_than: float | None = None) -> int:
        """Delete the dead letters of ``topic`` dead-lettered more than ``older_than`` seconds
        ago (all of them with ``None``). Returns how many were deleted. Idempotent.

        Every built-in broker implements it; the default (for adapters written before it
        existed) raises ``NotSupported``.

        Raises:
            ConnectionLost: the broker could not be reached; what was deleted stays deleted.
            NotSupported: the adapter cannot delete dead letters.
        """
        raise NotSupported(f"{type(self).__name__} cannot purge dead letters")

    async def replay_paced(
        self,
        topic: str,
        ids: list[str],
        *,
        rate: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        chunk: int = 500,
    ) -> int:
        """``replay`` the given ids in chunks (of ``chunk``, or ``rate`` when smaller), at most
        ``rate`` messages a second on average. Returns how many moved.

        ``progress(done, total)`` is called after each chunk. An interruption (an error, a
        cancel) between chunks leaves the earlier chunks replayed and the rest dead letters,
        so running it again with the ids still listed finishes the job. Each chunk is one
        ``replay`` call: on brokers that must read the whole dead-letter queue to find ids
        (SQS, Kafka, RabbitMQ) each chunk costs one such read.
        """
        size = max(1, min(chunk, int(rate))) if rate else max(1, chunk)
        loop = asyncio.get_running_loop()
        start = loop.time()
        moved = 0
        for done in range(0, len(ids), size):
            part = ids[done : done + size]
            moved += await self.replay(topic, ids=part)
            if progress is not None:
                progress(done + len(part), len(ids))
            if rate and done + size < len(ids):
                # Sleep until the schedule allows the next chunk: rate is kept on average.
                await asyncio.sleep(max(0.0, start + (done + size) / rate - loop.time()))
        return moved


ALL = 2**31 - 1
"""A ``limit`` meaning every dead letter."""

# A replay starts the message's failure history again, errors included.
_DEAD_HEADERS = (
    Headers.REASON,
    Headers.ATTEMPT,
    Headers.FAILED_AT,
    Headers.FIRST_ERROR,
    Headers.LAST_ERROR,
)

ERROR_LIMIT = 1000
"""Most characters of an error a header carries (``error_headers``); headers travel with every
redelivery, and brokers bound their size (SQS attributes, AMQP frames)."""


REASON_LIMIT = 4 * ERROR_LIMIT
"""Most characters of a dead-letter reason the runtime sends (``clip_error``): a huge exception
message (an HTTP error quoting a response body) must not make the reject itself fail, as it
does past an AMQP frame (128 KiB), an SQS message (256 KiB) or a Kafka record (1 MiB), and
come back for ever."""


def clip_error(text: str, limit: int = ERROR_LIMIT, *, tail: int = 0) -> str:
    """``text`` fit for a header: encodable as UTF-8 (a lone surrogate, as in text decoded with
    ``surrogateescape``, becomes ``\\udcff``; every broker's driver refuses it otherwise) and at
    most ``limit`` characters, cut at the end, or with ``tail`` in the middle so that the last
    ``tail`` characters stay; the cut is marked ``…``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    tail = min(tail, limit // 2)
    return text[: limit - 1 - tail] + "…" + (text[len(text) - tail :] if tail else "")


def error_headers(headers: Mapping[str, str], error: str) -> dict[str, str]:
    """A copy of ``headers`` with ``error`` recorded for a nack (``Delivery.nack(error=)``):
    ``oncely-last-error`` set, ``oncely-first-error`` set only if absent, each clipped to
    ``ERROR_LIMIT`` characters by ``clip_error``."""
    error = clip_error(error)
    out = dict(headers)
    out.setdefault(Headers.FIRST_ERROR, error)
    out[Headers.LAST_ERROR] = error
    return out


def replayed_headers(headers: Mapping[str, str], now: float) -> dict[str, str]:
    """The headers a replayed dead letter goes back with: the dead-letter ones dropped (the
    attempt count starts again), ``oncely-replayed-at`` set and ``oncely-replay-count``
    incremented."""
    out = {k: v for k, v in headers.items() if k not in _DEAD_HEADERS}
    try:
        count = int(out.get(Headers.REPLAY_COUNT, "0"))
    except ValueError:
        count = 0
    out[Headers.REPLAYED_AT] = repr(now)
    out[Headers.REPLAY_COUNT] = str(count + 1)
    return out


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Copy and check a headers mapping: keys and values must be ``str``."""
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"headers must map str to str, got {k!r}: {v!r}")
        out[k] = v
    return out
