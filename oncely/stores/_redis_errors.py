"""How the Redis store translates redis-py's errors (``oncely.stores.redis``): the one place a
driver error becomes ``StoreUnavailable`` (the server cannot be reached or cannot serve now)
or ``StoreError`` (anything else), the driver's message kept and the error chained."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from redis import exceptions as rx

from oncely.errors import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["close_quietly", "map_errors", "translate"]

# Errors that mean "the server cannot be reached or cannot serve right now". A ReadOnlyError
# comes from a replica that was promoted away from (a failover in progress).
UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.ReadOnlyError,
    rx.RedisClusterException,
    rx.ClusterError,
    OSError,
)


def translate(exc: BaseException, what: str) -> StoreError:
    """The store error for one driver error, with the driver's message in it."""
    if isinstance(exc, UNAVAILABLE):
        err: StoreError = StoreUnavailable(f"redis {what}: {type(exc).__name__}: {exc}")
    else:
        err = StoreError(f"redis {what} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Translate redis-py's errors (and raw socket ones) into ``StoreUnavailable`` when the
    server cannot be reached or cannot serve now, else ``StoreError``."""
    try:
        yield
    # OSError includes TimeoutError; RedisClusterException is not a RedisError.
    except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
        raise translate(exc, what) from exc


async def close_quietly(client: Redis | RedisCluster) -> None:
    with contextlib.suppress(rx.RedisError, OSError, RuntimeError):
        await client.aclose()
