"""Store and broker URLs: refused with precise errors that never show the password."""

from __future__ import annotations

import pytest

from oncely.brokers.amqp import AmqpBroker
from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError, UnknownScheme
from oncely.stores.outbox import Outbox
from oncely.stores.redis import RedisStore
from oncely.stores.registry import store_from_url
from tests.stores._outbox_support import PG_URL


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:6379/0?bogus=1",
        "redis://app:s3cret@127.0.0.1:6379/0?pool_size=x",
        "redis://app:s3cret@127.0.0.1:6379/3?cluster=1",
        "redis://app:s3cret@h1:7000,h2:7001/0",
        "redis://app:s3cret@127.0.0.1:99999/0",
        "rediss://app:s3cret@127.0.0.1:6379/0?ssl_cert_reqs=bad",
        "redis://app:s3cret@127.0.0.1:6379/0#frag",
    ],
)
def test_a_bad_redis_url_is_refused_without_its_password(url: str) -> None:
    # Before, each message quoted the URL as given, password and all, into stderr and logs.
    with pytest.raises(ConfigError) as raised:
        RedisStore(url)
    assert "s3cret" not in str(raised.value)
    assert ":***@" in str(raised.value)


def test_a_bad_amqp_publish_timeout_is_refused_without_the_password() -> None:
    with pytest.raises(ConfigError) as raised:
        AmqpBroker("amqp://guest:s3cret@127.0.0.1/?publish_timeout=-1")
    assert "s3cret" not in str(raised.value) and "guest:***@" in str(raised.value)


def test_a_mistyped_scheme_is_refused_without_the_password() -> None:
    # A typo in the scheme ("postgresq://") leaves the password in place: it was echoed.
    with pytest.raises(UnknownScheme) as store:
        store_from_url("postgresq://app:s3cret@db/app")
    with pytest.raises(UnknownScheme) as broker:
        broker_from_url("amqq://app:s3cret@rabbit/")
    with pytest.raises(UnknownScheme) as outbox:
        Outbox.from_url("mysql://app:s3cret@db/app")
    for raised in (store, broker, outbox):
        assert "s3cret" not in str(raised.value) and "app:***@" in str(raised.value)


def test_a_kafka_url_with_credentials_is_refused_without_them() -> None:
    # Before, "app:s3cret@127.0.0.1" went to aiokafka as a host name: a connection error
    # (exit 1) that quoted the password, for a feature the adapter does not have.
    with pytest.raises(ConfigError) as raised:
        broker_from_url("kafka://app:s3cret@127.0.0.1:9092/?group=g")
    assert "s3cret" not in str(raised.value)
    assert str(raised.value).startswith("a Kafka URL takes no user:password@")


@pytest.mark.anyio
async def test_a_libpq_parameter_asyncpg_refuses_is_a_config_error(anyio_backend: object) -> None:
    # Before: StoreError (exit 1, as for a server failure) for a typo no retry can fix.
    store = store_from_url(f"{PG_URL}?sslmode=bogus")
    try:
        with pytest.raises(ConfigError, match="sslmode"):
            await store.connect()
    finally:
        await store.aclose()


def test_a_known_scheme_without_slashes_says_so() -> None:
    # Before: "unknown broker URL 'sqlite:x.db' (no scheme)", though the scheme is there.
    with pytest.raises(UnknownScheme, match=r"no '//' after sqlite:; write sqlite://"):
        broker_from_url("sqlite:x.db")
    with pytest.raises(UnknownScheme, match=r"\(no scheme\)"):
        broker_from_url("x.db")
