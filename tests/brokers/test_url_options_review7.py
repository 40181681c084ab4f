"""Broker URL options refused when the URL is read, not as a traceback or a stall later."""

from __future__ import annotations

import pytest

from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError


@pytest.mark.parametrize("endpoint", ["notaurl", "ftp://sqs.local", "http://", "127.0.0.1:9324"])
def test_an_endpoint_that_is_not_an_http_url_is_refused(endpoint: str) -> None:
    # Before, it was accepted here and botocore's ValueError('Invalid endpoint: ...') came
    # out of connect as a traceback (`oncely run`, `oncely dlq`).
    with pytest.raises(ConfigError, match="SQS option endpoint must be an http"):
        broker_from_url(f"sqs://p-?endpoint={endpoint}&region=us-east-1")


def test_an_http_endpoint_is_taken() -> None:
    broker = broker_from_url("sqs://p-?endpoint=http://127.0.0.1:9324&region=us-east-1")
    assert broker.options.endpoint == "http://127.0.0.1:9324"  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["0", "0s", "0ms"])
def test_a_zero_kafka_request_timeout_is_refused(value: str) -> None:
    # Before, it was taken: aiokafka's request_timeout_ms=0 and asyncio.timeout(0) around
    # the adapter's own bounded waits, so every request would time out at once.
    with pytest.raises(ConfigError, match=r"request_timeout='0.*' must be > 0"):
        broker_from_url(f"kafka://127.0.0.1:9092/?request_timeout={value}")
