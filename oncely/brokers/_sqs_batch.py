"""Coalescing single requests into SQS batch calls (10 entries per call).

``DeleteMessageBatch``, ``ChangeMessageVisibilityBatch`` and ``SendMessageBatch`` each go
through a ``Batcher`` per queue. A caller submits one entry and awaits its own outcome; the
batcher sends a call as soon as 10 entries (or the size limit) are waiting, or ``window``
seconds after the first one arrived, with at most ``max_inflight`` calls at a time (while they
are all busy, entries keep accumulating into fuller batches).

A batch call returns HTTP 200 even when entries fail, so every response's ``Failed`` list is
read: an entry with ``SenderFault`` false (the server's fault) is retried a few times with a
short backoff; any other failed entry fails its caller with the error ``on_failed`` builds.
A call that fails as a whole (after botocore's own retries) fails every entry in it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from oncely.brokers._sqs_errors import entry_error, map_errors
from oncely.errors import BrokerError

if TYPE_CHECKING:
    from oncely.brokers._sqs_errors import Op
    from oncely.brokers._sqs_link import BrokerLink

__all__ = ["Batcher", "make_batcher"]

log = logging.getLogger("oncely.brokers.sqs")

E = TypeVar("E")

MAX_ENTRIES = 10
RETRIES = 4
_IDS = tuple(str(n) for n in range(MAX_ENTRIES))
"""The batch-local entry ids, made once."""
_INDEX = {id_: n for n, id_ in enumerate(_IDS)}
"""An entry id back to its index: a look-up per entry, not an ``int()`` parse."""


_Outcome = asyncio.Future[Mapping[str, Any]]


@dataclass(slots=True)
class _State(Generic[E]):
    """What waits to be sent, in three parallel lists (no object per entry: one is made per
    ack, and each one that outlives a garbage collection makes the next come sooner)."""

    pending: list[_Outcome] = field(default_factory=list)
    entries: list[E] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    inflight: int = 0


class Batcher(Generic[E]):
    """Batches entries of one kind for one queue.

    Args:
        call: sends one batch: ``call(entries with "Id" set)`` returns the response dict
            (``Successful``/``Failed``); it raises oncely errors for a failed call.
        on_failed: builds the error for a non-retryable failed entry from (code, message).
        window: seconds to wait for more entries after the first (0: the next loop turn).
        max_inflight: calls in flight at once for this queue.
        max_bytes: the most bytes one call may carry (sends), or ``None``.
        with_id: puts the batch-local ``Id`` into an entry (entries are typed dicts);
            ``None``: set in place (the entries are the caller's own dicts, made for it).
    """

    def __init__(
        self,
        call: Callable[[list[E]], Awaitable[Mapping[str, Any]]],
        *,
        on_failed: Callable[[str, str], BrokerError],
        with_id: Callable[[E, str], E] | None = None,
        window: float,
        max_inflight: int = 4,
        max_bytes: int | None = None,
    ) -> None:
        self._call = call
        self._on_failed = on_failed
        self._with_id = with_id
        self._window = window
        self._max_inflight = max_inflight
        self._max_bytes = max_bytes
        self._state: _State[E] = _State()
        self._tasks: dict[asyncio.Task[None], list[_Outcome]] = {}  # call in flight -> entries
        self._tries: dict[_Outcome, int] = {}  # retried entries (by future) -> times
        self._idle: asyncio.Event | None = None
        self._abandoned: BaseException | None = None  # closed: what entries left now fail with
        self._loop: asyncio.AbstractEventLoop | None = None
        """The running loop, looked up once: on Python 3.11 each ``get_running_loop()`` is a
        ``getpid`` system call, and ``submit`` runs once per ack. A broker and its client live
        on one loop."""

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def submit(self, entry: E, size: int = 0) -> asyncio.Future[Mapping[str, Any]]:
        """Queue ``entry``; the returned future is its outcome: the ``Successful`` entry of
        the response. (A plain future, not a coroutine: one object less per settle.)

        Cancelling the future (or a caller awaiting it) does not withdraw the entry: it is
        sent anyway.

        Raises (from the future):
            BrokerError: the entry failed (``on_failed``), or the whole call did.
        """
        loop = self._loop or self._get_loop()
        future: _Outcome = loop.create_future()
        if self._max_bytes is not None:
            self._add(entry, size, future)
            return future
        # _add inlined for settles (no size limit): this runs once per ack.
        state = self._state
        pending = state.pending
        pending.append(future)
        state.entries.append(entry)
        state.sizes.append(size)
        if len(pending) >= MAX_ENTRIES:
            self._kick()
        elif state.timer is None:
            state.timer = loop.call_later(self._window, self._kick)
        return future

    def _add(self, entry: E, size: int, future: _Outcome) -> None:
        state = self._state
        state.pending.append(future)
        state.entries.append(entry)
        state.sizes.append(size)
        if self._full():
            self._kick()
        elif state.timer is None:
            state.timer = self._get_loop().call_later(self._window, self._kick)

    def _full(self) -> bool:
        state = self._state
        if len(state.pending) >= MAX_ENTRIES:
            return True
        return self._max_bytes is not None and sum(state.sizes) >= self._max_bytes

    def _take(self) -> tuple[list[E], list[_Outcome], list[int]]:
        state = self._state
        sizes = state.sizes
        n = min(len(sizes), MAX_ENTRIES)
        if self._max_bytes is not None:
            # The first entry always goes, whatever its size (publish checked it fits).
            total = sizes[0]
            for i in range(1, n):
                total += sizes[i]
                if total > self._max_bytes:
                    n = i
                    break
        chunk = (state.entries[:n], state.pending[:n], sizes[:n])
        del state.entries[:n], state.pending[:n], sizes[:n]
        return chunk

    def _kick(self) -> None:
        state = self._state
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        while state.pending and state.inflight < self._max_inflight:
            entries, futures, sizes = self._take()
            state.inflight += 1
            task = self._get_loop().create_task(self._send(entries, futures, sizes))
            self._tasks[task] = futures
            task.add_done_callback(self._forget)
        if state.pending and state.inflight < self._max_inflight and state.timer is None:
            state.timer = self._get_loop().call_later(self._window, self._kick)

    async def _send(self, chunk: list[E], futures: list[_Outcome], sizes: list[int]) -> None:
        retry: list[int] = []  # indexes into chunk
        tries = self._tries
        try:
            with_id = self._with_id
            if with_id is None:
                # In place, without a call per entry (a retried entry gets its new batch's
                # Id the same way).
                for n, entry in enumerate(chunk):
                    entry["Id"] = _IDS[n]  # type: ignore[index]
                entries = chunk
            else:
                entries = [with_id(entry, _IDS[n]) for n, entry in enumerate(chunk)]
            response = await self._call(entries)
            resolved = 0
            for ok in response.get("Successful", ()):
                # _resolve inlined: once per entry.
                future = futures[_INDEX[ok["Id"]]]
                if not future.done():
                    future.set_result(ok)
                    resolved += 1
            for failed in response.get("Failed", ()):
                n = int(failed["Id"])
                future = futures[n]
                code, message = failed.get("Code", "?"), failed.get("Message", "")
                tried = tries.get(future, 0)
                if not failed.get("SenderFault", False) and tried < RETRIES:
                    tries[future] = tried + 1
                    retry.append(n)
                elif future.cancelled():
                    _unheard(1, self._on_failed(code, message))
                else:
                    _fail(future, self._on_failed(code, message))
            if resolved < len(futures):  # else all succeeded: no second pass per entry
                for n, future in enumerate(futures):
                    if not future.done() and n not in retry:
                        _fail(future, BrokerError("SQS returned no outcome for a batch entry"))
        except BaseException as exc:
            error: BaseException = exc
            if not isinstance(exc, Exception):
                error = BrokerError("batch call cancelled")
            elif not isinstance(exc, BrokerError):
                # A response that names no entry of ours, or a bug: callers still get an
                # oncely error, and the traceback is logged.
                log.error("SQS batch call failed unexpectedly", exc_info=exc)
                error = BrokerError(f"SQS batch call failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            retry.clear()  # failed with the rest: not sent again
            if isinstance(exc, Exception) and (gone := sum(f.cancelled() for f in futures)):
                _unheard(gone, error)
            for future in futures:
                _fail(future, error)
            if not isinstance(exc, Exception):
                raise
        finally:
            if tries:
                # Settled (or failed) for good: forget how often they were tried.
                for n, future in enumerate(futures):
                    if n not in retry:
                        tries.pop(future, None)
            try:
                if retry:
                    # Answered: only the entries to send again are unconfirmed now (abandon
                    # counts them by this list; their callers may have gone, the futures
                    # cancelled, so a future's state cannot tell).
                    task = asyncio.current_task()
                    if task is not None and task in self._tasks:
                        self._tasks[task] = [futures[n] for n in retry]
                    # Back off with the call slot held, then queue them again.
                    await asyncio.sleep(0.05 * 2 ** max(tries[futures[n]] for n in retry))
            finally:
                self._state.inflight -= 1
                abandoned = self._abandoned
                for n in retry:
                    if abandoned is None:
                        self._add(chunk[n], sizes[n], futures[n])
                    else:  # closed during the backoff: abandon counted it unconfirmed
                        _fail(futures[n], abandoned)
                if self._state.pending and self._state.timer is None:
                    self._kick()
                idle = self._idle
                if idle is not None and not self._state.pending and not self._state.inflight:
                    idle.set()

    async def flush(self) -> None:
        """Send everything waiting now, and wait until no call is in flight."""
        while self._state.pending or self._state.inflight:
            # Shared by concurrent flushes: replacing it would strand the other's wait.
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            idle = self._idle
            self._kick()
            await idle.wait()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def abandon(self, error: BaseException) -> int:
        """Closing: fail every entry still waiting with ``error`` and cut off the calls in
        flight (their entries fail too), and fail any entry they would queue again. Returns
        how many entries were left unconfirmed."""
        self._abandoned = error
        state = self._state
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        pending, state.pending = state.pending, []
        state.entries, state.sizes = [], []
        self._tries.clear()
        for future in pending:
            _fail(future, error)
        # A finished call may still be listed (its done callback runs a loop turn later).
        running = [(task, futures) for task, futures in self._tasks.items() if not task.done()]
        for task, _ in running:
            task.cancel()
        # A call in flight lists all its entries, cancelled callers' too (sent, never
        # confirmed); one that answered and backs off, only those it would send again.
        return len(pending) + sum(len(futures) for _, futures in running)

    def __len__(self) -> int:
        return len(self._state.pending) + self._state.inflight


def _unheard(n: int, exc: BaseException) -> None:
    """Entries whose callers were cancelled (a shutdown cut an ``ack`` short; its entry went
    out anyway) failed: nobody else hears of it. Their messages come back once their
    visibility runs out."""
    log.warning(
        "%d SQS batch entr%s whose caller was cancelled failed: %s; an ack's message comes "
        "back when its visibility runs out",
        n,
        "y" if n == 1 else "ies",
        exc,
    )


def _fail(future: asyncio.Future[Mapping[str, Any]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # The caller may have gone (cancelled); do not let the loop log "never retrieved".
        future.add_done_callback(_consume)


def _consume(future: asyncio.Future[Mapping[str, Any]]) -> None:
    if not future.cancelled():
        future.exception()


def make_batcher(broker: BrokerLink, kind: str, url: str) -> Batcher[Any]:
    """The batcher of ``kind`` (``send``, ``delete``, ``change_visibility``) for one queue."""

    async def call(entries: list[Any]) -> Mapping[str, Any]:
        client = broker._client or await broker._connected()  # no coroutine once made
        broker.api_calls[kind] += 1
        broker.api_entries[kind] += len(entries)
        if kind == "send":
            with map_errors("publish"):
                return await client.send_message_batch(QueueUrl=url, Entries=entries)
        with map_errors("settle"):
            if kind == "delete":
                return await client.delete_message_batch(QueueUrl=url, Entries=entries)
            return await client.change_message_visibility_batch(QueueUrl=url, Entries=entries)

    op: Op = "publish" if kind == "send" else "settle"
    return Batcher(
        call,
        on_failed=lambda code, message: entry_error(op, code, message),
        with_id=None,  # the entry dicts are the broker's own, made for this one submit
        # Publishes go at once (coalescing only what is queued meanwhile); settles wait
        # ``ack_window`` for company, since their latency matters less than their count.
        window=0.0 if kind == "send" else broker.options.ack_window,
        max_inflight=16,
        max_bytes=broker.options.max_message_size if kind == "send" else None,
    )
