"""The store conformance suite over every built-in store."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import aiosqlite
import pytest

from oncely.stores.base import IdempotencyStore, StoreTransaction
from oncely.stores.memory import MemoryStore
from oncely.stores.sqlite import SqliteStore
from oncely.testing.stores import StoreConformance, StoreFactory, StoreFeatures


class TestMemoryStore(StoreConformance):
    features = StoreFeatures()

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        url = f"memory://conformance-{uuid.uuid4().hex}"
        return lambda: MemoryStore.from_url(url)


class TestSqliteStore(StoreConformance):
    features = StoreFeatures(transactional=True, multiprocess=True)

    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        path = tmp_path / "state.db"
        # The handler's own table, in the same file as the store's.
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE effects (marker TEXT PRIMARY KEY)")
        db.close()
        return lambda: SqliteStore.from_url(f"sqlite:///{path}")

    async def write_effect(self, tx: StoreTransaction, marker: str) -> None:
        await tx.connection.execute("INSERT INTO effects (marker) VALUES (?)", (marker,))

    async def effect_visible(self, store: IdempotencyStore, marker: str) -> bool:
        assert isinstance(store, SqliteStore)
        async with aiosqlite.connect(store.path) as db:
            rows = await db.execute_fetchall("SELECT 1 FROM effects WHERE marker = ?", (marker,))
        return bool(list(rows))
