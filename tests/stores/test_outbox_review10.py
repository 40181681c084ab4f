"""Review 10: a PostgreSQL outbox relay refuses a publish_timeout under which a claim could idle
in its transaction past the relay session's idle_in_transaction_session_timeout.

A claim is a transaction held open while its batch publishes: up to half the relay's lease
plus one publish (3 x publish_timeout from 15 s). Past 15 min PostgreSQL ends the session:
nothing is marked sent, and the batch is published again, each time the same way. (Shown
with that timeout scaled down to 1 s and 1.5 s publishes: 3 publishes of one row in 6 s, 0
marked, 3 relay errors 'mark sent: ... connection has been released back to the pool'.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from oncely.errors import ConfigError
from oncely.stores.outbox import Outbox, OutboxRelay
from tests.stores._outbox_support import PG_URL

if TYPE_CHECKING:
    from pathlib import Path


def test_a_postgresql_relay_refuses_a_publish_timeout_its_claims_cannot_outlast() -> None:
    with pytest.raises(ConfigError, match=r"publish_timeout=241 .* at most 240") as raised:
        OutboxRelay(Outbox.from_url(PG_URL), "memory://rev10", publish_timeout=241)
    assert "idle_in_transaction_session_timeout" in str(raised.value)
    assert OutboxRelay(Outbox.from_url(PG_URL), "memory://rev10", publish_timeout=240)


def test_a_sqlite_relay_has_no_such_bound(tmp_path: Path) -> None:
    # Its claims are leases sized from publish_timeout, not open transactions.
    outbox = Outbox.from_url(f"sqlite:///{tmp_path / 'app.db'}")
    assert OutboxRelay(outbox, "memory://rev10", publish_timeout=3600).publish_timeout == 3600
