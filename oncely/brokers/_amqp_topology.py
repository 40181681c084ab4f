"""AMQP topology, URL options and error translation for ``AmqpBroker`` (how a message maps
to oncely's view of it is ``_amqp_message``).

Per topic ``t`` the adapter declares, all durable and of one queue type:

* ``t``: the work queue; its ``x-dead-letter-exchange`` is the default exchange routed to
  ``t.dlq``, so a plain AMQP consumer's ``basic.reject(requeue=False)`` also dead-letters.
* ``t.dlq``: the dead-letter queue.
* ``t.delay.1s`` ... ``t.delay.1h``: delay buckets. Each has a per-queue ``x-message-ttl`` (so
  every message in it expires in arrival order) and dead-letters to the default exchange with
  routing key ``t``, i.e. back into the work queue.

Everything is published through the default exchange with the queue name as routing key and
``mandatory=True``, so a missing queue is a returned (failed) publish rather than a silent drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiormq
import aiormq.exceptions
import pamqp.exceptions

from oncely.errors import (
    ConfigError,
    ConnectionLost,
    DeliveryExpired,
    NotSupported,
    PublishFailed,
)

if TYPE_CHECKING:
    from pamqp.common import FieldTable

BUCKETS: tuple[tuple[int, str], ...] = (
    (1, "1s"),
    (5, "5s"),
    (30, "30s"),
    (120, "2m"),
    (600, "10m"),
    (3600, "1h"),
)
"""Delay buckets as (seconds, label). A delay is rounded *up* to the next bucket."""

MAX_DELAY = float(BUCKETS[-1][0])

QueueType = Literal["classic", "quorum"]

# Query options that aio-pika/aiormq understand; they are passed through unchanged.
_DRIVER_OPTIONS = frozenset(
    {
        "heartbeat",
        "timeout",
        "name",
        "auth",
        "cafile",
        "capath",
        "cadata",
        "keyfile",
        "certfile",
        "no_verify_ssl",
        "reconnect_interval",
        "fail_fast",
        "interleave",
        "happy_eyeballs_delay",
    }
)
_OWN_OPTIONS = frozenset({"queue_type", "publish_timeout", "batch_acks"})

CONNECT_TIMEOUT = 10.0
"""Without it a host that takes the TCP connection and never answers (a black hole behind a
load balancer, a wrong port) holds ``connect`` for ever; 10 s, as the PostgreSQL store's
default ``command_timeout`` bounds its connects (Redis and SQS allow 5 s per try, and retry)."""


@dataclass(frozen=True, slots=True)
class AmqpOptions:
    """Adapter options, from the URL query (``?queue_type=quorum&publish_timeout=10``).

    Attributes:
        queue_type: ``classic`` (default) or ``quorum`` (replicated; the production choice).
        publish_timeout: seconds to wait for a connection and a publisher confirm.
        batch_acks: coalesce acks of concurrently settled deliveries into ``multiple=True``
            frames where every lower delivery tag on the channel is settled too.
        connect_timeout: seconds one connect (TCP, TLS, the AMQP handshake and the publish
            channel) may take, then ``ConnectionLost``: the URL's ``timeout`` (aio-pika's own
            name, which aio-pika 10 reads but does not apply), else ``CONNECT_TIMEOUT``.
    """

    queue_type: QueueType = "classic"
    publish_timeout: float = 30.0
    batch_acks: bool = True
    connect_timeout: float = CONNECT_TIMEOUT


# aiormq reads a number it cannot parse as 0 (heartbeat=abc or 1.5: no heartbeats) and a
# flag it does not know as false, silently; oncely refuses them instead.
_DRIVER_NUMBERS = {"heartbeat": int, "interleave": int, "timeout": float}
_DRIVER_NUMBERS |= {"reconnect_interval": float, "happy_eyeballs_delay": float}


def _check_driver_value(key: str, value: str) -> None:
    kind = _DRIVER_NUMBERS.get(key)
    if kind is not None:
        try:
            ok = 0 <= kind(value) < math.inf
        except ValueError:
            ok = False
        if not ok:
            what = "a whole number" if kind is int else "a number"
            raise ConfigError(f"AMQP URL option {key}={value!r} must be {what} >= 0")
    elif key in ("fail_fast", "no_verify_ssl") and value.lower() not in _FLAGS:
        raise ConfigError(f"AMQP URL option {key}={value!r} must be true or false")


_FLAGS = ("1", "0", "true", "false", "yes", "no", "on", "off")


def parse_url(url: str) -> tuple[str, AmqpOptions, str]:
    """Split an ``amqp(s)://`` URL into (driver URL, options, URL with password masked).

    Raises:
        ConfigError: unknown or invalid option, or not an AMQP URL.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigError(f"not an AMQP URL: {mask(url)!r}")
    own: dict[str, str] = {}
    driver: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _OWN_OPTIONS:
            own[key] = value
        elif key in _DRIVER_OPTIONS:
            _check_driver_value(key, value)
            driver.append((key, value))
        else:
            known = ", ".join(sorted(_OWN_OPTIONS | _DRIVER_OPTIONS))
            raise ConfigError(f"unknown AMQP URL option {key!r}; known: {known}")
    if not any(k == "reconnect_interval" for k, _ in driver):
        driver.append(("reconnect_interval", "1"))
    queue_type = own.get("queue_type", "classic")
    if queue_type not in ("classic", "quorum"):
        raise ConfigError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
    try:
        publish_timeout = float(own.get("publish_timeout", "30"))
    except ValueError:
        publish_timeout = math.nan
    if not publish_timeout > 0 or math.isinf(publish_timeout):
        raise ConfigError(f"publish_timeout must be a positive number of seconds: {mask(url)!r}")
    batch = own.get("batch_acks", "1").lower()
    if batch not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"batch_acks must be a boolean, got {batch!r}")
    timeout = next((float(v) for k, v in driver if k == "timeout"), CONNECT_TIMEOUT)
    if not timeout > 0:
        raise ConfigError(f"AMQP URL option timeout must be > 0 seconds: {mask(url)!r}")
    options = AmqpOptions(
        queue_type="quorum" if queue_type == "quorum" else "classic",
        publish_timeout=publish_timeout,
        batch_acks=batch in ("1", "true", "yes"),
        connect_timeout=timeout,
    )
    query = "&".join(f"{k}={v}" for k, v in driver)
    driver_url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    return driver_url, options, mask(url)


def mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# The characters pamqp lets through in a queue name; anything else raised its bare
# ValueError("Invalid value for queue") from the declare, a traceback for a typo.
_QUEUE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]+")


def check_topic(topic: str) -> None:
    """Queue names are at most 255 bytes of letters, digits and ``-_.:@#,/+`` or space, and
    ``amq.`` is reserved."""
    if not _QUEUE_NAME.fullmatch(topic) or topic.startswith("amq.") or len(topic.encode()) > 240:
        raise ConfigError(
            f"invalid AMQP topic (queue name) {topic!r}: use up to 240 letters, digits, "
            "spaces or -_.:@#,/+, not starting with amq."
        )


def dlq_name(topic: str) -> str:
    return f"{topic}.dlq"


def bucket_for(delay: float) -> tuple[int, str] | None:
    """The smallest bucket >= ``delay``, or ``None`` for no delay.

    Raises:
        NotSupported: ``delay`` exceeds the largest bucket.
        ValueError: ``delay`` is negative or not a number.
    """
    if not delay >= 0:
        raise ValueError(f"delay must be >= 0, got {delay!r}")
    if delay == 0:
        return None
    for bucket in BUCKETS:
        if bucket[0] >= delay:
            return bucket
    raise NotSupported(f"AMQP delay {delay}s exceeds the largest delay bucket ({MAX_DELAY:g}s)")


def bucket_name(topic: str, label: str) -> str:
    return f"{topic}.delay.{label}"


def topology(topic: str, queue_type: QueueType) -> list[tuple[str, FieldTable]]:
    """(queue name, arguments) of every queue ``topic`` needs, work queue first."""
    safe: FieldTable = {"x-queue-type": queue_type}
    if queue_type == "quorum":
        # At-least-once dead-lettering (3.10+): a message leaves the source queue only once the
        # target confirmed it. It requires reject-publish overflow.
        safe.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    work: FieldTable = {
        **safe,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq_name(topic),
    }
    queues: list[tuple[str, FieldTable]] = [
        (topic, work),
        (dlq_name(topic), {"x-queue-type": queue_type}),
    ]
    for seconds, label in BUCKETS:
        args: FieldTable = {
            **safe,
            "x-message-ttl": seconds * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topic,
        }
        queues.append((bucket_name(topic, label), args))
    return queues


async def declare(channel: aiormq.abc.AbstractChannel, topic: str, queue_type: QueueType) -> None:
    with map_errors("declare"):
        for name, args in topology(topic, queue_type):
            await channel.queue_declare(name, durable=True, arguments=args)


# ---------------------------------------------------------------------------- error mapping

Op = Literal["connect", "declare", "publish", "settle", "admin"]


@contextlib.contextmanager
def map_errors(op: Op) -> Iterator[None]:
    """Translate aio-pika / aiormq / pamqp / socket errors into oncely's, by operation.

    ``publish``: a nack, return or lost confirm is ``PublishFailed`` (outcome unknown).
    ``settle``: the delivery's channel is gone, so it is ``DeliveryExpired`` (redelivered).
    ``declare``: a queue that exists with other arguments is a ``ConfigError``.
    Anything else that means the broker is unreachable is ``ConnectionLost``. A
    ``CancelledError`` the current task did not ask for (aiormq cancels pending futures when a
    channel closes) is treated as a lost channel; a real cancellation propagates.
    """
    try:
        yield
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise _translate(op, exc) from exc
    except (
        aiormq.exceptions.AMQPError,
        aiormq.exceptions.ChannelInvalidStateError,
        pamqp.exceptions.PAMQPException,
        ConnectionError,
        OSError,
        TimeoutError,
    ) as exc:
        raise _translate(op, exc) from exc


def _translate(op: Op, exc: BaseException) -> Exception:
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) and op == "declare":
        return ConfigError(f"an AMQP queue exists with different arguments ({what})")
    if isinstance(
        exc, aiormq.exceptions.ChannelAccessRefused | aiormq.exceptions.AuthenticationError
    ):
        return ConfigError(f"AMQP access refused ({what})")
    if op == "settle" and not isinstance(exc, TimeoutError):
        return DeliveryExpired(
            f"the delivery's AMQP channel is gone; it will be redelivered ({what})"
        )
    if op == "publish" and isinstance(
        exc, aiormq.exceptions.DeliveryError | aiormq.exceptions.ChannelClosed | TimeoutError
    ):
        return PublishFailed(f"AMQP publish not confirmed ({what})")
    if op == "publish" and isinstance(
        exc, asyncio.CancelledError | aiormq.exceptions.ConnectionClosed
    ):
        return PublishFailed(f"AMQP connection lost before the confirm ({what})")
    return ConnectionLost(f"AMQP broker unreachable ({what})")
