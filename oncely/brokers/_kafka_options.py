"""Kafka URL options, topic names, header codec and the one ``map_errors()`` for aiokafka."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import parse_qsl, urlsplit

from aiokafka import errors as kerr

from oncely.errors import (
    BrokerError,
    ConfigError,
    ConnectionLost,
    DeliveryExpired,
    PublishFailed,
)

__all__ = [
    "BODY_DROPPED",
    "DEFAULT_BUCKETS",
    "KafkaOptions",
    "bucket_for",
    "bucket_name",
    "decode_headers",
    "dlq_topic",
    "encode_headers",
    "flat_headers",
    "header_list",
    "map_errors",
    "parse_url",
    "retry_topic",
]

BODY_DROPPED = "oncely-dead-letter-body-dropped"
"""On an exactly-once dead letter whose record was too large to copy: the original body's
size in bytes. The letter's body is empty; the original stays at the offset its
``oncely-original-*`` headers name until the input topic's retention removes it."""

DEFAULT_BUCKETS: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
"""Retry-topic delays in seconds: ``<topic>.retry.1s``, ``.5s``, ``.30s``, ``.2m``, ``.10m``,
``.1h``. A delay is rounded up to the smallest bucket at least as long."""

HeaderList = list[tuple[str, bytes]]
FlatHeaders = tuple["str | bytes", ...]
"""Encoded headers as one flat tuple: name, value, name, value, ... (see ``Output``)."""


