"""An SQS endpoint that is not an http(s) URL is a ConfigError when the URL is read."""

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
