"""Every exception oncely raises, in one hierarchy.

Driver errors (aiosqlite, aio-pika, aiokafka, botocore, asyncpg, redis) never escape an adapter
unwrapped: each adapter translates them in one ``map_errors()`` context manager and chains the
original with ``raise ... from exc``.

::

    OncelyError
    ├── ConfigError                 a setting, URL or handler declaration is wrong
    │   ├── UnknownScheme           no backend is registered for a URL scheme
    │   └── MissingExtra            the backend's optional dependency is not installed
    ├── BrokerError                 anything a broker adapter reports
    │   ├── ConnectionLost          the connection to the broker broke or could not be made
    │   ├── PublishFailed           the broker did not confirm a publish
    │   ├── DeliveryExpired         the delivery's lease was lost (visibility ran out, channel
    │   │                           closed, partition revoked); settling it again is refused
    │   ├── AlreadySettled          ack/nack/reject was called twice on one delivery
    │   └── NotSupported            the broker cannot do this (see ``Capabilities``)
    ├── StoreError                  anything an idempotency store reports
    │   ├── StoreUnavailable        the store could not be reached
    │   └── LeaseLost               another worker owns the key now; this worker's effect must
    │                               not be recorded
    ├── DecodeError                 a payload could not be decoded into the handler's type
    ├── WorkerFailed                the worker stopped itself: a consume loop could not go on
    └── HandlerTimeout              a handler outlived its ``timeout`` and was cancelled

Two exceptions are not errors but instructions a handler raises to choose its outcome:
``Retry(reason, *, delay=None)`` asks for redelivery after ``delay`` seconds and
``Reject(reason)`` sends the message to the dead-letter queue at once; both take the reason
first. They derive from ``HandlerOutcome``.
"""

from __future__ import annotations

__all__ = [
    "AlreadySettled",
    "BrokerError",
    "ConfigError",
    "ConnectionLost",
    "DecodeError",
    "DeliveryExpired",
    "HandlerOutcome",
    "HandlerTimeout",
    "LeaseLost",
    "MissingExtra",
    "NotSupported",
    "OncelyError",
    "PublishFailed",
    "Reject",
    "Retry",
    "StoreError",
    "StoreUnavailable",
    "UnknownScheme",
    "WorkerFailed",
]


class OncelyError(Exception):
    """Base class of every error oncely raises."""


class ConfigError(OncelyError):
    """A setting, URL or handler declaration is invalid."""


class UnknownScheme(ConfigError):
    """No broker or store is registered for a URL scheme."""


class MissingExtra(ConfigError):
    """A backend's optional dependency is not installed.

    The message names the exact ``pip install 'oncely[extra]'`` that fixes it.
    """

    def __init__(self, scheme: str, extra: str, module: str, *, what: str = "") -> None:
        super().__init__(
            f"{what or f'the {scheme!r} backend'} needs the {module!r} package, which is not "
            f"installed; run: pip install 'oncely[{extra}]'"
        )
        self.scheme = scheme
        self.extra = extra
        self.module = module


class BrokerError(OncelyError):
    """A broker adapter failed."""


class ConnectionLost(BrokerError):
    """The connection to the broker broke or could not be opened."""


class PublishFailed(BrokerError):
    """The broker did not confirm a publish; the message may or may not have been stored."""


class DeliveryExpired(BrokerError):
    """The delivery's lease is gone, so another consumer may hold the message now.

    Raised by ``ack``/``nack``/``reject``/``extend`` when the visibility deadline passed and the
    message was claimed again, when the channel that carried it closed, or when its partition was
    revoked. The message is not lost: the broker redelivers it.
    """


class AlreadySettled(BrokerError):
    """``ack``, ``nack`` or ``reject`` was called on a delivery that was already settled."""


class NotSupported(BrokerError):
    """The broker cannot perform this operation; its ``Capabilities`` say so."""


class StoreError(OncelyError):
    """An idempotency store failed."""


class StoreUnavailable(StoreError):
    """The idempotency store could not be reached."""


class LeaseLost(StoreError):
    """The lease on a key expired and another worker took it over."""


class DecodeError(OncelyError):
    """A payload could not be decoded into the handler's declared type."""


class WorkerFailed(OncelyError):
    """The worker stopped itself because a consume loop could not go on (a configuration
    mistake, or the same unexpected failure again and again); the cause is chained."""


class HandlerTimeout(OncelyError):
    """A handler ran past its ``timeout`` and was cancelled."""


class HandlerOutcome(Exception):
    """Base of the exceptions a handler raises to choose how its message is settled."""


class Retry(HandlerOutcome):
    """Raise from a handler to have the message redelivered: ``raise Retry("db down")``.

    Args:
        reason: why, recorded in logs and, if retries run out, as the dead-letter reason. The
            first positional argument means the same in ``Retry`` and ``Reject``.
        delay: seconds before the redelivery (keyword-only); ``None`` lets the handler's retry
            policy pick it. The attempt still counts against ``max_attempts``.

    Raises:
        TypeError: ``reason`` is not a string (``Retry(5)`` is a mistake for
            ``Retry(delay=5)``).
        ValueError: ``delay`` is negative, infinite or NaN.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        _check_reason(type(self).__name__, reason)
        # "0 <= delay < inf" also refuses NaN; an infinite delay would park the message for
        # good on a broker without a max_delay (memory, SQLite).
        if delay is not None and not 0 <= delay < float("inf"):
            raise ValueError(f"Retry delay must be a finite number >= 0, got {delay}")
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(HandlerOutcome):
    """Raise from a handler to dead-letter the message at once: ``raise Reject("bad total")``.

    Args:
        reason: recorded as the dead letter's reason.

    Raises:
        TypeError: ``reason`` is not a string.
    """

    def __init__(self, reason: str) -> None:
        _check_reason(type(self).__name__, reason)
        super().__init__(reason)
        self.reason = reason


def _check_reason(cls: str, reason: object) -> None:
    if not isinstance(reason, str):
        hint = f"; for a delay write {cls}(delay={reason!r})" if cls == "Retry" else ""
        raise TypeError(
            f"{cls}'s first argument is the reason, a str; got {type(reason).__name__}{hint}"
        )
