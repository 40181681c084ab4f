"""AMQP topic names that RabbitMQ's client refuses are a ConfigError, before any declare."""

from __future__ import annotations

import pytest

from oncely.brokers.amqp import AmqpBroker
from oncely.errors import ConfigError
from tests.brokers.test_amqp import AMQP_URL
from tests.runtime.test_cli import oncely

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("topic", ["bad topic!", "orders?", "é", "amq.orders", ""])
async def test_a_topic_the_client_cannot_declare_is_a_config_error(topic: str) -> None:
    # Before: pamqp's bare ValueError('Invalid value for queue') out of the declare.
    async with AmqpBroker(AMQP_URL) as broker:
        with pytest.raises(ConfigError, match="invalid AMQP topic"):
            await broker.publish(topic, b"{}")
        with pytest.raises(ConfigError, match="invalid AMQP topic"):
            await broker.dead_letters(topic)


def test_dlq_list_of_such_a_topic_is_one_line_exit_2() -> None:
    out = oncely("dlq", "list", "bad topic!", "--broker", AMQP_URL)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("oncely: error: invalid AMQP topic (queue name) 'bad topic!'")