@dataclass(frozen=True, slots=True)
class KafkaOptions:
    """What a ``kafka://`` URL says. See ``oncely.brokers.kafka`` for each option."""

    bootstrap: str
    group: str = "oncely"
    partitions: int = 1
    replication: int = 1
    ordering: Literal["key", "partition"] = "key"
    window: int = 500
    commit_interval: float = 0.5
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    isolation: Literal["read_committed", "read_uncommitted"] = "read_committed"
    client_id: str = "oncely"
    exactly_once: frozenset[str] = field(default_factory=frozenset)
    txn_messages: int = 500
    txn_interval: float = 0.5
    revoke_grace: float = 1.0
    linger_ms: int = 5
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 500
    max_poll_interval_ms: int = 300_000
    request_timeout: float = 30.0
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"

    def is_exactly_once(self, topic: str) -> bool:
        return "*" in self.exactly_once or topic in self.exactly_once


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(key: str, text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"kafka URL option {key}={text!r} is not a duration (e.g. 5s, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _int(key: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"kafka URL option {key}={text!r} is not an integer") from None
    if value < low:
        raise ConfigError(f"kafka URL option {key}={value} must be at least {low}")
    return value


def _choice(key: str, text: str, allowed: Sequence[str]) -> str:
    if text not in allowed:
        raise ConfigError(f"kafka URL option {key}={text!r}; expected one of {', '.join(allowed)}")
    return text


def parse_url(url: str) -> KafkaOptions:
    """Parse ``kafka://host:port[,host:port]/?group=...&...``.

    Raises:
        ConfigError: not a kafka URL, or an unknown or invalid option.
    """
    parts = urlsplit(url)
    if parts.scheme != "kafka" or not parts.netloc:
        raise ConfigError(f"not a Kafka URL (kafka://host:port[,host:port]/?group=...): {url!r}")
    if parts.path not in ("", "/"):
        raise ConfigError(f"a Kafka URL has no path; put options in the query string: {url!r}")
    if "@" in parts.netloc:
        # It would be taken for part of a host name, and echoed with the password in it.
        raise ConfigError(
            "a Kafka URL takes no user:password@ (oncely's Kafka adapter has no SASL "
            f"support): kafka://{parts.netloc.rpartition('@')[2]}{parts.path}"
        )
    kw: dict[str, object] = {"bootstrap": parts.netloc}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "group":
            if not value:
                raise ConfigError("kafka URL option group= must not be empty")
            kw["group"] = value
        elif key == "partitions":
            kw["partitions"] = _int(key, value, 1)
        elif key == "replication":
            kw["replication"] = _int(key, value, 1)
        elif key == "ordering":
            kw["ordering"] = _choice(key, value, ("key", "partition"))
        elif key == "window":
            kw["window"] = _int(key, value, 1)
        elif key in ("commit_interval", "txn_interval", "revoke_grace"):
            kw[key] = _duration(key, value)
        elif key == "retry_buckets":
            buckets = sorted({_duration(key, v) for v in value.split(",") if v.strip()})
            if not buckets or buckets[0] <= 0:
                raise ConfigError(f"kafka URL option retry_buckets={value!r} needs delays > 0")
            kw["buckets"] = tuple(buckets)
        elif key == "isolation":
            kw["isolation"] = _choice(key, value, ("read_committed", "read_uncommitted"))
        elif key == "client_id":
            kw["client_id"] = value
        elif key == "exactly_once":
            kw["exactly_once"] = frozenset(t for t in value.split(",") if t)
        elif key == "txn_messages":
            kw["txn_messages"] = _int(key, value, 1)
        elif key == "linger_ms":
            kw["linger_ms"] = _int(key, value, 0)
        elif key in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms"):
            kw[key] = _int(key, value, 1)
        elif key == "request_timeout":
            kw["request_timeout"] = _duration(key, value)
            if not kw["request_timeout"]:  # every request and bounded wait would time out
                raise ConfigError(f"kafka URL option request_timeout={value!r} must be > 0")
        elif key == "auto_offset_reset":
            kw["auto_offset_reset"] = _choice(key, value, ("earliest", "latest"))
        else:
            raise ConfigError(
                f"unknown kafka URL option {key!r}; known: group, partitions, replication, "
                "ordering, window, commit_interval, retry_buckets, isolation, client_id, "
                "exactly_once, txn_messages, txn_interval, revoke_grace, linger_ms, "
                "session_timeout_ms, heartbeat_interval_ms, max_poll_interval_ms, "
                "request_timeout, auto_offset_reset"
            )
    return KafkaOptions(**kw)  # type: ignore[arg-type]


def bucket_name(seconds: float) -> str:
    """``5`` -> ``"5s"``, ``120`` -> ``"2m"``, ``3600`` -> ``"1h"``, ``0.5`` -> ``"500ms"``."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{math.ceil(seconds * 1000)}ms"


def bucket_for(delay: float, buckets: Sequence[float]) -> float | None:
    """The smallest bucket at least ``delay`` long (rounded up, never down); ``None`` if the
    delay exceeds the largest."""
    for b in buckets:
        if delay <= b:
            return b
    return None


def retry_topic(topic: str, bucket: float) -> str:
    return f"{topic}.retry.{bucket_name(bucket)}"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def encode_headers(headers: Mapping[str, str]) -> HeaderList:
    """Kafka headers are bytes: ``str`` values travel as UTF-8, readable by any consumer."""
    return [(k, v.encode()) for k, v in headers.items()]


def flat_headers(headers: Mapping[str, str]) -> FlatHeaders:
    """``encode_headers`` as one flat tuple (name, value, name, value, ...); see ``header_list``."""
    return tuple(x for k, v in headers.items() for x in (k, v.encode()))


def header_list(flat: FlatHeaders) -> HeaderList:
    """The (name, value) pairs of ``flat_headers``: what aiokafka's batch builder takes."""
    # Runs for every exactly-once output when its batch is built. The common lengths are
    # spelled out: two slices, a strict zip and a list cost about five times as much as
    # the pairs themselves (an output of ``Context.produce`` has three headers).
    size = len(flat)
    if size == 6:
        pairs = [(flat[0], flat[1]), (flat[2], flat[3]), (flat[4], flat[5])]
    elif size == 4:
        pairs = [(flat[0], flat[1]), (flat[2], flat[3])]
    elif size == 2:
        pairs = [(flat[0], flat[1])]
    else:
        pairs = list(zip(flat[::2], flat[1::2], strict=True))
    return cast("HeaderList", pairs)


def decode_headers(raw: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """A plain producer's headers may hold any bytes; undecodable ones keep their bytes'
    ``latin-1`` text rather than failing the message."""
    out: dict[str, str] = {}
    for k, v in raw or ():
        if v is None:
            out[k] = ""
            continue
        try:
            out[k] = v.decode()
        except UnicodeDecodeError:
            out[k] = v.decode("latin-1")
    return out


_CONNECTION = (
    kerr.KafkaConnectionError,
    kerr.NoBrokersAvailable,
    kerr.NodeNotReadyError,
    kerr.RequestTimedOutError,
    kerr.KafkaTimeoutError,
    kerr.ConsumerStoppedError,
    kerr.ProducerClosed,
    ConnectionError,
    asyncio.TimeoutError,
)
_EXPIRED = (
    kerr.ProducerFenced,
    kerr.CommitFailedError,
    kerr.IllegalGenerationError,
    kerr.UnknownMemberIdError,
    kerr.RebalanceInProgressError,
)


@contextlib.contextmanager
def map_errors(what: str, *, publishing: bool = False) -> Iterator[None]:
    """Translate aiokafka's errors into oncely's tree, chaining the original.

    Fenced producers and commits refused for a stale group generation mean this member lost
    the partition: ``DeliveryExpired``. Connection and timeout errors: ``ConnectionLost``.
    Anything else from the broker while publishing: ``PublishFailed``; otherwise
    ``BrokerError``. oncely's own errors pass through unchanged.
    """
    try:
        yield
    except BrokerError:
        raise
    except _EXPIRED as exc:
        raise DeliveryExpired(f"{what}: this member lost the partition ({exc!r})") from exc
    except kerr.IllegalOperation as exc:
        # A transactional producer's state machine refuses: after a fatal error, which for
        # a per-partition producer means another owner's InitProducerId fenced it.
        raise DeliveryExpired(f"{what}: the transactional producer is fenced ({exc})") from exc
    except _CONNECTION as exc:
        raise ConnectionLost(f"{what}: {exc!r}") from exc
    except (kerr.KafkaError, kerr.KafkaConfigurationError) as exc:
        if publishing:
            raise PublishFailed(f"{what}: {exc!r}") from exc
        raise BrokerError(f"{what}: {exc!r}") from exc
