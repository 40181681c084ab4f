"""Review 10: a plain SQS client's message whose ``oncely-body-encoding`` does not match its
body is handed on, not fatal (real ElasticMQ)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.sqs import SqsBroker
from tests.brokers.test_sqs import broker, plain_client, topics

if TYPE_CHECKING:
    from types_aiobotocore_sqs.type_defs import MessageAttributeValueTypeDef

__all__ = ["broker", "topics"]  # fixtures

pytestmark = [pytest.mark.sqs, pytest.mark.anyio]

_BASE64: dict[str, MessageAttributeValueTypeDef] = {
    "oncely-body-encoding": {"DataType": "String", "StringValue": "base64"}
}


async def test_a_body_marked_base64_that_is_not_is_delivered_as_its_text(
    broker: SqsBroker, unique: str, topics: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``oncely-body-encoding=base64`` on a body that is not base64 (a plain client copying
    oncely's headers): the body goes to the handler as its text, as with an encoding oncely
    does not know, with a warning naming the message. Before, ``b64decode`` raised in the
    poller, which died: the subscription failed ('SQS poller died: Error: Incorrect
    padding'), the other messages of its receive waited out their visibility, and the
    message came back to kill the next poller until SQS's redrive moved it, reasonless."""
    caplog.set_level(logging.WARNING, "oncely.brokers.sqs")
    topics.append(unique)
    url, dlq_url = await broker.queue_urls(unique)
    async with plain_client() as client:
        bad = await client.send_message(QueueUrl=url, MessageBody="abc", MessageAttributes=_BASE64)
        await client.send_message(QueueUrl=url, MessageBody="next")
        # The same in the dead-letter queue: `oncely dlq list` reads it with the same decoding.
        await client.send_message(QueueUrl=dlq_url, MessageBody="ab=c", MessageAttributes=_BASE64)
    got = {}
    async with broker.consume(unique, prefetch=2, visibility=30) as sub:
        for _ in range(2):
            d = await asyncio.wait_for(anext(sub), 10)
            got[d.id] = d.body
            await d.ack()
    assert got[bad["MessageId"]] == b"abc" and sorted(got.values()) == [b"abc", b"next"]
    warned = [r.getMessage() for r in caplog.records if "not base64" in r.getMessage()]
    assert any(bad["MessageId"] in m for m in warned), warned
    (letter,) = await broker.dead_letters(unique)
    assert letter.body == b"ab=c"
