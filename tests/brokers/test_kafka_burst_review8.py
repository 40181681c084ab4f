"""``send_burst`` writes records straight into aiokafka's batch builder and then the batch's
record count into a private field (aiokafka 0.14). The count is what the producer sends as
the batch's size: read from anywhere else (an aiokafka the ``kafka`` extra's pin did not
choose: ``pip install oncely aiokafka`` takes the newest), it is 0, and aiokafka completes an
empty batch without sending it, so the transaction committed its input with its outputs
lost, and nothing said so. Real Kafka."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from oncely.brokers._kafka_burst import KeyHashes, send_burst
from oncely.brokers._kafka_options import flat_headers
from oncely.errors import BrokerError
from tests.brokers.kafka_support import BOOTSTRAP

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_batch_whose_count_aiokafka_does_not_read_is_refused(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An aiokafka that keeps a batch's record count elsewhere than 0.14 does.
    monkeypatch.setattr(BatchBuilder, "record_count", lambda self: getattr(self, "_count", 0))
    make: Any = AIOKafkaProducer  # aiokafka is unannotated
    producer = make(bootstrap_servers=BOOTSTRAP, transactional_id=unique, enable_idempotence=True)
    await producer.start()
    try:
        await producer.begin_transaction()
        outputs = ((unique, b"out", None, flat_headers({"a": "1"})),)
        with pytest.raises(BrokerError, match="aiokafka"):
            await send_burst(producer, [(0, outputs)], KeyHashes())
        await producer.abort_transaction()
    finally:
        await producer.stop()
