"""The idempotency-store contract.

A store records, per idempotency key, who is working on it and what came of it. The runtime
calls ``begin`` before a handler runs and gets one of four outcomes:

- ``NEW``: this caller owns the key until the lease expires; run the handler.
- ``IN_PROGRESS``: another caller holds a live lease; do not run, redeliver later.
- ``COMPLETED``: the key finished before; do not run, ack, and use the stored result.
- ``MISMATCH``: the key finished or is running with a *different* payload fingerprint; the
  message is a misuse of the key and goes to the dead-letter queue.

A lease expires on its own, so a crashed worker never blocks a key for ever. The owner proves
ownership with the ``token`` from ``begin``: ``renew``, ``complete`` and ``release`` with a stale
token raise ``LeaseLost`` (renew) or change nothing, so a worker whose lease was taken over can
never overwrite the new owner's record.

Every transition is atomic, across tasks and, for shared stores, across processes and hosts.

The crash window of a plain store: the handler's effect happens, then the worker dies before
``complete``; the lease expires and a redelivery runs the handler again. A
``TransactionalStore`` closes it by committing the handler's writes and the completion in one
database transaction.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import asyncio
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType
    from typing import Self

__all__ = ["Begin", "IdempotencyStore", "Outcome", "StoreTransaction", "TransactionalStore"]


class Outcome(enum.Enum):
    """What ``begin`` found for a key."""

    NEW = "new"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    MISMATCH = "mismatch"


@dataclass(frozen=True, init=False)
class Begin:
    """The answer of ``IdempotencyStore.begin``.

    Attributes:
        outcome: one of the four outcomes.
        token: the lease token when ``outcome`` is ``NEW``, else ``None``.
        result: the stored result bytes when ``outcome`` is ``COMPLETED`` (``None`` if the
            handler returned nothing).
        retry_after: for ``IN_PROGRESS``, seconds until the other lease expires.
    """

    outcome: Outcome
    token: str | None = None
    result: bytes | None = None
    retry_after: float = 0.0

    def __init__(
        self,
        outcome: Outcome,
        token: str | None = None,
        result: bytes | None = None,
        retry_after: float = 0.0,
    ) -> None:
        # Every store makes one per message. A frozen dataclass's own __init__ sets each
        # field through object.__setattr__, a call apiece: 7.3 k instructions per Begin
        # against 3.7 k written straight into the instance's dict (cachegrind). Still frozen.
        fields = self.__dict__
        fields["outcome"] = outcome
        fields["token"] = token
        fields["result"] = result
        fields["retry_after"] = retry_after


class IdempotencyStore(abc.ABC):
    """Where keys, leases and results live.

    Constructors do no I/O; ``connect`` (or ``async with``) does. Every method is safe to call
    concurrently once connected. Connection failures raise ``StoreUnavailable``.
    """

    url: str = ""

    complete_on_caller: ClassVar[bool] = False
    """Whether ``complete`` never cancels the task that awaits it (as ``Broker.ack_on_caller``:
    no ``asyncio.timeout`` on the caller's task; a batched store times its I/O out on the
    batch's own task). False unless a store is sure. Honoured when set on the class that
    defines ``complete`` or below it: a subclass that overrides ``complete`` vouches for
    nothing until it sets it again."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections and create what the store needs. Idempotent.

        Raises:
            StoreUnavailable: the store could not be reached.
        """

    @abc.abstractmethod
    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        """Try to take ``key`` for ``lease`` seconds.

        Atomic: among any number of concurrent callers on a free or expired key, exactly one
        gets ``NEW``. A completed key returns ``COMPLETED`` (or ``MISMATCH`` if ``fingerprint``
        differs from the one recorded) until its result's ttl runs out. A live lease returns
        ``IN_PROGRESS`` (or ``MISMATCH`` on a different fingerprint). An expired lease is taken
        over: ``NEW`` with a fresh token.

        Raises:
            StoreUnavailable: the store could not be reached; the caller decides whether to
                fail closed (retry later, the default) or open.
        """

    @abc.abstractmethod
    async def renew(self, key: str, token: str, lease: float) -> None:
        """Push the lease out to ``lease`` seconds from now. Idempotent.

        Raises:
            LeaseLost: ``token`` no longer owns the key (it expired and was taken over, or was
                released or completed).
            StoreUnavailable: the store could not be reached.
        """

    @abc.abstractmethod
    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        """Record the key as done with ``result``, kept for ``ttl`` seconds.

        Raises:
            LeaseLost: ``token`` no longer owns the key; nothing was recorded.
            StoreUnavailable: the store could not be reached.
        """

    completes_soon: ClassVar[bool] = False
    """Whether ``complete_soon`` is offered; honoured as ``complete_on_caller`` is (a subclass
    that overrides ``complete`` must set it again)."""

    def complete_soon(
        self, key: str, token: str, result: bytes | None, ttl: float
    ) -> asyncio.Future[None]:
        """``complete``, queued now and not awaited: the future gets its outcome, ``None`` or
        the error ``complete`` would raise. For a caller that lets another wait for it (the
        broker's batched ack, ``oncely.brokers._ack_after``). Only where ``completes_soon``."""
        raise NotImplementedError(f"{type(self).__name__} has no complete_soon")

    @abc.abstractmethod
    async def release(self, key: str, token: str) -> None:
        """Give up the lease so a retry can take the key at once. A stale token is ignored.

        Raises:
            StoreUnavailable: the store could not be reached (the lease then simply expires).
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections. Idempotent."""

    async def ping(self) -> None:
        """One cheap round trip that proves the store answers (``/readyz`` calls it).

        The default releases a key nobody holds with a token nobody has, which every store
        ignores (see ``release``): no side effect. Adapters may override it with a cheaper
        call. Safe to call concurrently with everything else.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        await self.release("oncely:ping", "oncely-ping-token")

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


TRANSACTION_ENDED = (
    "the handler ended the store's transaction itself (COMMIT or ROLLBACK on ctx.connection), "
    "so its writes no longer commit with the completion record; dead-lettered rather than run "
    "again, since what it committed may include its effect"
)
"""Why ``TransactionalStore.transaction`` refuses to record a completion (``Reject``): on a
connection back in autocommit the record would commit on its own, for an effect rolled back
(lost for good: every redelivery finds the key completed) or committed a step earlier."""


class StoreTransaction:
    """What ``TransactionalStore.transaction`` yields.

    Attributes:
        connection: the driver connection with the transaction open (an
            ``aiosqlite.Connection`` for SQLite, an ``asyncpg.Connection`` for PostgreSQL).
            The handler runs its own writes on it and must not commit or roll back itself.
            It serves this transaction only: once it has ended, any use of it raises.
        result: the bytes to record as the key's result; the runtime sets it from the
            handler's return value before the context exits.
    """

    __slots__ = ("connection", "result")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.result: bytes | None = None


class TransactionalStore(IdempotencyStore):
    """A store that can record completion in the same transaction as the handler's writes."""

    @abc.abstractmethod
    def transaction(
        self, key: str, token: str, ttl: float
    ) -> AbstractAsyncContextManager[StoreTransaction]:
        """Open a database transaction and yield it, connection included, to the handler.

        On a clean exit the key is marked completed (with ``StoreTransaction.result``)
        **in the same transaction**, which then commits: the handler's writes and the
        completion record become durable together, or not at all. If the lease was lost
        meanwhile, the transaction rolls back and ``LeaseLost`` is raised. On an exception
        it rolls back and re-raises.

        Raises:
            LeaseLost: another worker owns the key now; the handler's writes were rolled back.
            StoreUnavailable: the store could not be reached.
            Reject: the body ended the transaction itself (a ``COMMIT`` or ``ROLLBACK`` on the
                connection); no completion is recorded, since on its own it would commit
                apart from the writes (``TRANSACTION_ENDED``).
        """
