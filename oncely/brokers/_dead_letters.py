"""Dead letters at rest and the optional admin contract to list, replay and purge them
(``oncely dlq``). Part of the broker contract (``oncely.brokers.base`` re-exports it)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from oncely.brokers._headers import Headers
from oncely.errors import NotSupported

__all__ = ["ALL", "DeadLetter", "DeadLetterAdmin", "replayed_headers"]


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
