"""PostgreSQL plumbing shared by oncely's PostgreSQL code (the store, and the outbox).

URLs are libpq's, ``postgresql://user:password@host:port/dbname`` (``postgres://`` too), with
oncely's own options added to the query string, e.g. ``?table=jobs_keys&pool_max=20``. Each
caller names the options it accepts; the libpq parameters asyncpg understands (``sslmode``,
``sslrootcert``, ``target_session_attrs``, ``application_name``, ...) pass through to asyncpg.
Anything else is a ``ConfigError`` when the URL is parsed, rather than a failure at connect
(asyncpg would send an unknown parameter to the server as a setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from oncely._options import flag, mask, number
from oncely._options import safe as _safe
from oncely.errors import ConfigError, StoreError, StoreUnavailable

__all__ = [
    "LIBPQ_OPTIONS",
    "PostgresUrl",
    "close_quietly",
    "create_pool",
    "flag",
    "identifier",
    "map_errors",
    "mask",
    "number",
    "parse_postgres_url",
    "quote_ident",
    "reject_unknown",
    "release_quietly",
    "rollback_quietly",
]

SCHEMES = ("postgresql", "postgres")

LIBPQ_OPTIONS = frozenset(
    {
        "host",
        "port",
        "dbname",
        "database",
        "user",
        "password",
        "passfile",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslnegotiation",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "application_name",
    }
)
"""Query parameters passed through to asyncpg (``application_name`` as a server setting)."""

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# SQLSTATEs that mean "the server is not serving us right now": retry later, fail closed.
# Class 08 (connection exception), 53 (insufficient resources), 57 (operator intervention:
# shutdown, cannot connect now, query cancelled), 40 (serialization/deadlock: try again),
# 55P03 (lock not available).
_UNAVAILABLE_CLASSES = ("08", "53", "57", "40")
_UNAVAILABLE_STATES = frozenset({"55P03", "58030"})


class PostgresUrl:
    """A parsed URL: the DSN for asyncpg (oncely's options removed) and those options.

    Attributes:
        dsn: the URL asyncpg connects with.
        options: oncely's options, still as strings; callers pop what they read and then
            call ``reject_unknown``.
    """

    __slots__ = ("dsn", "options", "url")

    def __init__(self, url: str, dsn: str, options: dict[str, str]) -> None:
        self.url = url
        self.dsn = dsn
        self.options = options


def parse_postgres_url(url: str, accepted: Collection[str]) -> PostgresUrl:
    """Split ``url`` into asyncpg's DSN and the oncely options named in ``accepted``.

    Raises:
        ConfigError: not a ``postgresql://``/``postgres://`` URL, or a query parameter that is
            neither in ``accepted`` nor a libpq parameter asyncpg understands (or is repeated).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ConfigError(f"not a PostgreSQL URL: {_safe(url)} (write postgresql://host/dbname)")
    try:
        parts.port  # noqa: B018 - urllib checks the port only when asked
    except ValueError as exc:
        raise ConfigError(f"{_safe(url)}: {exc}") from None
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    options: dict[str, str] = {}
    passed: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise ConfigError(f"{_safe(url)}: option {name!r} is given twice")
        seen.add(name)
        if name in accepted:
            options[name] = value
        elif name in LIBPQ_OPTIONS:
            passed.append((name, value))
        else:
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(
                f"{_safe(url)}: unknown option {name!r}; oncely options here: {known}; "
                "libpq parameters such as sslmode pass through to asyncpg"
            )
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(passed), ""))
    return PostgresUrl(url, dsn, options)


def identifier(value: str, what: str) -> str:
    """Check a table or schema name: a plain SQL identifier, so it can be quoted safely.

    Raises:
        ConfigError: empty, longer than PostgreSQL's 63 bytes, or not
            ``[A-Za-z_][A-Za-z0-9_]*``.
    """
    if not _IDENT.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-63 letters, digits or underscores, "
            "not starting with a digit"
        )
    return value


def quote_ident(*names: str) -> str:
    """``"schema"."table"`` from names already checked by ``identifier``."""
    return ".".join(f'"{name}"' for name in names)


