"""SQS broker on a real SQS-compatible server (ElasticMQ from ``scripts/services.sh``; never
skipped: a missing server fails these tests). The URL comes from ``ONCELY_TEST_SQS_URL``."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import pytest
from aiobotocore.session import AioSession

from oncely.brokers._sqs_wire import dlq_name, parse_url, queue_name

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from types_aiobotocore_sqs import SQSClient

# ElasticMQ takes any credentials; real AWS ones in the environment are left alone.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "oncely-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "oncely-test")

ENDPOINT = os.environ.get("ONCELY_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")
SQS_URL = os.environ.get(
    "ONCELY_TEST_SQS_URL", f"sqs://?region=us-east-1&endpoint={ENDPOINT}&wait=1"
)

pytestmark = pytest.mark.sqs


@contextlib.asynccontextmanager
async def plain_client(endpoint: str = ENDPOINT) -> AsyncIterator[SQSClient]:
    """A bare aiobotocore client, as a user without oncely would have."""
    async with AioSession().create_client(
        "sqs", region_name="us-east-1", endpoint_url=endpoint
    ) as client:
        yield client


async def delete_queues(topics: list[str], url: str = SQS_URL) -> None:
    """Remove the queues tests created (ElasticMQ keeps them until it restarts)."""
    options = parse_url(url)
    async with plain_client(options.endpoint or ENDPOINT) as client:
        for topic in topics:
            for name in (queue_name(topic, options), dlq_name(topic, options)):
                with contextlib.suppress(Exception):
                    got = await client.get_queue_url(QueueName=name)
                    await client.delete_queue(QueueUrl=got["QueueUrl"])
