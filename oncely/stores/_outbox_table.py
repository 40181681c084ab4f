"""The outbox table: where ``add`` writes (see ``oncely.stores.outbox``)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from oncely._codec import encode
from oncely._options import mask
from oncely._tracing_headers import created
from oncely.errors import ConfigError, MissingExtra, UnknownScheme
from oncely.stores._outbox_base import DEFAULT_TABLE, Backend, encode_headers

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["Outbox"]


class Outbox:
    """An outbox table in PostgreSQL or SQLite. Build it with ``Outbox.from_url``.

    ``add`` needs nothing but the table (``migrate()`` once). ``connect()`` also opens the
    connections a relay uses; ``OutboxRelay`` calls it. Construction does no I/O.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    def from_url(cls, url: str, *, table: str = DEFAULT_TABLE) -> Outbox:
        """``postgresql://user:pass@host:port/db`` (asyncpg, extra ``postgres``) or
        ``sqlite:///path.db`` (aiosqlite).

        Raises:
            UnknownScheme: another scheme.
            MissingExtra: asyncpg is not installed.
            ConfigError: a malformed URL or table name.
        """
        if not isinstance(url, str):
            raise ConfigError(f"outbox URL must be a string, got {type(url).__name__}")
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        if scheme in ("postgresql", "postgres"):
            try:
                from oncely.stores._outbox_pg import PgBackend
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] == "asyncpg":
                    raise MissingExtra(scheme, "postgres", "asyncpg") from exc
                raise
            return cls(PgBackend(url, table))
        if scheme == "sqlite":
            from oncely.stores._outbox_sqlite import SqliteBackend

            return cls(SqliteBackend(url, table))
        raise UnknownScheme(
            f"unknown outbox URL {mask(url)!r}; known: postgresql://, postgres://, sqlite://"
        )

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self.backend.url

    @property
    def table(self) -> str:
        return self.backend.table

    @property
    def dialect(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        return self.backend.dialect

    def __repr__(self) -> str:
        return f"Outbox({self.url!r}, table={self.table!r})"

    def schema(self) -> list[str]:
        """The DDL ``migrate()`` runs, for a migration tool of your own."""
        return self.backend.schema()

    async def migrate(self) -> None:
        """Create the table and its indexes if missing. Idempotent; safe from several
        processes at once.

        Raises:
            StoreUnavailable: the database could not be reached.
        """
        await self.backend.migrate()

    async def connect(self) -> None:
        """Open the relay's connections and migrate. Idempotent.

        Raises:
            StoreUnavailable: the database could not be reached.
            ConfigError: credentials or database name refused.
        """
        await self.backend.connect()

    async def aclose(self) -> None:
        """Close what ``connect`` opened. Idempotent."""
        await self.backend.aclose()

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

    async def add(
        self,
        conn: Any,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Insert a message through ``conn``, inside the transaction it has open, and return
        its message id. The message is published only if, and once, that transaction commits.

        Args:
            conn: the connection your transaction runs on: an ``asyncpg`` connection (or pool
                proxy) for PostgreSQL, an ``aiosqlite`` connection (to the outbox's file) for
                SQLite. Without an open transaction the row commits on its own.
            topic: where the relay publishes it.
            payload: ``bytes`` travel as-is; anything msgspec encodes becomes JSON (the same
                rule as ``Publisher``).
            key: orders the message behind earlier ones with the same key, and becomes the
                ``oncely-key`` header (else the message id does). The consumer's default key
                source dedupes on the message id (``oncely-dedupe-key``), so several distinct
                messages may share a key.
            headers: extra ``str`` headers.
            message_id: a stable id of your own; by default a new UUID.

        Raises:
            TypeError: the payload or headers cannot be encoded, or ``conn`` is not a
                connection of this outbox's database driver. Nothing was written.
            ConfigError: the outbox table does not exist (run ``migrate()``).
            StoreError, StoreUnavailable: the insert failed; your transaction decides.
        """
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty string, got {topic!r}")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"key must be a non-empty string or None, got {key!r}")
        if message_id is not None and (not isinstance(message_id, str) or not message_id):
            raise ValueError(f"message_id must be a non-empty string or None, got {message_id!r}")
        body = encode(payload)
        mid = message_id or uuid.uuid4().hex
        # The row carries the trace context, and the relay publishes it with the row.
        encoded_headers = encode_headers(created(topic, headers, mid, self.dialect))
        await self.backend.add(
            conn, message_id=mid, topic=topic, key=key, headers=encoded_headers, body=body
        )
        return mid

    async def pending(self) -> int:
        """How many messages are not sent yet (needs ``connect()``)."""
        return await self.backend.pending()

    async def backlog(self) -> tuple[int, float | None]:
        """How many messages are not sent yet, and the Unix time the oldest of them was
        added (``None`` with none); the metrics sampler reads it (needs ``connect()``)."""
        return await self.backend.backlog()
