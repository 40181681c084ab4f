"""The features record decides which cases a backend runs: inapplicable ones are not collected."""

from __future__ import annotations

from tests.conformance import test_amqp_conformance as amqp
from tests.conformance import test_brokers as brokers
from tests.conformance import test_stores as stores


def collected(cls: type, case: str) -> bool:
    return callable(getattr(cls, case))


def test_cases_follow_capabilities() -> None:
    assert not collected(amqp.TestAmqpBroker, "test_extend_keeps_message_invisible")
    assert collected(amqp.TestAmqpBroker, "test_extend_unsupported_raises_not_supported")
    assert collected(brokers.TestMemoryBroker, "test_extend_keeps_message_invisible")
    assert not collected(brokers.TestMemoryBroker, "test_extend_unsupported_raises_not_supported")
    tx_case = "test_transaction_commits_effect_and_completion_together"
    assert not collected(stores.TestMemoryStore, tx_case)
    assert collected(stores.TestSqliteStore, tx_case)
