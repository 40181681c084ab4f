"""Broker URL options refused when the URL is read, not as a traceback or a stall later."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("heartbeat=abc", "heartbeat='abc' must be a whole number >= 0"),
        ("heartbeat=1.5", "heartbeat='1.5' must be a whole number >= 0"),
        ("timeout=soon", "timeout='soon' must be a number >= 0"),
        ("reconnect_interval=-1", "reconnect_interval='-1' must be a number >= 0"),
        ("fail_fast=maybe", "fail_fast='maybe' must be true or false"),
    ],
)
def test_an_unreadable_aio_pika_option_is_refused(option: str, message: str) -> None:
    # Before, they passed through to aiormq, which reads a number it cannot parse as 0
    # (heartbeat=abc turned heartbeats off) and an unknown flag as false, without a word.
    with pytest.raises(ConfigError, match=re.escape(f"AMQP URL option {message}")):
        broker_from_url(f"amqp://guest:guest@127.0.0.1/?{option}")


def test_readable_aio_pika_options_are_taken() -> None:
    broker_from_url("amqp://guest:guest@127.0.0.1/?heartbeat=30&timeout=2.5&fail_fast=true")
