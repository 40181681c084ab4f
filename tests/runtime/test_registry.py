from __future__ import annotations

import pytest

import oncely
from oncely.brokers.memory import MemoryBroker


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(oncely.UnknownScheme, match=r"'kafkaa'.*known: amqp://.*sqlite://"):
        oncely.broker_from_url("kafkaa://localhost")
    with pytest.raises(oncely.UnknownScheme, match="no scheme"):
        oncely.store_from_url("just-a-path.db")


def test_missing_driver_names_the_extra() -> None:
    oncely.register_broker(
        "fakeq",
        "tests.runtime._needs_missing_driver:Nothing",
        extra="fakeq",
        driver="oncely_driver_that_is_not_installed",
    )
    with pytest.raises(oncely.MissingExtra, match=r"pip install 'oncely\[fakeq\]'"):
        oncely.broker_from_url("fakeq://x")


def test_instances_pass_through_and_wrong_types_are_refused() -> None:
    broker = MemoryBroker()
    assert oncely.broker_from_url(broker) is broker
    with pytest.raises(oncely.ConfigError, match="URL string or a Broker instance"):
        oncely.broker_from_url(42)  # type: ignore[arg-type]


def test_embedded_schemes_resolve_lazily() -> None:
    assert type(oncely.broker_from_url("memory://reg")).__name__ == "MemoryBroker"
    assert type(oncely.broker_from_url("sqlite:///x.db")).__name__ == "SqliteBroker"
    assert type(oncely.store_from_url("sqlite:///x.db")).__name__ == "SqliteStore"