def reject_unknown(options: dict[str, str], url: str) -> None:
    if options:
        raise ConfigError(f"{_safe(url)}: unsupported option(s) {', '.join(sorted(options))}")


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    connect_timeout: float,
    reset: Callable[[Any], Awaitable[None]] | None = None,
    server_settings: dict[str, str] | None = None,
    what: str = "postgresql",
    refused: type[Exception] = StoreError,
) -> asyncpg.Pool:
    """Open an asyncpg pool with ``min_size`` connections ready.

    No ``command_timeout`` is set on the pool: a transactional handler runs its own
    statements on these connections, and oncely must not bound them. oncely's own statements
    pass a timeout of their own. ``reset`` replaces asyncpg's session reset on release (which
    costs a round trip); asyncpg still rolls back an open transaction first.
    ``server_settings`` are sent on every connection; ``what`` and ``refused`` are as for
    ``map_errors``.

    Raises:
        StoreUnavailable: the server could not be reached, or cannot take connections now.
        StoreError: any other failure (a bad ``sslmode`` value, ...), and a wrong password
            or unknown database unless ``refused`` says otherwise.
    """
    with map_errors(what, refused=refused):
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            reset=reset,
            server_settings=server_settings,
        )
    assert pool is not None
    return pool


async def close_quietly(closable: Any, within: float) -> None:
    """Close a connection or a pool within ``within`` seconds; terminate it if that fails (a lost
    server, a connection still busy). Never raises but ``CancelledError``."""
    try:
        await asyncio.wait_for(closable.close(), within)
    except Exception:
        closable.terminate()


async def rollback_quietly(conn: Any, tr: Any, within: float) -> None:
    """Roll back on a cleanup path whose own exception must win. A connection that cannot
    roll back within ``within`` seconds (lost, busy with a cancelled statement, or a server
    that stopped answering) is terminated: the server then rolls the transaction back itself.

    The bound matters after a statement timed out: asyncpg sends the server a cancel request
    on a connection of its own, unbounded, and the ``ROLLBACK`` waits for it; a server that
    accepts connections but never answers would hold this cleanup, and its caller, for ever.
    """
    try:
        async with asyncio.timeout(within):
            await tr.rollback()
    except Exception:
        with contextlib.suppress(Exception):
            conn.terminate()


async def release_quietly(pool: Any, conn: Any) -> None:
    """Give ``conn`` back to ``pool``; never raises but ``CancelledError``."""
    try:
        await pool.release(conn)
    except Exception:
        # A broken connection (server gone) may fail its reset; it is discarded either way.
        with contextlib.suppress(Exception):
            conn.terminate()


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the server cannot be reached or cannot serve us now."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        # target_session_attrs=read-write found only a standby: a failover in progress.
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.ConnectionDoesNotExistError):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # The pool or connection was closed under us (the server went away, or the
        # connection was terminated, which detaches it from its pool).
        return any(word in str(exc) for word in ("closed", "closing", "released"))
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
    return False


_REFUSED = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)
"""The server refused our credentials (28000, and 28P01 below it) or database name (3D000)."""


@contextlib.contextmanager
def map_errors(
    what: str = "postgresql",
    *,
    refused: type[Exception] = StoreError,
    missing_table: str | None = None,
) -> Iterator[None]:
    """Translate asyncpg and socket errors: ``StoreUnavailable`` for connectivity (refused,
    reset, timed out, server shutting down, too many connections), ``StoreError`` for the
    rest. The original is chained (``raise ... from exc``).

    Args:
        what: the prefix of the message.
        refused: raised instead when the server refuses the credentials or the database
            name (the outbox calls that a ``ConfigError``: retrying cannot help).
        missing_table: given, an undefined table is a ``ConfigError`` with this hint added
            (e.g. how to create the table).
    """
    try:
        yield
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
        TimeoutError,
    ) as exc:
        message = f"{what}: {type(exc).__name__}: {exc}"
        if isinstance(exc, _REFUSED):
            raise refused(message) from exc
        if isinstance(exc, asyncpg.ClientConfigurationError):
            # A libpq parameter of the URL asyncpg cannot take (sslmode=bogus): retrying or
            # waiting for the server cannot help.
            raise ConfigError(message) from exc
        if missing_table is not None and isinstance(exc, asyncpg.UndefinedTableError):
            raise ConfigError(f"{message}; {missing_table}") from exc
        if unavailable(exc):
            raise StoreUnavailable(message) from exc
        raise StoreError(message) from exc
