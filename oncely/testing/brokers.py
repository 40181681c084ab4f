"""The broker conformance suite: one set of tests every ``Broker`` must pass.

Modelled on Watermill's universal pub/sub tests and SAQ's abstract ``TestQueue``: the cases
live on ``BrokerConformance``; a broker plugs in with a small subclass that says how to open
it and which cases apply::

    import pytest
    from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures

    class TestRabbit(BrokerConformance):
        # AMQP cannot extend one message's visibility, and rounds delays up to buckets.
        features = BrokerFeatures(extend=False, delay_granularity=1.0, visibility_seconds=2.0)

        @pytest.fixture
        def broker_factory(self, rabbit_url: str) -> BrokerFactory:
            async def make() -> Broker:
                broker = AmqpBroker.from_url(rabbit_url)
                await broker.connect()
                return broker

            return make

Every call of the factory within one test must return a new, connected broker on the **same
location** (file, server, hub): the suite calls it twice to test close-and-reopen and to run
consumers over two connections. The suite closes what the factory returned. Topics are unique
per test (override ``make_topic`` if the broker needs another naming scheme). A broker
without ``DeadLetterAdmin`` can still run the dead-letter case by overriding
``read_dead_letters``.

The cases are grouped by concern in ``_broker_delivery``, ``_broker_settle``,
``_broker_visibility`` and ``_broker_dlq``; ``BrokerConformance`` composes them.

Cases run under ``@pytest.mark.anyio``, so the project's ``anyio_backend`` fixture decides the
event loops. Every wait is bounded; the only sleeps let a deadline pass that is itself under
test (a delay, a visibility timeout) or give an unwanted delivery the chance to show up.
"""

from __future__ import annotations

from typing import Any

from oncely.testing._broker_base import BrokerFactory, BrokerFeatures
from oncely.testing._broker_delivery import DeliveryCases
from oncely.testing._broker_dlq import DeadLetterCases
from oncely.testing._broker_settle import SettleCases
from oncely.testing._broker_visibility import VisibilityCases
from oncely.testing._select import drop_inapplicable

__all__ = ["BrokerConformance", "BrokerFactory", "BrokerFeatures"]


class BrokerConformance(DeliveryCases, SettleCases, VisibilityCases, DeadLetterCases):
    """The conformance cases. Subclass it as ``TestSomething`` and provide ``broker_factory``
    (a fixture) and ``features``; see the module docstring."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        drop_inapplicable(cls, cls.features)
