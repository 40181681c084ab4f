"""Counters a worker keeps, for logs, tests and the demo's summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    """What a worker did. Counters only grow; read them any time.

    Attributes:
        received: deliveries taken from the broker.
        processed: handler runs that finished and were acked.
        duplicates: deliveries acked without running because their key had completed.
        retried: failed runs nacked for a later retry.
        dead_lettered: deliveries moved to the dead-letter queue (poison, exhausted, rejected,
            key mismatch, missing key).
        deferred: deliveries put back because another worker held their key, or the store was
            unreachable (fail closed).
        failed: at-most-once runs that failed (already acked, so not retried).
        cancelled: runs cancelled at shutdown and given back to the broker.
        settle_errors: acks, nacks or rejects the broker refused (lease lost, connection
            lost); the broker redelivers those messages.
        lost: at-most-once runs cancelled at shutdown; they were acked first, so they are
            gone (each is logged at WARNING with its message id).
        heartbeat_errors: visibility extensions or lease renewals that failed (each affects
            only its own delivery; the heartbeat goes on for the others).
        delays_clamped: nack delays cut to the broker's ``Capabilities.max_delay``.
        complete_retries: completions retried because the store failed to record them.
        unrecorded: completions given up (store down past the retries, or lease lost): the
            effect happened but a redelivery of the message would run it again.
        internal_errors: deliveries on which the runtime itself failed (a bug, logged with its
            traceback); each was nacked for a later retry, or dead-lettered once the
            message's attempts ran out.
        consume_errors: consume loops that failed and were restarted.
    """

    received: int = 0
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    deferred: int = 0
    failed: int = 0
    cancelled: int = 0
    settle_errors: int = 0
    lost: int = 0
    heartbeat_errors: int = 0
    delays_clamped: int = 0
    complete_retries: int = 0
    unrecorded: int = 0
    internal_errors: int = 0
    consume_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
