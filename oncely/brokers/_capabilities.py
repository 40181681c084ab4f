"""What a broker does natively, declared rather than faked. Part of the broker contract
(``oncely.brokers.base`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Capabilities"]


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
