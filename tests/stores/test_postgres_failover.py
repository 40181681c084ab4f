"""A PostgreSQL store whose ``target_session_attrs`` no server matches (``read-write`` during a
failover, when only a standby answers) is unavailable, not broken: the worker fails closed and
retries. The shared server is a primary, so ``standby`` stands in for the unmatched attribute."""

from __future__ import annotations

import os

import pytest

from oncely.errors import StoreUnavailable
from oncely.stores.postgres import PostgresStore

URL = os.environ.get("ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely")


@pytest.mark.anyio
async def test_no_server_with_the_wanted_session_attributes_is_store_unavailable(
    unique: str, anyio_backend: object
) -> None:
    table = f"oncely_{unique.replace('-', '_')}"
    store = PostgresStore.from_url(f"{URL}?table={table}&target_session_attrs=standby")
    with pytest.raises(StoreUnavailable, match="None of the hosts match"):
        await store.connect()
    with pytest.raises(StoreUnavailable, match="not connected"):
        await store.begin("k", "fp", 30.0)
