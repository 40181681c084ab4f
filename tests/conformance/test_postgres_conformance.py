"""The store conformance suite on a real PostgreSQL (``ONCELY_TEST_POSTGRES_URL``).

Each test class run uses a table of its own, so parallel runs never share keys or rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from oncely.stores.base import IdempotencyStore, StoreTransaction
from oncely.stores.postgres import PostgresStore
from oncely.testing.stores import StoreConformance, StoreFactory, StoreFeatures

POSTGRES_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)


@pytest.fixture(scope="module")
def tables() -> Iterator[tuple[str, str]]:
    """A store table and an effects table no other run uses; dropped afterwards."""
    suffix = uuid.uuid4().hex[:12]
    names = (f"oncely_conf_{suffix}", f"effects_conf_{suffix}")

    async def setup() -> None:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f"CREATE TABLE {names[1]} (marker text PRIMARY KEY)")
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            for name in names:
                await conn.execute(f"DROP TABLE IF EXISTS {name}")
        finally:
            await conn.close()

    asyncio.run(setup())
    yield names
    asyncio.run(teardown())


class TestPostgresStore(StoreConformance):
    # The database clock and a round trip sit between the test's sleep and the store's check.
    features = StoreFeatures(transactional=True, multiprocess=True, timing_slack=0.3)

    @pytest.fixture
    def store_factory(self, tables: tuple[str, str]) -> StoreFactory:
        url = f"{POSTGRES_URL}?table={tables[0]}&pool_max=4"
        self.effects = tables[1]
        return lambda: PostgresStore.from_url(url)

    async def write_effect(self, tx: StoreTransaction, marker: str) -> None:
        await tx.connection.execute(f"INSERT INTO {self.effects} (marker) VALUES ($1)", marker)

    async def effect_visible(self, store: IdempotencyStore, marker: str) -> bool:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            found = await conn.fetchval(
                f"SELECT count(*) FROM {self.effects} WHERE marker = $1", marker
            )
        finally:
            await conn.close()
        return bool(found)
