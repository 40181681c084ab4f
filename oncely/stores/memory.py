"""An in-process idempotency store, for tests, demos and single-process workers.

``memory://`` gives a private store; ``memory://name`` gives a store whose state is shared by
every ``memory://name`` in the process (and lives as long as the process), so a test can give
two "workers" the same keys. A directly constructed ``MemoryStore()`` is private.

Nothing survives a restart, so this store only deduplicates within one process's lifetime.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from oncely.errors import ConfigError, LeaseLost, StoreUnavailable
from oncely.stores.base import Begin, IdempotencyStore, Outcome

__all__ = ["MemoryStore"]

STALE_LEASE_GRACE = 3600.0
"""Seconds after a lease expired (and nobody took the key) before its entry may be purged.

Until then the old owner may still renew or complete; afterwards it gets ``LeaseLost``.
"""

_NAME = re.compile(r"[A-Za-z0-9_.~-]+")


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    token: str | None
    """The lease token while running; ``None`` once completed."""
    lease_until: float
    result: bytes | None
    expires_at: float
    """When the entry may be forgotten: the result's ttl, or the lease plus the stale grace."""


@dataclass(slots=True)
class _Table:
    entries: dict[str, _Entry] = field(default_factory=dict)
    # A named table may be shared by stores driven from different threads (each with its own
    # event loop); holding this for the few dict operations of a transition makes each one
    # atomic there too, and costs nothing measurable in the single-loop case.
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_purge: float = 0.0


_named: dict[str, _Table] = {}
_tokens = itertools.count(1)
"""Lease tokens: unique in the process, which is all a memory store spans (and a tenth of
the cost of a ``uuid4``). ``next()`` on it is atomic under the GIL, across threads too."""
_named_lock = threading.Lock()


def _named_table(name: str) -> _Table:
    with _named_lock:
        return _named.setdefault(name, _Table())


class MemoryStore(IdempotencyStore):
    """Keys, leases and results in a dict, with monotonic-clock expiry.

    Every transition runs without an ``await`` inside, so it is atomic among the tasks of one
    event loop, and a lock makes it atomic across threads too. Expired entries are forgotten
    lazily: ``begin`` treats them as absent, and a sweep every ``purge_interval`` seconds (run
    by whichever ``begin`` notices it is due) drops them.

    Args:
        name: share the state of every store with this name in the process; ``None`` keeps
            the state private to this instance.
        purge_interval: seconds between sweeps of expired entries.
    """

    complete_on_caller: ClassVar[bool] = True  # no I/O at all

    def __init__(self, name: str | None = None, *, purge_interval: float = 60.0) -> None:
        if purge_interval <= 0:
            raise ConfigError(f"purge_interval must be > 0, got {purge_interval}")
        self.name = name
        self.url = f"memory://{name}" if name is not None else "memory://"
        self.purge_interval = purge_interval
        self._table = _named_table(name) if name is not None else _Table()
        self._open = False

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """Build a store from ``memory://`` (private) or ``memory://name`` (shared by name).

        Raises:
            ConfigError: the URL is not of either form.
        """
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigError(f"not a memory URL: {url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"memory store URL {url!r} takes no options")
        if parts.path not in ("", "/"):
            raise ConfigError(
                f"memory store URL {url!r} has a path; write memory:// or memory://name"
            )
        if not parts.netloc:
            return cls()
        if not _NAME.fullmatch(parts.netloc):
            raise ConfigError(
                f"memory store URL {url!r}: the name may only contain letters, digits and -._~"
            )
        return cls(parts.netloc)

    async def connect(self) -> None:
        self._open = True

    async def aclose(self) -> None:
        self._open = False

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        table = self._table if self._open else self._checked()
        with table.lock:
            now = time.monotonic()
            if now >= table.next_purge:
                self._sweep(table, now)
            entry = table.entries.get(key)
            if entry is not None and not self._expired(entry, now):
                same = entry.fingerprint == fingerprint
                if entry.token is None:
                    if not same:
                        return Begin(Outcome.MISMATCH)
                    return Begin(Outcome.COMPLETED, result=entry.result)
                if not same:
                    return Begin(Outcome.MISMATCH)
                return Begin(Outcome.IN_PROGRESS, retry_after=max(0.0, entry.lease_until - now))
            token = str(next(_tokens))
            until = now + lease
            table.entries[key] = _Entry(fingerprint, token, until, None, until + STALE_LEASE_GRACE)
            return Begin(Outcome.NEW, token)

    async def renew(self, key: str, token: str, lease: float) -> None:
        table = self._checked()
        with table.lock:
            entry = self._owned(table, key, token)
            now = time.monotonic()
            entry.lease_until = now + lease
            entry.expires_at = now + lease + STALE_LEASE_GRACE

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        table = self._table if self._open else self._checked()
        with table.lock:
            entry = self._owned(table, key, token)
            entry.token = None
            entry.result = result
            entry.expires_at = time.monotonic() + ttl

    async def release(self, key: str, token: str) -> None:
        table = self._checked()
        with table.lock:
            entry = table.entries.get(key)
            if entry is not None and entry.token is not None and entry.token == token:
                del table.entries[key]

    async def purge(self) -> int:
        """Forget expired results and long-dead leases now.

        Returns:
            How many entries were dropped.

        Raises:
            StoreUnavailable: the store is closed.
        """
        table = self._checked()
        with table.lock:
            return self._sweep(table, time.monotonic())

    def _checked(self) -> _Table:
        if not self._open:
            raise StoreUnavailable("memory store is not connected (call connect() first)")
        return self._table

    @staticmethod
    def _expired(entry: _Entry, now: float) -> bool:
        if entry.token is None:
            return entry.expires_at <= now
        return entry.lease_until <= now

    @staticmethod
    def _owned(table: _Table, key: str, token: str) -> _Entry:
        # An expired lease nobody took over still belongs to its token, so a slow worker may
        # finish its key; only a takeover, release or completion changes the token.
        entry = table.entries.get(key)
        if entry is None or entry.token is None or entry.token != token:
            raise LeaseLost(f"lease on key {key!r} is no longer held by this token")
        return entry

    def _sweep(self, table: _Table, now: float) -> int:
        dead = [key for key, entry in table.entries.items() if entry.expires_at <= now]
        for key in dead:
            del table.entries[key]
        table.next_purge = now + self.purge_interval
        return len(dead)
