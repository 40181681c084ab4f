"""Review 10: an unknown option in a Redis or SQLite URL names the options that are known, as
the PostgreSQL, AMQP, Kafka and SQS URL errors do (a misspelling is then one look away)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.sqlite import SqliteBroker
from oncely.errors import ConfigError
from oncely.stores.outbox import Outbox
from oncely.stores.redis import RedisStore
from oncely.stores.sqlite import SqliteStore

if TYPE_CHECKING:
    from collections.abc import Callable


@pytest.mark.parametrize(
    ("build", "url", "message"),
    [
        (
            RedisStore.from_url,
            "redis://:secret@127.0.0.1:6379/0?prefx=a",
            "unknown option(s) prefx; known: cluster, connect_timeout, pool_size, prefix, "
            "socket_timeout, ssl_ca_certs, ssl_cert_reqs, ssl_certfile, ssl_check_hostname, "
            "ssl_keyfile",
        ),
        (
            SqliteStore.from_url,
            "sqlite:///x.db?pol=2",
            "unknown option(s) pol; known: pool, purge_interval",
        ),
        (
            SqliteBroker.from_url,
            "sqlite:///q.db?pol_interval=1&x=2",
            "unknown option(s) pol_interval, x; known: busy_timeout, max_poll_interval, "
            "poll_interval",
        ),
        (Outbox.from_url, "sqlite:///o.db?table=x", "unknown option(s) table; known: none"),
    ],
    ids=["redis-store", "sqlite-store", "sqlite-broker", "sqlite-outbox"],
)
def test_an_unknown_option_lists_the_known_ones(
    build: Callable[[str], object], url: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        build(url)
    assert "secret" not in str(raised.value)
