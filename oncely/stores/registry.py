"""Idempotency-store URL schemes, resolved lazily like brokers."""

from __future__ import annotations

from oncely._registry import Registry
from oncely.stores.base import IdempotencyStore

__all__ = ["register_store", "store_from_url"]

_stores: Registry[IdempotencyStore] = Registry("store", IdempotencyStore)
_stores.register("memory", "oncely.stores.memory:MemoryStore")
_stores.register("sqlite", "oncely.stores.sqlite:SqliteStore", extra="sqlite", driver="aiosqlite")
_stores.register(
    "postgresql", "oncely.stores.postgres:PostgresStore", extra="postgres", driver="asyncpg"
)
_stores.register(
    "postgres", "oncely.stores.postgres:PostgresStore", extra="postgres", driver="asyncpg"
)
_stores.register("redis", "oncely.stores.redis:RedisStore", extra="redis", driver="redis")
_stores.register("rediss", "oncely.stores.redis:RedisStore", extra="redis", driver="redis")


def store_from_url(url: str | IdempotencyStore) -> IdempotencyStore:
    """Build a store from its URL, or return a ready ``IdempotencyStore`` unchanged.

    Raises:
        UnknownScheme: no store is registered for the URL's scheme.
        MissingExtra: the store's driver is not installed; the message names the extra.
        ConfigError: the URL is malformed for that store.
    """
    return _stores.resolve(url)


def register_store(scheme: str, target: str, *, extra: str = "", driver: str = "") -> None:
    """Register a third-party store; see ``oncely.brokers.registry.register_broker``."""
    _stores.register(scheme, target, extra=extra, driver=driver)
